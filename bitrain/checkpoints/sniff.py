"""Tell a checkpoint's format and kind with one read: :func:`sniff`.

Formats: ``bitrain`` (a Lightning ``.ckpt`` of ``bitrain.pretrain`` / ``bitrain.finetune``, or an
export in that layout), ``official`` (unilm ``{"model": ..., "args": Namespace}``), ``hf``, ``timm``
(a hub folder, or a bare state dict / ``.safetensors``). Kinds: ``mim``, ``classifier``,
``backbone`` (a head-less HF model), ``weights`` (a bare state dict that does not say). The loaded
object travels in the result, so the weights are not read a second time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bitrain.checkpoints.hf import architecture, read_json, read_weights
from bitrain.checkpoints.official import some_keys
from bitrain.io import CheckpointError, load_torch_file

# The ``_target_`` of ``hyper_parameters["model"]`` in bitrain checkpoints, compared as strings:
# a checkpoint never chooses the class that is built.
BEIT_MIM_TARGET = "bitrain.models.beit.BeitMIM"
CLASSIFIER_TARGETS = (
    "bitrain.models.classifier.create_classifier",  # exports: the architecture alone
    "bitrain.checkpoints.build_classifier",  # fine-tuning runs: the architecture + its init
)
_HELP = (
    "expected a bitrain .ckpt, an official BEiT .pth (github.com/microsoft/unilm/tree/master/"
    "beit), a timm .pth/.safetensors, or a Hugging Face / timm model folder"
)


@dataclass
class Sniffed:
    """What :func:`sniff` found; ``obj``: the loaded dict, or a folder's ``config.json``."""

    path: Path
    format: str
    kind: str
    obj: Any = field(default=None, repr=False)


def is_tensor_mapping(obj: Any) -> bool:
    """A non-empty mapping of tensors (a state dict)."""
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _weights_kind(state: Mapping[str, Any], heads: tuple[str, ...] = ()) -> str:
    keys = {str(k).removeprefix("module.") for k in state}
    return "mim" if "lm_head.weight" in keys else "classifier" if keys & set(heads) else "weights"


def sniff(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> Sniffed:
    """The format and kind of the checkpoint at ``path``, read once, weights-only.

    ``mmap=True`` maps the tensors (for callers that only need records).

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: unreadable, unsafe, or none of the known layouts.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: '{path}' ({_HELP})")
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"'{path}' is a folder without config.json ({_HELP})")
        config = read_json(cfg)
        if "architecture" in config and "architectures" not in config:
            return Sniffed(path, "timm", "classifier", config)  # timm's push_to_hub layout
        return Sniffed(path, "hf", architecture(config, f"'{cfg}'")[2], config)
    if path.suffix == ".safetensors":
        state = read_weights(path)
        return Sniffed(path, "timm", _weights_kind(state), state)
    obj = load_torch_file(path, map_location=map_location, allow_namespace=True, mmap=mmap)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a checkpoint dict")
    if "state_dict" in obj and "hyper_parameters" in obj:
        hparams = obj["hyper_parameters"]
        model_cfg = hparams.get("model") if isinstance(hparams, Mapping) else None
        if not isinstance(model_cfg, Mapping):
            raise CheckpointError(
                f"bitrain checkpoint '{path}' has no hyper_parameters['model'] (found "
                f"{some_keys(hparams) if isinstance(hparams, Mapping) else type(hparams).__name__})"
            )
        target = model_cfg.get("_target_", BEIT_MIM_TARGET)
        if target not in (BEIT_MIM_TARGET, *CLASSIFIER_TARGETS):
            raise CheckpointError(
                f"bitrain checkpoint '{path}' holds a {target!r}, neither a BEiT MIM model "
                f"({BEIT_MIM_TARGET}) nor a classifier ({CLASSIFIER_TARGETS[0]})"
            )
        return Sniffed(path, "bitrain", "mim" if target == BEIT_MIM_TARGET else "classifier", obj)
    for key in ("model", "module"):
        if is_tensor_mapping(obj.get(key)):
            return Sniffed(path, "official", _weights_kind(obj[key], ("head.weight",)), obj)
    state = obj["state_dict"] if is_tensor_mapping(obj.get("state_dict")) else obj
    if is_tensor_mapping(state):
        return Sniffed(path, "timm", _weights_kind(state), obj)
    raise CheckpointError(
        f"'{path}' is not a model checkpoint ({_HELP}); found keys {some_keys(obj)}"
    )


def state_of(found: Sniffed, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a sniffed file (not a folder).

    bitrain: the model (``model.*``) or its EMA (``ema.module.*``); else the official ``model`` /
    ``module`` (``model_ema`` first with ``use_ema``), a ``state_dict``, or the file itself.
    """
    obj = found.obj
    if found.format == "bitrain":
        prefix = "ema.module." if use_ema else "model."
        state = {k[len(prefix) :]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
        if not state:
            what = "EMA weights (ema.module.*): was the run trained with task.ema?"
            what = what if use_ema else f"model.* weights; found {some_keys(obj['state_dict'])}"
            raise CheckpointError(f"bitrain checkpoint '{found.path}' has no {what}")
        return state
    keys = ("model_ema",) if use_ema and found.format == "official" else ()
    key = next(
        (k for k in (*keys, "model", "module", "state_dict") if is_tensor_mapping(obj.get(k))), None
    )
    return dict(obj if key is None else obj[key])
