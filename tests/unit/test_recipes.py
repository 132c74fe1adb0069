"""Every experiment resolves equal to its recipe card (configs/recipes/), and docs/recipes.md is the
cards' rendering. A mismatch names the official flag; a key the experiment sets that no flag maps
fails too."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from bitrain.tools import recipes

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
CARDS = {card.experiment: card for card in recipes.load_cards()}


def _resolved(card: recipes.Card, tmp_path, extra=()):
    overrides = [f"+experiment={card.experiment}", f"paths.output_dir={tmp_path}", *extra]
    if card.entry == "finetune":
        overrides.append("model.pretrained=/checkpoints/pretrained.pth")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(card.entry, overrides=overrides)


def test_every_experiment_has_a_card():
    assert sorted(CARDS) == EXPERIMENTS
    for name, card in CARDS.items():
        assert card.path.name == f"{name}.yaml"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_resolves_equal_to_its_card(experiment, tmp_path):
    card = CARDS[experiment]
    problems = recipes.check_card(card, _resolved(card, tmp_path))
    assert not problems, "\n".join(problems)


def test_a_changed_value_fails_naming_the_flag(tmp_path):
    card = CARDS["beit_base_ft21k"]
    cfg = _resolved(card, tmp_path, ["mixup.cutmix_alpha=1.0", "data.transform.mean=[0.4,0.5,0.5]"])
    problems = "\n".join(recipes.check_card(card, cfg))
    assert "--cutmix: bitrain 'mixup.cutmix_alpha' = 1.0" in problems
    assert "--imagenet_default_mean_and_std (mean)" in problems


def test_a_recipe_value_without_a_flag_fails(tmp_path):
    card = copy.deepcopy(CARDS["beit_base_ft1k"])
    card.flags = [f for f in card.flags if f.flag != "--layer_decay"]
    problems = recipes.check_card(card, _resolved(card, tmp_path))
    assert any("sets 'optim.layer_decay', which no flag of the card maps" in p for p in problems)


def test_malformed_cards_are_refused(tmp_path):
    good = {
        "experiment": "x",
        "entry": "finetune",
        "title": "t",
        "sources": [],
        "expected": [],
        "flags": [{"flag": "--lr", "value": 1, "source": "a.py:1", "key": "optim.lr"}],
    }
    cases = {
        "not both or neither": {"flag": "--lr", "value": 1, "source": "a.py:1"},
        "'source' is missing": {"flag": "--lr", "value": 1, "key": "optim.lr"},
        "needs a 'note'": {"flag": "--lr", "value": 1, "source": "s", "key": "k", "bitrain": 2},
    }
    for message, flag in cases.items():
        path = tmp_path / "x.yaml"
        path.write_text(yaml.safe_dump({**good, "flags": [flag]}))
        with pytest.raises(recipes.CardError, match=message):
            recipes.load_card(path)
    path.write_text(yaml.safe_dump({**good, "flagz": []}))
    with pytest.raises(recipes.CardError, match="unknown fields"):
        recipes.load_card(path)


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_recipes_doc", ROOT / "scripts" / "make_recipes_doc.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_recipes_md_is_generated_from_the_cards(tmp_path):
    script = _script()
    committed = (ROOT / "docs" / "recipes.md").read_text()
    assert committed == script.render(), (
        "docs/recipes.md is stale: python scripts/make_recipes_doc.py"
    )
    assert script.main(["--check"]) == 0
    stale = tmp_path / "recipes.md"
    stale.write_text(committed.replace("| yes |", "| no |", 1))
    assert script.main(["--check", "--out", str(stale)]) == 1


def test_cards_cite_a_commit_and_lines():
    for card in CARDS.values():
        for src in card.sources:
            assert len(str(src["commit"])) == 40 and src["file"], (card.experiment, src)
        assert card.expected and all(e.get("source") for e in card.expected), card.experiment
        for flag in card.flags:
            assert flag.source, (card.experiment, flag.flag)
