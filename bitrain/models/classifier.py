"""Fine-tuning models: plain timm classifiers, initialised from a pretraining (or any) checkpoint.

A fine-tuned bitrain model is a timm model (``timm.create_model``), so its weights load in timm
and export to Hugging Face. BEiT fine-tuning (``unilm/beit/run_class_finetuning.py``) uses
``beit_*`` with ``global_pool="avg"`` (mean pooling of the patch tokens, then ``fc_norm``), a fresh
head whose initial weights are scaled by ``head_init_scale`` (the official ``--init_scale``,
0.001), per-block relative position biases and layer scale.

:func:`adapt_state_dict` turns an encoder state dict into one that fits the classifier, as the
official fine-tuning script does:

* drop what only pretraining has: ``mask_token``, ``lm_head.*``, ``relative_position_index``
  buffers, and the final ``norm.*`` when the classifier pools by mean (its ``fc_norm`` is new);
* expand a shared relative position bias (``rel_pos_bias.relative_position_bias_table``) into a
  copy per block when the classifier has one table per block;
* resize relative position tables (timm's ``resize_rel_pos_bias_table``: the official geometric
  interpolation without scipy's ``interp2d``; the 3 cls-token entries are kept) and absolute
  position embeddings (``resample_abs_pos_embed``) when the patch grid changes;
* keep the head only if its shape matches the classifier's (same classes), else leave it fresh.

Anything else that does not fit is an error listing the keys (``strict=False`` warns instead).
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
from torch import nn

from bitrain.io import CheckpointError

__all__ = ["adapt_state_dict", "create_classifier", "load_pretrained", "CLASSIFIER_TARGET"]

log = logging.getLogger(__name__)

CLASSIFIER_TARGET = "bitrain.models.classifier.create_classifier"
# Keys a pretraining checkpoint has and a classifier never uses.
_PRETRAINING_ONLY = re.compile(r"^(mask_token|lm_head\..*|.*relative_position_index)$")
_HEAD = re.compile(r"^(head|head\.fc|fc|classifier)\.(weight|bias)$")


def create_classifier(
    model_name: str,
    num_classes: int,
    pretrained: str | os.PathLike | None = None,
    pretrained_strict: bool = True,
    zero_head: bool = False,
    **timm_kwargs: Any,
) -> nn.Module:
    """``timm.create_model(model_name, num_classes=..., **timm_kwargs)``, optionally initialised.

    Args:
        model_name: a timm architecture (``beit_base_patch16_224``, ``vit_base_patch32_224``,
            ``resnetv2_50x1_bit``, ...); never downloads (``pretrained=False`` for timm).
        num_classes: classes of the head.
        pretrained: a checkpoint to initialise from (any format of
            :func:`bitrain.models.checkpoints.load_encoder_state`: bitrain ``.ckpt``, official
            unilm ``.pth``, timm state dict / safetensors, Hugging Face folder); None: random init.
        pretrained_strict: ``False`` loads what fits and warns about the rest.
        zero_head: start the classification head (weight and bias) at zero, as BiT
            (big_transfer ``train.py``: ``zero_head=True``) and ViT fine-tuning (``vit_jax``
            ``models_vit.py``: ``kernel_init=zeros``) do. A head taken from the checkpoint (same
            classes) still overwrites it. An initialisation, so not part of ``bitrain_spec``.
        **timm_kwargs: further model arguments (``img_size``, ``drop_path_rate``,
            ``global_pool``, ``head_init_scale``, ...). ``img_size`` is kept as a record for
            models that take none (ResNets).

    Returns:
        The timm model, with ``bitrain_spec`` = the arguments that rebuild it (no ``pretrained``).
    """
    if int(num_classes) < 1:
        raise ValueError(f"model.num_classes must be >= 1, got {num_classes}")
    kwargs = dict(timm_kwargs)
    try:
        model = _create(model_name, int(num_classes), kwargs)
    except RuntimeError as err:  # timm: unknown model name
        raise ValueError(f"model.model_name={model_name!r}: {err}") from err
    model.bitrain_spec = {"model_name": model_name, "num_classes": int(num_classes), **timm_kwargs}
    if zero_head:
        _zero_head(model)
    if pretrained not in (None, ""):
        load_pretrained(model, pretrained, strict=pretrained_strict)
    return model


def _create(model_name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model``; ``img_size`` is only a record for models without one (CNNs)."""
    try:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as err:
        if "img_size" not in kwargs or "img_size" not in str(err):
            raise
        rest = {k: v for k, v in kwargs.items() if k != "img_size"}
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **rest)
        model.img_size = kwargs["img_size"]  # the training resolution, for data and predict
        return model


def _zero_head(model: nn.Module) -> None:
    """Set every parameter of the classification head (timm's ``get_classifier``) to zero."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    params = list(head.parameters()) if isinstance(head, nn.Module) else []
    if not params:
        raise ValueError(
            f"model.zero_head=true, but {type(model).__name__} has no classification head with "
            "parameters (num_classes > 0 and a timm model with get_classifier() are needed)"
        )
    with torch.no_grad():
        for param in params:
            param.zero_()


def _head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's classification head (timm's ``get_classifier``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return {k for k in model.state_dict() if _HEAD.match(k)}
    ids = {id(p) for p in head.parameters()}
    return {k for k, p in model.named_parameters() if id(p) in ids}


def _uses_mean_pooling(model: nn.Module) -> bool:
    fc_norm = getattr(model, "fc_norm", None)
    return isinstance(getattr(model, "norm", None), nn.Identity) and isinstance(
        fc_norm, nn.LayerNorm
    )


def adapt_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Make an encoder (or classifier) state dict fit ``model`` (see the module docstring).

    Returns:
        ``(state dict for model, notes)``: the notes say what was dropped, expanded or resized.
    """
    notes: list[str] = []
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    dropped = []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if _PRETRAINING_ONLY.match(key):
            dropped.append(key)
            continue
        out[key] = value
    if dropped:
        notes.append(f"dropped pretraining-only keys {_short(sorted(dropped))}")

    if _uses_mean_pooling(model) and "norm.weight" in out and "norm.weight" not in target:
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

    if isinstance(model, timm.models.beit.Beit):
        before = {k: tuple(v.shape) for k, v in out.items()}
        out = timm.models.beit.checkpoint_filter_fn(out, model)
        resized = sorted(k for k, v in out.items() if before.get(k) != tuple(v.shape))
        if resized:
            notes.append(f"resized to the new patch grid: {_short(resized)}")
    elif (
        "pos_embed" in out
        and "pos_embed" in target
        and out["pos_embed"].shape != target["pos_embed"].shape
    ):
        from timm.layers import resample_abs_pos_embed

        prefix = getattr(model, "num_prefix_tokens", 1)
        out["pos_embed"] = resample_abs_pos_embed(
            out["pos_embed"], new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix
        )
        notes.append("resampled pos_embed to the new patch grid")

    heads = _head_keys(model)
    out_shapes = {k: out[k].shape for k in heads if k in out}
    mismatched = [k for k in heads if k in out and tuple(out[k].shape) != tuple(target[k].shape)]
    if mismatched:
        for k in heads:
            out.pop(k, None)
        key = mismatched[0]
        notes.append(
            f"head left fresh: checkpoint {key} {tuple(out_shapes[key])} != model "
            f"{tuple(target[key].shape)} (other classes)"
        )
    return out, notes


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_pretrained(
    model: nn.Module, path: str | os.PathLike, strict: bool = True
) -> dict[str, list[str]]:
    """Initialise ``model`` from the checkpoint at ``path`` (any supported format).

    Args:
        model: the classifier (a timm model).
        path: checkpoint file or Hugging Face folder.
        strict: raise :class:`CheckpointError` when encoder keys are missing or left over, or
            shapes differ (the head excepted); ``False`` loads what fits and warns.

    Returns:
        ``{"missing": [...], "unexpected": [...], "notes": [...]}``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: unreadable, unsafe, or (strict) not matching the model.
    """
    from bitrain.models.checkpoints import load_encoder_state

    path = Path(path).expanduser()
    state, fmt = load_encoder_state(path)
    adapted, notes = adapt_state_dict(state, model)
    target = model.state_dict()
    heads = _head_keys(model)
    wrong_shape = [
        f"{k} {tuple(v.shape)} != {tuple(target[k].shape)}"
        for k, v in sorted(adapted.items())
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    reshaped = {item.split(" ", 1)[0] for item in wrong_shape}
    for key in reshaped:
        adapted.pop(key)
    result = model.load_state_dict(adapted, strict=False)
    missing = sorted(
        k
        for k in result.missing_keys
        if k not in heads and k not in reshaped and not k.startswith("fc_norm.")
    )
    unexpected = sorted(result.unexpected_keys)
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_short(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_short(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatch: {_short(wrong_shape)}")
    where = f"{fmt} checkpoint '{path}'"
    if problems:
        message = (
            f"{where} does not fit {type(model).__name__}"
            f"({getattr(model, 'bitrain_spec', {}).get('model_name', '?')}): " + "; ".join(problems)
        )
        if strict:
            raise CheckpointError(
                message + ". Check model.* against the checkpoint (size, patch size, relative "
                "position bias), or pass model.pretrained_strict=false to load what fits"
            )
        log.warning("%s (loaded what fits)", message)
    for note in notes:
        log.info("%s: %s", where, note)
    log.info("initialised %d tensors from %s", len(adapted), where)
    return {"missing": missing, "unexpected": unexpected, "notes": notes}
