"""BEiT masked-image-modeling weights in three layouts: bitrain, official unilm ``.pth``, HF.

``bitrain``: the Lightning ``.ckpt`` of :mod:`bitrain.tasks.mim` (``{"state_dict": {"model.<key>":
...}, "hyper_parameters": {"model": {"_target_": ..., **kwargs}}, ...}``), which
:func:`save_mim_model` writes with the model only, so one reader serves both; ``official``: what
``unilm/beit/run_beit_pretraining.py`` saves (:mod:`.official`), or a bare state dict; ``hf``: a
``BeitForMaskedImageModeling`` folder (:mod:`.hf`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bitrain.checkpoints.huggingface import read_hf_mim, save_hf_mim
from bitrain.checkpoints.normalization import Normalization, normalization_of, normalization_record
from bitrain.checkpoints.official import from_official, mim_args, mim_kwargs, some_keys, to_official
from bitrain.checkpoints.sniff import BEIT_MIM_TARGET, Sniffed, is_tensor_mapping, sniff, state_of
from bitrain.io import CheckpointError, atomic_save
from bitrain.models.beit import BeitMIM

__all__ = ["FORMATS", "build_mim_model", "load_mim_model", "load_mim_state", "save_mim_model"]

FORMATS: tuple[str, ...] = ("bitrain", "official", "hf")


def load_mim_state(
    path_or_found: str | os.PathLike | Sniffed, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Read any supported MIM checkpoint: ``(BeitMIM state_dict, BeitMIM kwargs, format)``.

    Raises:
        FileNotFoundError: nothing at the path.
        CheckpointError: unknown format, unsafe pickle, or not a BEiT MIM model.
    """
    found = (
        path_or_found if isinstance(path_or_found, Sniffed) else sniff(path_or_found, map_location)
    )
    path, obj = found.path, found.obj
    if found.kind != "mim":
        keys = obj.get("architectures") if found.format == "hf" else some_keys(state_of(found))
        raise CheckpointError(
            f"'{path}' is not a BEiT masked-image-modeling model (a {found.format} {found.kind} "
            f"checkpoint: no lm_head.weight); found {keys}"
        )
    if found.format == "hf":
        return (*read_hf_mim(path), "hf")
    if found.format == "bitrain":
        kwargs = {k: v for k, v in obj["hyper_parameters"]["model"].items() if k != "_target_"}
        return state_of(found), kwargs, "bitrain"
    state = from_official(state_of(found))
    if "mask_token" not in state:
        raise CheckpointError(
            f"'{path}' is not a BEiT masked-image-modeling model (no mask_token); found keys "
            f"{some_keys(state)}"
        )
    args = None if is_tensor_mapping(obj) else obj.get("args")  # a bare state dict has none
    return state, mim_kwargs(state, args), "official"


def build_mim_model(
    state: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any], where: str = "checkpoint"
) -> BeitMIM:
    """``BeitMIM(**kwargs)`` with ``state`` loaded strictly.

    Raises:
        CheckpointError: the arguments are invalid or the weights do not fit them.
    """
    try:
        model = BeitMIM(**kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot build BeitMIM({dict(kwargs)}): {err}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{where} does not match BeitMIM({dict(kwargs)}): {err}") from None
    return model


def load_mim_model(
    path_or_dir: str | os.PathLike | Sniffed, map_location: str | torch.device = "cpu"
) -> BeitMIM:
    """A :class:`BeitMIM` from a bitrain ``.ckpt``, an official ``.pth`` or a HF folder (strict).

    It carries ``bitrain_source_format`` and ``bitrain_normalization`` (the ``(mean, std)`` the file
    records, else None).

    Raises:
        FileNotFoundError: nothing at ``path_or_dir``.
        CheckpointError: unknown format, unsafe file, wrong model, or mismatched weights.
    """
    found = path_or_dir if isinstance(path_or_dir, Sniffed) else sniff(path_or_dir, map_location)
    state, kwargs, fmt = load_mim_state(found, map_location)
    model = build_mim_model(state, kwargs, where=f"{fmt} checkpoint '{found.path}'")
    model.bitrain_source_format = fmt
    model.bitrain_normalization = normalization_of(found)  # None when the file records none
    return model.to(map_location)


def save_mim_model(
    model: BeitMIM,
    path: str | os.PathLike,
    format: str = "bitrain",
    normalization: Normalization | None = None,
) -> Path:
    """Save ``model`` as ``format`` (one of :data:`FORMATS`, the layouts above); returns the path.

    ``normalization`` (default: ``model.bitrain_normalization``) is recorded in every format:
    ``hyper_parameters["normalization"]``, the official ``args`` (also as unilm's
    ``imagenet_default_mean_and_std`` when it can say it), a HF ``preprocessor_config.json``.
    """
    if normalization is None:
        normalization = getattr(model, "bitrain_normalization", None)
    record = None if normalization is None else normalization_record(*normalization)
    if format == "hf":
        return save_hf_mim(model, path, record)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if format == "bitrain":
        hparams: dict[str, Any] = {"model": {"_target_": BEIT_MIM_TARGET, **model.model_kwargs}}
        if record is not None:
            hparams["normalization"] = record
        obj: dict[str, Any] = {
            "state_dict": {f"model.{k}": v for k, v in state.items()},
            "hyper_parameters": hparams,
        }
    elif format == "official":
        obj = {"model": to_official(state), "args": mim_args(model, record)}
    else:
        raise ValueError(f"unknown checkpoint format {format!r}; choose one of {FORMATS}")
    return atomic_save(obj, path)
