"""Every primary config composes, alone and with every experiment; typos fail at once."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def _entry(experiment: str) -> str:
    """The entry point an experiment belongs to, from its task_name (pretrain_* / finetune_*)."""
    for line in (CONFIGS / "experiment" / f"{experiment}.yaml").read_text().splitlines():
        if line.startswith("task_name:"):
            return line.split(":", 1)[1].strip().split("_", 1)[0]
    raise AssertionError(f"experiment {experiment} sets no task_name")


PRETRAIN_EXPERIMENTS = [e for e in EXPERIMENTS if _entry(e) == "pretrain"]
FINETUNE_EXPERIMENTS = [e for e in EXPERIMENTS if _entry(e) == "finetune"]


def test_every_experiment_belongs_to_an_entry_point():
    assert set(PRETRAIN_EXPERIMENTS) | set(FINETUNE_EXPERIMENTS) == set(EXPERIMENTS)
    assert len(FINETUNE_EXPERIMENTS) == 6


def _compose(name, overrides, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(name, overrides=[*overrides, f"paths.output_dir={tmp_path}"])
    OmegaConf.resolve(cfg)
    return cfg


@pytest.mark.parametrize("name", ["pretrain", "train_tokenizer", "finetune"])
def test_primary_configs_compose(name, tmp_path):
    # finetune's default model.pretrained is the newest demo pretraining checkpoint: none in CI.
    cfg = _compose(name, ["model.pretrained=null"] if name == "finetune" else [], tmp_path)
    assert cfg.task._target_
    assert cfg.trainer._target_ == "lightning.Trainer"
    assert cfg.paths.output_dir == str(tmp_path)


@pytest.mark.parametrize("experiment", PRETRAIN_EXPERIMENTS)
def test_pretrain_experiments_compose(experiment, tmp_path):
    cfg = _compose("pretrain", [f"+experiment={experiment}"], tmp_path)
    assert cfg.model.vocab_size == cfg.tokenizer.vocab_size == 8192
    assert cfg.masking.num_masking_patches == 75
    assert cfg.masking.input_size == 14  # ${div:224,16}
    assert cfg.data.transform.input_size == 224
    assert cfg.data.transform.second_input_size == 112
    assert cfg.trainer.precision == "bf16-mixed"


def test_command_line_group_beats_experiment(tmp_path):
    cfg = _compose("pretrain", ["+experiment=beit_base", "data=synthetic"], tmp_path)
    assert "Synthetic" in cfg.data.source._target_


def test_typo_in_override_fails(tmp_path):
    with pytest.raises(ConfigCompositionException):
        _compose("pretrain", ["trainer.max_stepz=1"], tmp_path)
    with pytest.raises(ConfigCompositionException):
        _compose("pretrain", ["model=does_not_exist"], tmp_path)
