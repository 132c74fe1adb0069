"""Hugging Face folders in and out: dispatch by architecture to the BEiT, ViT and BiT tables.

Read: ``BeitForMaskedImageModeling`` -> :class:`~bitrain.models.beit.BeitMIM`;
``BeitForImageClassification``, ``ViTForImageClassification``, ``BitForImageClassification`` (and
the head-less ``BeitModel`` / ``ViTModel`` / ``BitModel``) -> timm classifiers. Written: the same,
in the transformers 4.x key spelling that transformers 4 and 5 both load. Head-less folders may
lack the ``beit.`` / ``vit.`` / ``bit.`` prefix; it is added.

HF's ``layer_norm_eps`` (default 1e-12; timm's BEiT and ViT use 1e-6) and BiT's ``num_groups``
(timm builds 32) are not timm constructor arguments; they are ``create_classifier`` arguments
(``layer_norm_eps`` / ``group_norm_groups``) and part of the spec, so they travel both ways.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from bitrain.checkpoints.hf import (
    HF_LAYER_NORM_EPS,
    architecture,
    label_names,
    read_folder,
    to_4x,
    to_5x,
    with_labels,
    write_folder,
)
from bitrain.checkpoints.hf_beit import beit_from_hf, beit_to_hf
from bitrain.checkpoints.hf_bit import TIMM_GROUPS, bit_from_hf, bit_to_hf
from bitrain.checkpoints.hf_vit import vit_from_hf, vit_to_hf
from bitrain.io import CheckpointError
from bitrain.models.beit import BeitMIM
from bitrain.models.classifier import create_classifier

__all__ = [
    "build_classifier_from_hf",
    "from_hf",
    "from_hf_mim",
    "hf_norm_settings",
    "read_hf_classifier",
    "read_hf_mim",
    "save_hf_classifier",
    "save_hf_mim",
    "to_hf_classifier",
    "to_hf_mim",
]

log = logging.getLogger(__name__)


def from_hf(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """HF weights (4.x or 5.x spelling) -> ``(our state dict, our arguments)``, by architecture.

    A MIM folder gives ``BeitMIM`` keys and kwargs; a classifier (or head-less model) timm keys
    and the ``create_classifier`` spec (``num_classes`` None without a head).

    Raises:
        CheckpointError: another architecture, a config our models cannot be, unknown weights.
    """
    _, family, kind = architecture(config)
    sd = {}
    for key, value in state_dict.items():
        if kind != "mim" and not key.startswith((f"{family}.", "classifier.")):
            key = f"{family}.{key}"  # head-less models are saved without the prefix
        sd[key if family == "bit" else to_5x(key)] = value
    if family == "beit":
        return beit_from_hf(sd, config, "mim" if kind == "mim" else "classifier")
    if family == "vit":
        return vit_from_hf(sd, config)
    return bit_from_hf(sd, config)


def from_hf_mim(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``BeitForMaskedImageModeling`` weights (either spelling) -> ``(BeitMIM state, kwargs)``."""
    return beit_from_hf({to_5x(k): v for k, v in state_dict.items()}, config, "mim")


def _read(folder: str | os.PathLike, want: str) -> tuple[dict, dict[str, Any], dict[str, Any]]:
    state, config, weights = read_folder(folder)
    _, _, kind = architecture(config, f"'{Path(folder) / 'config.json'}'")
    if (kind == "mim") != (want == "mim"):
        raise CheckpointError(
            f"Hugging Face folder '{folder}' holds a {config['architectures']}: "
            + (
                "pretraining (MIM) weights, not a classifier: fine-tune it first with "
                f"`python -m bitrain.finetune model.pretrained={folder}`"
                if kind == "mim"
                else "a classifier, not pretraining (MIM) weights"
            )
        )
    try:
        ours, args = from_hf(state, config)
    except CheckpointError as err:
        raise CheckpointError(f"'{weights}': {err}") from None
    return ours, args, config


def read_hf_mim(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(BeitMIM state dict, BeitMIM kwargs)`` of a ``BeitForMaskedImageModeling`` folder."""
    state, kwargs, _ = _read(folder, "mim")
    return state, kwargs


def read_hf_classifier(
    folder: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """``(create_classifier spec, timm state dict, config)`` of a HF classifier folder."""
    state, spec, config = _read(folder, "classifier")
    return spec, state, config


def hf_norm_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The norm settings of a HF config that timm's constructors cannot take.

    Returns:
        ``{"layer_norm_eps": float}`` (BEiT, ViT) or ``{"group_norm_groups": int}`` (BiT): the
        ``create_classifier`` arguments.
    """
    _, family, _ = architecture(config)
    if family == "bit":
        return {"group_norm_groups": int(config.get("num_groups", TIMM_GROUPS))}
    return {"layer_norm_eps": float(config.get("layer_norm_eps", HF_LAYER_NORM_EPS))}


def build_classifier_from_hf(
    folder: str | os.PathLike, num_classes: int | None = None
) -> nn.Module:
    """A HF image-classifier folder as a timm model in eval mode, with ``label_names``.

    ``create_classifier(**spec, **norm settings)``, then a strict load of the weights.

    Args:
        folder: a folder with ``config.json`` and weights of a classifier or head-less model.
        num_classes: classes of a fresh head, for a head-less folder (``BeitModel`` ...) only.

    Raises:
        FileNotFoundError: no ``config.json`` or weights in the folder.
        CheckpointError: unsupported folder, weights that do not fit, or ``num_classes`` missing
            (head-less folder) / given for a folder that has a head of its own.
    """
    spec, state, config = read_hf_classifier(folder)
    headless = spec["num_classes"] is None
    if headless and num_classes is None:
        raise CheckpointError(
            f"Hugging Face folder '{folder}' ({config['architectures']}) has no classification "
            "head: pass num_classes to build a classifier with a fresh head"
        )
    if not headless and num_classes not in (None, spec["num_classes"]):
        raise CheckpointError(
            f"Hugging Face folder '{folder}' has a {spec['num_classes']}-class head; "
            f"num_classes={num_classes} is only for head-less folders"
        )
    if headless:
        spec["num_classes"] = int(num_classes)
    spec.update(hf_norm_settings(config))
    try:
        model = create_classifier(**spec)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"cannot build the timm model for '{folder}' ({spec}): {err}"
        ) from None
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(
            f"Hugging Face folder '{folder}' does not fit {spec['model_name']}({spec}): {err}"
        ) from None
    fresh = ("head.", "fc_norm.") if headless else ()
    missing = [k for k in result.missing_keys if not (fresh and k.startswith(fresh))]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"Hugging Face folder '{folder}' does not fit {spec['model_name']}({spec}): missing "
            f"{missing[:6]}, unexpected {result.unexpected_keys[:6]}"
        )
    if headless and result.missing_keys:
        log.info("'%s' has no head: left fresh %s", folder, result.missing_keys)
    model.label_names = None if headless else label_names(config, spec["num_classes"])
    return model.eval()


def to_hf_classifier(
    model: nn.Module, label_names: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A timm classifier as HF weights (4.x spelling) and a complete ``config.json`` dict.

    Args:
        model: a timm Beit, VisionTransformer or ResNetV2 (BiT) with a head.
        label_names: class names for ``id2label`` / ``label2id``; default ``LABEL_i``.

    Raises:
        CheckpointError: a model Hugging Face's classifiers cannot represent.
        ValueError: ``label_names`` of the wrong length or with duplicates.
    """
    if isinstance(model, timm.models.beit.Beit):
        state, config = beit_to_hf(model, "classifier")
    elif isinstance(model, timm.models.vision_transformer.VisionTransformer):
        state, config = vit_to_hf(model)
    elif isinstance(model, timm.models.resnetv2.ResNetV2):
        state, config = bit_to_hf(model)
    else:
        raise CheckpointError(
            f"a {type(model).__name__} has no Hugging Face classifier counterpart; supported: "
            "timm Beit, VisionTransformer and ResNetV2 (BiT)"
        )
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module) or not list(head.parameters()):
        raise CheckpointError("the model has no classification head (num_classes=0) to export")
    with_labels(config, int(model.num_classes), label_names)
    return {to_4x(k): v.clone().contiguous() for k, v in state.items()}, config


def save_hf_classifier(
    model: nn.Module,
    folder: str | os.PathLike,
    label_names: list[str] | None = None,
    preprocessor: Mapping[str, Any] | None = None,
) -> Path:
    """Write a classifier folder that ``AutoModelForImageClassification`` loads.

    Args:
        model: see :func:`to_hf_classifier`.
        folder: created if missing; files of the same names are replaced atomically.
        label_names: class names; default: ``model.label_names`` when the model has them.
        preprocessor: written as ``preprocessor_config.json`` when given.
    """
    if label_names is None:
        label_names = getattr(model, "label_names", None)
    state, config = to_hf_classifier(model, label_names)
    extra = {"preprocessor_config": dict(preprocessor)} if preprocessor else {}
    return write_folder(folder, state, config, **extra)


def to_hf_mim(model: BeitMIM, spelling: str = "4.x") -> tuple[dict[str, torch.Tensor], dict]:
    """A ``BeitMIM`` as ``BeitForMaskedImageModeling`` weights and config.

    Args:
        model: the model (one built with ``qkv_bias=False`` gets zero q/v biases).
        spelling: ``"4.x"`` (what the Hub's BEiT checkpoints use and transformers 5 writes) or
            ``"5.x"`` (transformers 5's in-memory spelling).
    """
    if spelling not in ("4.x", "5.x"):
        raise ValueError(f"spelling must be '4.x' or '5.x', got {spelling!r}")
    state, config = beit_to_hf(model, "mim")
    if spelling == "4.x":
        state = {to_4x(k): v for k, v in state.items()}
    return {k: v.clone().contiguous() for k, v in state.items()}, config


def save_hf_mim(
    model: BeitMIM, folder: str | os.PathLike, normalization: Mapping[str, Any] | None = None
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``BeitForMaskedImageModeling`` loads.

    With ``normalization`` (``{"mean", "std"}``), also a ``preprocessor_config.json`` as the Hub's
    BEiT pretraining folders have: a ``BeitImageProcessor`` resizing to the model's size.
    """
    state, config = to_hf_mim(model)
    extra = {}
    if normalization is not None:
        size = int(model.model_kwargs["img_size"])
        extra["preprocessor_config"] = {
            "image_processor_type": "BeitImageProcessor",
            "do_resize": True,
            "size": {"height": size, "width": size},
            "resample": 3,
            "do_center_crop": False,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(normalization["mean"]),
            "image_std": list(normalization["std"]),
        }
    return write_folder(folder, state, config, **extra)
