"""Hugging Face folders in and out: dispatch by architecture to the BEiT, ViT and BiT tables.

``BeitForMaskedImageModeling`` <-> :class:`~bitrain.models.beit.BeitMIM`; ``Beit`` / ``ViT`` /
``BitForImageClassification`` (and the head-less ``*Model``, whose keys may lack the ``beit.`` /
``vit.`` / ``bit.`` prefix) <-> timm classifiers. Written in the transformers 4.x key spelling,
which transformers 4 and 5 both load. HF's ``layer_norm_eps`` (1e-12 by default; timm's 1e-6) and
BiT's ``num_groups`` (timm: 32) are ``create_classifier`` arguments in the spec, so they travel both
ways.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from bitrain.checkpoints.hf import architecture, read_folder, to_4x, to_5x, write_folder
from bitrain.checkpoints.hf_beit import beit_from_hf, beit_to_hf, vit_from_hf, vit_to_hf
from bitrain.checkpoints.hf_bit import bit_from_hf, bit_to_hf
from bitrain.data.preprocessing import EvalPreprocessing
from bitrain.io import CheckpointError
from bitrain.models.beit import BeitMIM

__all__ = [
    "from_hf",
    "from_hf_mim",
    "read_hf_classifier",
    "read_hf_mim",
    "save_hf_classifier",
    "save_hf_mim",
    "to_hf_classifier",
    "to_hf_mim",
]


def from_hf(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """HF weights (4.x or 5.x spelling) -> ``(our state dict, our arguments)``, by architecture.

    ``BeitMIM`` keys and kwargs for a MIM folder; else timm keys and the ``create_classifier`` spec
    (``num_classes`` None without a head). Another architecture, a config our models cannot be, or
    unknown weights are a CheckpointError.
    """
    _, family, kind = architecture(config)
    sd = {}
    for key, value in state_dict.items():
        if kind != "mim" and not key.startswith((f"{family}.", "classifier.")):
            key = f"{family}.{key}"  # head-less models are saved without the prefix
        sd[key if family == "bit" else to_5x(key)] = value
    if family == "beit":
        state, args = beit_from_hf(sd, config, kind)
    else:
        state, args = (vit_from_hf if family == "vit" else bit_from_hf)(sd, config)
    if kind != "mim":
        head = state.get("head.weight", state.get("head.fc.weight"))
        args["num_classes"] = None if head is None else int(head.shape[0])
    return state, args


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
    return _read(folder, "mim")[:2]


def read_hf_classifier(
    folder: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """``(create_classifier spec, timm state dict, config)`` of a HF classifier folder."""
    state, spec, config = _read(folder, "classifier")
    return spec, state, config


def to_hf_classifier(
    model: nn.Module, label_names: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A timm Beit, VisionTransformer or ResNetV2 (BiT) classifier as HF weights and config.

    4.x key spelling; a complete ``config.json`` with ``id2label`` from ``label_names`` (else
    ``LABEL_i``).

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
    n = int(model.num_classes)
    names = [f"LABEL_{i}" for i in range(n)] if label_names is None else list(label_names)
    if len(names) != n:
        raise ValueError(
            f"{len(names)} label_names for a {n}-class model; give one name per class, in "
            "class-index order"
        )
    if len(set(names)) != len(names):
        raise ValueError("label_names has duplicates (label2id needs unique names)")
    config["id2label"] = {str(i): str(name) for i, name in enumerate(names)}
    config["label2id"] = {str(name): i for i, name in enumerate(names)}
    return {to_4x(k): v.clone().contiguous() for k, v in state.items()}, config


def save_hf_classifier(
    model: nn.Module,
    folder: str | os.PathLike,
    label_names: list[str] | None = None,
    preprocessor: Mapping[str, Any] | None = None,
) -> Path:
    """Write a classifier folder that ``AutoModelForImageClassification`` loads.

    ``label_names`` default to ``model.label_names``; ``preprocessor``, when given, is written as
    ``preprocessor_config.json``. Files of the same names are replaced atomically.
    """
    if label_names is None:
        label_names = getattr(model, "label_names", None)
    state, config = to_hf_classifier(model, label_names)
    extra = {"preprocessor_config": dict(preprocessor)} if preprocessor else {}
    return write_folder(folder, state, config, **extra)


def to_hf_mim(model: BeitMIM, spelling: str = "4.x") -> tuple[dict[str, torch.Tensor], dict]:
    """A ``BeitMIM`` as ``BeitForMaskedImageModeling`` weights and config.

    One built with ``qkv_bias=False`` gets zero q/v biases. ``spelling``: ``"4.x"`` (what the
    Hub's BEiT checkpoints use and transformers 5 writes) or ``"5.x"`` (its in-memory spelling).
    """
    if spelling not in ("4.x", "5.x"):
        raise ValueError(f"spelling must be '4.x' or '5.x', got {spelling!r}")
    state, config = beit_to_hf(model, "mim")
    rename = to_4x if spelling == "4.x" else str
    return {rename(k): v.clone().contiguous() for k, v in state.items()}, config


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
        mean, std = normalization["mean"], normalization["std"]
        spec = EvalPreprocessing(("exact", size, size), "bicubic", None, mean, std)
        extra["preprocessor_config"] = {
            "image_processor_type": "BeitImageProcessor",
            **spec.to_processor_config(),
        }
    return write_folder(folder, state, config, **extra)


def to_hf(model, label_names=None, spelling="4.x"):
    """(temporary) ``to_hf_mim`` / ``to_hf_classifier``."""
    if isinstance(model, BeitMIM):
        return to_hf_mim(model, spelling)
    return to_hf_classifier(model, label_names)
