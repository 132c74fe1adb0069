"""Hugging Face folders in and out, through :func:`.hf.from_hf` and :func:`.hf.to_hf`.

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

import torch
from torch import nn

from bitrain.checkpoints.hf import architecture, from_hf, read_folder, to_hf, write_folder
from bitrain.data.preprocessing import EvalPreprocessing
from bitrain.io import CheckpointError
from bitrain.models.beit import BeitMIM

__all__ = ["read_hf_classifier", "read_hf_mim", "save_hf_classifier", "save_hf_mim"]


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
    state, config = to_hf(model, label_names)
    extra = {"preprocessor_config": dict(preprocessor)} if preprocessor else {}
    return write_folder(folder, state, config, **extra)


def save_hf_mim(
    model: BeitMIM, folder: str | os.PathLike, normalization: Mapping[str, Any] | None = None
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``BeitForMaskedImageModeling`` loads.

    With ``normalization`` (``{"mean", "std"}``), also a ``preprocessor_config.json`` as the Hub's
    BEiT pretraining folders have: a ``BeitImageProcessor`` resizing to the model's size.
    """
    state, config = to_hf(model)
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
