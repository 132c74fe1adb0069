"""Initialise a classifier from any checkpoint, as the official fine-tuning script does.

:func:`adapt_state_dict` makes an encoder's weights fit the classifier as unilm's
``run_class_finetuning.py`` does: drop ``mask_token``, ``lm_head.*``, ``relative_position_index``
(and the final ``norm.*`` under mean pooling), copy a shared relative position bias into every
block, resize relative position tables (timm's ``checkpoint_filter_fn``: the official geometric
interpolation without scipy) and absolute position embeddings to a new patch grid, keep the head
only when its shape matches. Anything else that does not fit is an error listing the keys.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from bitrain.checkpoints.formats import read_hf
from bitrain.checkpoints.hf import read_folder
from bitrain.checkpoints.official import some_keys
from bitrain.checkpoints.sniff import sniff, state_of
from bitrain.io import CheckpointError
from bitrain.models.classifier import create_classifier

log = logging.getLogger(__name__)

# Keys a pretraining checkpoint has and a classifier never uses.
_PRETRAINING_ONLY = re.compile(r"^(mask_token|lm_head\..*|.*relative_position_index)$")
_HEAD = re.compile(r"^(head|head\.fc|fc|classifier)\.(weight|bias)$")


def load_encoder_state(
    path_or_dir: str | os.PathLike, use_ema: bool = False
) -> tuple[dict[str, torch.Tensor], str]:
    """``(state_dict in timm names, format)`` of any checkpoint, pretraining-only keys kept.

    ``use_ema``: a bitrain run's EMA, or an official file's ``model_ema`` when it has one.
    """
    found = sniff(path_or_dir)
    if found.format == "hf":
        return read_hf(found.path)[0], "hf"
    if found.format == "timm" and found.path.is_dir():
        return read_folder(found.path)[0], "timm"
    return state_of(found, use_ema), found.format


def _head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's classification head (timm's ``get_classifier``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return {k for k in model.state_dict() if _HEAD.match(k)}
    ids = {id(p) for p in head.parameters()}
    return {k for k, p in model.named_parameters() if id(p) in ids}


def adapt_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(state dict that fits model, notes)`` of an encoder's; notes say what was changed."""
    notes: list[str] = []
    target = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    dropped = sorted(k for k in state if _PRETRAINING_ONLY.match(k))
    out = {k: v for k, v in state.items() if k not in dropped}
    if dropped:
        notes.append(f"dropped pretraining-only keys {some_keys(dropped)}")

    mean_pooling = isinstance(getattr(model, "norm", None), nn.Identity) and isinstance(
        getattr(model, "fc_norm", None), nn.LayerNorm
    )
    if mean_pooling and "norm.weight" in out and "norm.weight" not in target:
        out.pop("norm.weight")
        out.pop("norm.bias", None)
        notes.append("dropped the final norm (mean pooling uses a fresh fc_norm)")

    shared = "rel_pos_bias.relative_position_bias_table"
    blocks = getattr(model, "blocks", [])
    per_block = [f"blocks.{i}.attn.relative_position_bias_table" for i in range(len(blocks))]
    if shared in out and shared not in target and per_block and per_block[0] in target:
        table = out.pop(shared)
        for key in per_block:
            out[key] = table.clone()
        notes.append(f"expanded the shared relative position bias to {len(per_block)} blocks")

    pos = out.get("pos_embed")
    if isinstance(model, timm.models.beit.Beit):
        before = {k: tuple(v.shape) for k, v in out.items()}
        out = timm.models.beit.checkpoint_filter_fn(out, model)
        resized = sorted(k for k, v in out.items() if before.get(k) != tuple(v.shape))
        if resized:
            notes.append(f"resized to the new patch grid: {some_keys(resized)}")
    elif pos is not None and "pos_embed" in target and pos.shape != target["pos_embed"].shape:
        out["pos_embed"] = resample_abs_pos_embed(
            pos,
            new_size=model.patch_embed.grid_size,
            num_prefix_tokens=getattr(model, "num_prefix_tokens", 1),
        )
        notes.append("resampled pos_embed to the new patch grid")

    heads = _head_keys(model)
    mismatched = [k for k in heads if k in out and tuple(out[k].shape) != tuple(target[k].shape)]
    if mismatched:
        key = mismatched[0]
        notes.append(
            f"head left fresh: checkpoint {key} {tuple(out[key].shape)} != model "
            f"{tuple(target[key].shape)} (other classes)"
        )
        for k in heads:
            out.pop(k, None)
    return out, notes


def build_classifier(
    model_name: str,
    num_classes: int,
    pretrained: str | os.PathLike | None = None,
    pretrained_strict: bool = True,
    **timm_kwargs: Any,
) -> nn.Module:
    """``create_classifier``, initialised from the checkpoint ``pretrained`` (None: random).

    The fine-tuning configs' ``model`` node (``configs/model/cls/*.yaml``).
    """
    model = create_classifier(model_name, num_classes, **timm_kwargs)
    if pretrained not in (None, ""):
        load_pretrained(model, pretrained, strict=pretrained_strict)
    return model


def load_pretrained(
    model: nn.Module, path: str | os.PathLike, strict: bool = True
) -> dict[str, list[str]]:
    """Initialise ``model`` from any checkpoint: ``{"missing", "unexpected", "notes"}`` lists.

    ``strict=False`` loads what fits and warns where encoder keys are missing, left over or of
    another shape (the head excepted); a checkpoint of which nothing fits is always an error.
    """
    path = Path(path).expanduser()
    state, fmt = load_encoder_state(path)
    where = f"{fmt} checkpoint '{path}'"
    adapted, notes = adapt_state_dict(state, model)
    target = model.state_dict()
    wrong_shape = [
        f"{k} {tuple(v.shape)} != {tuple(target[k].shape)}"
        for k, v in sorted(adapted.items())
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    reshaped = {item.split(" ", 1)[0] for item in wrong_shape}
    for key in reshaped:
        adapted.pop(key)
    result = model.load_state_dict(adapted, strict=False)
    fresh = _head_keys(model) | reshaped
    missing = sorted(
        k for k in result.missing_keys if k not in fresh and not k.startswith("fc_norm.")
    )
    unexpected = sorted(result.unexpected_keys)
    problems = [
        f"{what}: {some_keys(keys)}"
        for what, keys in (
            ("missing from the checkpoint", missing),
            ("not in the model", unexpected),
            ("shape mismatch", wrong_shape),
        )
        if keys
    ]
    name = getattr(model, "bitrain_spec", {}).get("model_name")
    if problems:
        message = f"{where} does not fit {type(model).__name__}({name or '?'}): " + "; ".join(
            problems
        )
        if strict:
            raise CheckpointError(
                message + ". Check model.* against the checkpoint (size, patch size, relative "
                "position bias), or pass model.pretrained_strict=false to load what fits"
            )
        log.warning("%s (loaded what fits)", message)
    loaded = sorted(k for k in adapted if k in target)
    if not loaded:
        raise CheckpointError(
            f"{where}: none of its {len(state)} tensors fits {name or type(model).__name__} "
            f"(checkpoint keys {some_keys(sorted(state))}; model keys {some_keys(sorted(target))}):"
            " it is not this model's encoder. Check model.pretrained and model.model_name"
        )
    for note in notes:
        log.info("%s: %s", where, note)
    log.info("initialised %d of the model's %d tensors from %s", len(loaded), len(target), where)
    return {"missing": missing, "unexpected": unexpected, "notes": notes}
