"""Reading and writing DALL-E dVAE weights: what the encoder and the decoder files share.

OpenAI's ``encoder.pkl`` and ``decoder.pkl`` are pickled ``dall_e`` modules, read through
:func:`bitrain.io.load_pickled_module` (only the listed classes, as inert records); state dicts in
``.safetensors`` or ``.pt``/``.pth`` may use our parameter names or DALL-E's ``w``/``b``. The
architecture is always inferred from the tensors (the caller's ``infer``); attributes a pickle
records must agree with it. :class:`DallEFile` holds what differs between the two files, and
:func:`load_module` / :func:`save_module` are the loading and saving both modules use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from bitrain.io import (
    CheckpointError,
    PickledModule,
    atomic_save,
    atomic_write_bytes,
    flatten_module_state,
    load_pickled_module,
)

__all__ = [
    "DallEFile",
    "conv_layout",
    "dall_e_key_to_native",
    "is_safetensors",
    "load_module",
    "native_key_to_dall_e",
    "save_module",
]

M = TypeVar("M", bound=nn.Module)
Infer = Callable[[Mapping[str, torch.Tensor], Path], dict[str, int]]


@dataclass(frozen=True)
class DallEFile:
    """What tells one kind of DALL-E weights file from the other.

    Attributes:
        noun: ``"encoder"`` or ``"decoder"``: the pickled class is ``dall_e.<noun>.<Noun>`` and
            OpenAI's file ``<noun>.pkl``.
        pickle_classes: the only globals a pickled file may name.
        hparams: the architecture's hyper-parameter names (also attributes of the pickle).
        config_key: the config key that points at the file, named in error messages.
        missing_hint: how to get the file, said when there is none.
        mismatch_advice: what to do when the file's architecture differs from the config.
        mistaken: ``(marker, advice)``: when a refused pickle's message holds ``marker``,
            ``advice`` is added to it (the other kind of file was given).
    """

    noun: str
    pickle_classes: tuple[str, ...]
    hparams: tuple[str, ...]
    config_key: str
    missing_hint: str
    mismatch_advice: str
    mistaken: tuple[str, str] | None = None

    @property
    def what(self) -> str:
        """``"DALL-E encoder"`` / ``"DALL-E decoder"``, for messages."""
        return f"DALL-E {self.noun}"

    @property
    def class_path(self) -> str:
        """The class a pickled file must hold (``dall_e.encoder.Encoder`` ...)."""
        return f"dall_e.{self.noun}.{self.noun.capitalize()}"


def dall_e_key_to_native(key: str) -> str:
    """``blocks.input.w`` -> ``blocks.input.weight`` (and ``.b`` -> ``.bias``); others unchanged."""
    if key.endswith(".w"):
        return key[:-2] + ".weight"
    if key.endswith(".b"):
        return key[:-2] + ".bias"
    return key


def native_key_to_dall_e(key: str) -> str:
    """Inverse of :func:`dall_e_key_to_native`."""
    if key.endswith(".weight"):
        return key[: -len(".weight")] + ".w"
    if key.endswith(".bias"):
        return key[: -len(".bias")] + ".b"
    return key


def is_safetensors(path: Path) -> bool:
    """Content sniff: 8-byte little-endian header length, then a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 2 <= n <= path.stat().st_size - 8


def _read_pickle(
    path: Path, spec: DallEFile, check_pickle: Callable[[PickledModule, Path], None] | None
) -> tuple[Mapping[str, object], dict[str, int]]:
    """Tensors of a pickled module or state dict, and the hparams a pickled module records."""
    try:
        obj = load_pickled_module(path, spec.pickle_classes, what=spec.what, allow_state_dict=True)
    except CheckpointError as err:
        if spec.mistaken is not None and spec.mistaken[0] in str(err):
            raise CheckpointError(f"{err}. {spec.mistaken[1]}") from err
        raise
    if not isinstance(obj, PickledModule):
        return obj, {}
    if obj.class_path != spec.class_path:
        raise CheckpointError(
            f"'{path}' holds a pickled {obj.class_path}, not a {spec.class_path}; "
            f"point {spec.config_key} at DALL-E's {spec.noun}.pkl"
        )
    if check_pickle is not None:
        check_pickle(obj, path)
    # The pickles record their attrs fields; group_count is a class attribute there.
    recorded: dict[str, int] = {}
    for k in spec.hparams:
        value = obj.state.get(k)
        if isinstance(value, int) and not isinstance(value, bool):
            recorded[k] = value
    return flatten_module_state(obj), recorded


def _read_state(
    path: Path,
    spec: DallEFile,
    infer: Infer,
    check_pickle: Callable[[PickledModule, Path], None] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Tensors of a weights file in native naming, and its architecture (see :func:`load_module`).

    The architecture comes from tensor names and shapes; a pickled module also records it as
    attributes (``n_hid``, ``vocab_size`` ...), which must agree with the shapes.
    """
    if is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: Mapping[str, object] = load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"could not read {spec.what} '{path}': {err}") from err
        recorded: dict[str, int] = {}
    else:
        raw, recorded = _read_pickle(path, spec, check_pickle)
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"'{path}' is not a {spec.what} state dict: entry {key!r} is a "
                f"{type(value).__name__}, expected a tensor under a string key"
            )
        native = dall_e_key_to_native(key)
        if native in state:
            raise CheckpointError(f"'{path}' holds '{native}' twice (in both namings)")
        state[native] = value
    inferred = infer(state, path)
    odd = {k: (v, inferred[k]) for k, v in recorded.items() if v != inferred[k]}
    if odd:  # build from the tensors, never from attributes alone (a crafted n_hid=10**9)
        raise CheckpointError(
            f"'{path}' is inconsistent: its attributes and tensor shapes disagree on "
            + ", ".join(f"{k} ({a} vs {b})" for k, (a, b) in odd.items())
        )
    return state, inferred


def conv_layout(
    state: Mapping[str, torch.Tensor], path: Path, what: str
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The input and output conv weights, the number of groups and of blocks per group.

    Args:
        state: tensors in native naming.
        path: the file, for messages.
        what: ``"DALL-E encoder"`` ..., for messages.

    Raises:
        CheckpointError: either conv is missing or not 4-D.
    """
    for key in ("blocks.input.weight", "blocks.output.conv.weight"):
        if key not in state:
            raise CheckpointError(
                f"'{path}' is not a {what}: it has no '{key}' (nor its DALL-E name "
                f"'{native_key_to_dall_e(key)}'); found {sorted(state)[:5]}..."
            )
    first, last = state["blocks.input.weight"], state["blocks.output.conv.weight"]
    if first.ndim != 4 or last.ndim != 4:
        raise CheckpointError(f"'{path}' is not a {what}: its convolutions are not 4-D")
    groups = {k.split(".")[1] for k in state if k.startswith("blocks.group_")}
    blocks = {k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")}
    return first, last, len(groups), len(blocks)


def load_module(
    path: str | os.PathLike,
    spec: DallEFile,
    expected: Mapping[str, int],
    *,
    infer: Infer,
    build: Callable[[dict[str, int], Path], M],
    check_pickle: Callable[[PickledModule, Path], None] | None = None,
) -> M:
    """Build a module from a DALL-E pickle, ``.safetensors`` or ``.pt``/``.pth`` file.

    Args:
        path: the weights file; its format is detected from its content.
        spec: which kind of file it is.
        expected: hyper-parameters the caller was configured with; each must equal the file's.
        infer: the architecture from native-named tensors (raises CheckpointError).
        build: the module of an architecture (and the file, for messages).
        check_pickle: further checks of a pickled module (raises CheckpointError).

    Raises:
        FileNotFoundError: no file at ``path`` (the message says where to get it).
        ValueError: the file's architecture differs from ``expected``.
        CheckpointError: the file is unsafe, corrupt, or its tensors do not fit the architecture.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{spec.what} weights not found: expected a file at '{path}'. {spec.missing_hint}"
        )
    state, hparams = _read_state(path, spec, infer, check_pickle)
    wrong = {k: (v, hparams[k]) for k, v in expected.items() if k in hparams and hparams[k] != v}
    if wrong:
        listed = ", ".join(
            f"{k}={want} in the config but {got} in the file" for k, (want, got) in wrong.items()
        )
        raise ValueError(
            f"{spec.what} '{path}' does not match the tokenizer config: {listed}. "
            + spec.mismatch_advice
        )
    module = build(hparams, path)
    _copy_strict(module, state, path, spec)
    return module


def _copy_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, spec: DallEFile
) -> None:
    """Copy every tensor into ``module``, or fail listing what is missing, extra or misshapen."""
    own = module.state_dict()
    problems = [f"missing '{k}'" for k in own if k not in state]
    problems += [f"unexpected '{k}'" for k in state if k not in own]
    problems += [
        f"'{k}' is {tuple(state[k].shape)} in the file but {tuple(v.shape)} in the {spec.noun}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (
            f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        )
        raise CheckpointError(f"{spec.what} '{path}' does not fit {module.hparams}: {shown}")
    module.load_state_dict({k: v.float() for k, v in state.items()})


def save_module(module: nn.Module, path: str | os.PathLike, noun: str) -> Path:
    """Write ``module``'s weights (our names) atomically.

    A ``*.safetensors`` path gets safetensors (format ``bitrain.dall_e_<noun>`` and the
    architecture as metadata), anything else a ``torch.save`` of the state dict; both load back
    without unpickling any code.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        meta = {
            "format": f"bitrain.dall_e_{noun}",
            **{k: str(v) for k, v in module.hparams.items()},
        }
        return atomic_write_bytes(path, save(state, metadata=meta))
    return atomic_save(state, path)
