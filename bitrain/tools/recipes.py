"""Recipe cards: each experiment's official command, flag by flag, as data (``configs/recipes/``).

A card (``configs/recipes/<experiment>.yaml``, plain YAML read with ``yaml.safe_load``; nothing in
it names code to run) records for one experiment of ``configs/experiment/``:

* ``sources``: where the official command and the script defaults were read (repository, commit,
  file, lines); ``expected``: the result to expect and its source;
* ``flags``: every official flag and value that defines the recipe (given by the command or a
  script default), each with its ``source`` (file:line) and either the bitrain config ``key``
  (one key or a list) that carries it, or ``unmapped`` (why no key is needed). ``bitrain`` is the
  value bitrain must resolve to when it is written differently from the official one (``--crop_pct
  None`` -> ``0.875``); ``differs`` marks a deliberate difference and gives the reason;
* ``bitrain_only``: keys the experiment sets that carry no official flag (logging cadence,
  checkpoints, the per-device batch), each with a note;
* ``paper_vs_code``: where the paper and the official code disagree, which one bitrain follows
  and why.

A card may start from a ``base`` card (``_beit_finetune`` holds ``run_class_finetuning.py``'s
defaults once); its own ``flags`` replace the base's entries of the same flag.

:func:`check_card` compares a card with the experiment's resolved Hydra config: every mapped flag
must resolve to its value, and every key the experiment file sets must be mapped by a flag or
listed in ``bitrain_only``. ``scripts/make_recipes_doc.py`` renders the cards as
``docs/recipes.md`` (:func:`render_markdown`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CARDS_DIR",
    "Card",
    "CardError",
    "Flag",
    "check_card",
    "experiment_keys",
    "load_card",
    "load_cards",
    "render_markdown",
]

ROOT = Path(__file__).resolve().parents[2]
CARDS_DIR = ROOT / "configs" / "recipes"
EXPERIMENTS_DIR = ROOT / "configs" / "experiment"
_FLAG_FIELDS = {"flag", "value", "source", "key", "bitrain", "differs", "note", "unmapped"}
_CARD_FIELDS = {
    "experiment",
    "entry",
    "title",
    "base",
    "sources",
    "expected",
    "flags",
    "bitrain_only",
    "paper_vs_code",
    "run",
}
_MISSING = object()


class CardError(ValueError):
    """A recipe card is malformed (names the file and the field)."""


@dataclass(frozen=True)
class Flag:
    """One official flag (or hard-coded setting) and where bitrain keeps it."""

    flag: str
    value: Any
    source: str
    keys: tuple[str, ...] = ()
    bitrain: Any = _MISSING
    differs: str | None = None
    note: str | None = None
    unmapped: str | None = None

    @property
    def expected(self) -> Any:
        """The value bitrain's config must resolve to (a mapping key -> value when per key)."""
        return self.value if self.bitrain is _MISSING else self.bitrain

    def expected_for(self, key: str) -> Any:
        """The value bitrain's ``key`` must resolve to."""
        expected = self.expected
        return expected[key] if isinstance(expected, Mapping) else expected


@dataclass
class Card:
    """A recipe card (see the module docstring)."""

    path: Path
    experiment: str
    entry: str
    title: str
    sources: list[dict[str, Any]]
    expected: list[dict[str, Any]]
    flags: list[Flag]
    run: str = ""
    bitrain_only: list[dict[str, str]] = field(default_factory=list)
    paper_vs_code: list[dict[str, str]] = field(default_factory=list)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CardError(f"recipe card '{path}' is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise CardError(f"recipe card '{path}' must be a mapping, got {type(data).__name__}")
    unknown = set(data) - _CARD_FIELDS
    if unknown:
        raise CardError(f"recipe card '{path}': unknown fields {sorted(unknown)}")
    return data


def _flag(path: Path, raw: Any) -> Flag:
    if not isinstance(raw, dict) or "flag" not in raw:
        raise CardError(f"recipe card '{path}': every flags entry needs 'flag', got {raw!r}")
    name = raw["flag"]
    unknown = set(raw) - _FLAG_FIELDS
    if unknown:
        raise CardError(f"recipe card '{path}', flag {name}: unknown fields {sorted(unknown)}")
    for needed in ("value", "source"):
        if needed not in raw:
            raise CardError(f"recipe card '{path}', flag {name}: '{needed}' is missing")
    key = raw.get("key")
    keys = (key,) if isinstance(key, str) else tuple(key or ())
    if bool(keys) == bool(raw.get("unmapped")):
        raise CardError(
            f"recipe card '{path}', flag {name}: give either 'key' (the bitrain config key that "
            "carries it) or 'unmapped' (why none is needed), not both or neither"
        )
    flag = Flag(
        flag=str(name),
        value=raw["value"],
        source=str(raw["source"]),
        keys=keys,
        bitrain=raw.get("bitrain", _MISSING),
        differs=raw.get("differs"),
        note=raw.get("note"),
        unmapped=raw.get("unmapped"),
    )
    if isinstance(flag.bitrain, Mapping) and set(flag.bitrain) != set(keys):
        raise CardError(
            f"recipe card '{path}', flag {name}: a per-key 'bitrain' mapping must name exactly "
            f"the keys {list(keys)}, got {sorted(flag.bitrain)}"
        )
    if flag.bitrain is not _MISSING and not (flag.differs or flag.note):
        raise CardError(
            f"recipe card '{path}', flag {name}: a 'bitrain' value needs a 'note' (why it is the "
            "same setting) or 'differs' (why it is not)"
        )
    return flag


def load_card(path: str | Path) -> Card:
    """Read and validate one card (with its ``base``).

    Raises:
        CardError: malformed card, naming the file and the field.
    """
    path = Path(path)
    data = _read(path)
    for needed in ("experiment", "entry", "title", "sources", "expected", "flags"):
        if needed not in data:
            raise CardError(f"recipe card '{path}': '{needed}' is missing")
    if data["entry"] not in ("pretrain", "finetune"):
        raise CardError(f"recipe card '{path}': entry must be pretrain or finetune")
    flags: dict[str, Flag] = {}
    if base := data.get("base"):
        base_path = path.with_name(f"{base}.yaml")
        if not base_path.is_file():
            raise CardError(f"recipe card '{path}': base '{base}' not found at '{base_path}'")
        for raw in _read(base_path).get("flags", []):
            flag = _flag(base_path, raw)
            flags[flag.flag] = flag
    own = [_flag(path, raw) for raw in data["flags"]]
    names = [f.flag for f in own]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CardError(f"recipe card '{path}': flags listed twice: {dup}")
    flags.update({f.flag: f for f in own})
    return Card(
        path=path,
        experiment=str(data["experiment"]),
        entry=str(data["entry"]),
        title=str(data["title"]),
        sources=list(data["sources"]),
        expected=list(data["expected"]),
        flags=list(flags.values()),
        run=str(data.get("run", "")),
        bitrain_only=list(data.get("bitrain_only") or []),
        paper_vs_code=list(data.get("paper_vs_code") or []),
    )


def load_cards(directory: str | Path = CARDS_DIR) -> list[Card]:
    """Every card of ``directory`` (files starting with ``_`` are bases), sorted by name."""
    return [load_card(p) for p in sorted(Path(directory).glob("*.yaml")) if p.name[0] != "_"]


# --- comparison with a resolved config -------------------------------------------------------


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def same_value(ours: Any, official: Any) -> bool:
    """Equal as recipe values: numbers to 1e-9 relative, sequences element-wise, bools strictly."""
    ours, official = _plain(ours), _plain(official)
    if isinstance(ours, bool) or isinstance(official, bool):
        return type(ours) is type(official) and ours == official
    if isinstance(ours, int | float) and isinstance(official, int | float):
        return math.isclose(ours, official, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(ours, Sequence) and not isinstance(ours, str):
        return (
            isinstance(official, Sequence)
            and not isinstance(official, str)
            and len(ours) == len(official)
            and all(same_value(a, b) for a, b in zip(ours, official))
        )
    return ours == official


def _leaves(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, Mapping):
        out = []
        for key, value in node.items():
            out += _leaves(value, f"{prefix}{key}.")
        return out
    return [prefix[:-1]]


def experiment_keys(experiment: str, directory: Path = EXPERIMENTS_DIR) -> set[str]:
    """Leaf keys set by ``experiment``'s YAML and the experiments it extends (its recipe)."""
    path = directory / f"{experiment}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    keys: set[str] = set()
    for entry in data.pop("defaults", []) or []:
        if isinstance(entry, str) and entry != "_self_":  # another experiment of the folder
            keys |= experiment_keys(entry, directory)
    data.pop("task_name", None)
    return keys | set(_leaves(data))


def check_card(card: Card, cfg: Any) -> list[str]:
    """Mismatches between ``card`` and the experiment's resolved config ``cfg`` (empty: equal).

    Each message names the official flag (or the unmapped key) and both values.
    """
    from omegaconf import OmegaConf

    problems = []
    mapped: set[str] = set()
    for flag in card.flags:
        for key in flag.keys:
            mapped.add(key)
            ours = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=True)
            if ours is _MISSING:
                problems.append(f"{flag.flag}: bitrain key '{key}' does not exist in the config")
            elif not same_value(ours, flag.expected_for(key)):
                problems.append(
                    f"{flag.flag}: bitrain '{key}' = {_plain(ours)!r}, the card says "
                    f"{flag.expected_for(key)!r} (official {flag.value!r})"
                )
    covered = mapped | {str(item["key"]) for item in card.bitrain_only}
    for key in sorted(experiment_keys(card.experiment)):
        if not any(key == c or key.startswith(c + ".") for c in covered):
            problems.append(
                f"experiment {card.experiment} sets '{key}', which no flag of the card maps "
                "(add the official flag, or a bitrain_only entry saying why there is none)"
            )
    return problems


# --- rendering ---------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is _MISSING:
        return ""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value).replace("|", "\\|")


def _cell(text: str | None) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")


def _source_line(src: Mapping[str, Any]) -> str:
    lines = f" lines {src['lines']}" if src.get("lines") else ""
    what = f" ({src['what']})" if src.get("what") else ""
    return f"`{src['repo']}` `{src['file']}`{lines} at `{str(src['commit'])[:7]}`{what}"


def render_card(card: Card) -> list[str]:
    """The markdown section of one card."""
    same = sum(1 for f in card.flags if f.keys and not f.differs)
    differ = sum(1 for f in card.flags if f.differs)
    unmapped = sum(1 for f in card.flags if not f.keys)
    out = [f"## {card.experiment}", "", card.title, ""]
    if card.run:
        out += ["```bash", card.run.strip(), "```", ""]
    out += ["Sources: " + "; ".join(_source_line(s) for s in card.sources) + ".", ""]
    for item in card.expected:
        out.append(f"- Expected: **{_cell(item['value'])}** {_cell(item['metric'])} "
                   f"({_cell(item['source'])})")  # fmt: skip
    out += [
        "",
        f"{same} settings identical, {differ} deliberately different, {unmapped} without a "
        "bitrain key. Card: "
        f"[`configs/recipes/{card.path.name}`](../configs/recipes/{card.path.name}).",
        "",
        "| official flag | official value | source | bitrain key | bitrain value | same? | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in card.flags:
        keys = "<br>".join(f"`{k}`" for k in f.keys) if f.keys else "—"
        if f.differs:
            verdict, note = "**differs**", f.differs
        elif not f.keys:
            verdict, note = "n/a", f.unmapped
        else:
            verdict, note = "yes", f.note
        if not f.keys:
            ours = "—"
        elif isinstance(f.expected, Mapping):
            ours = "<br>".join(_fmt(f.expected[k]) for k in f.keys)
        else:
            ours = _fmt(f.expected)
        out.append(
            f"| `{_cell(f.flag)}` | {_fmt(f.value)} | {_cell(f.source)} | {keys} | {ours} "
            f"| {verdict} | {_cell(note)} |"
        )
    if card.bitrain_only:
        out += ["", "Set by bitrain only (no official flag):", ""]
        out += [f"- `{item['key']}`: {_cell(item['note'])}" for item in card.bitrain_only]
    if card.paper_vs_code:
        out += ["", "Where the paper (or the command) and the official code disagree:", ""]
        for item in card.paper_vs_code:
            out.append(
                f"- **{_cell(item['item'])}**: paper / command: {_cell(item['paper'])}; code: "
                f"{_cell(item['code'])}. bitrain follows {_cell(item['follows'])}: "
                f"{_cell(item['why'])}"
            )
    return out + [""]


HEADER = """# Recipes: bitrain's experiments against the official commands

<!-- Generated by scripts/make_recipes_doc.py from configs/recipes/*.yaml; do not edit by hand.
     tests/unit/test_recipes.py fails when this file and the cards disagree. -->

Every experiment of `configs/experiment/` has a recipe card in `configs/recipes/`: the official
command's flags and values with the file, line and commit they were read from, the bitrain config
key that carries each one, and the deliberate differences with their reasons.
`tests/unit/test_recipes.py` composes every experiment with Hydra and fails, naming the flag, when a
resolved value differs from its card, or when the experiment sets a key that no flag of its card
maps. The tables below are generated from the cards (`python scripts/make_recipes_doc.py`).

How to read a row: **yes** = bitrain resolves to the official value (the note says when it is
written differently, e.g. `--crop_pct None` is 224/256 below 384 px); **differs** = a deliberate
difference, with the reason; **n/a** = an official flag with no bitrain key (the note says why none
is needed). None of these runs were made by bitrain (no GPU here): the expected results are the
official ones, with their sources.
"""


def render_markdown(cards: Sequence[Card]) -> str:
    """``docs/recipes.md``: the header, a contents list, one section per card."""
    out = [HEADER.rstrip(), "", "Experiments:", ""]
    out += [f"- [`{c.experiment}`](#{c.experiment}): {_cell(c.title)}" for c in cards]
    out.append("")
    for card in cards:
        out += render_card(card)
    return "\n".join(out)
