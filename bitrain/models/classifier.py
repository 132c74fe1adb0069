"""Fine-tuning models: plain timm classifiers (``create_classifier``).

A fine-tuned bitrain model is a timm model (``timm.create_model``), so its weights load in timm
and export to Hugging Face. BEiT fine-tuning (``unilm/beit/run_class_finetuning.py``) uses
``beit_*`` with ``global_pool="avg"`` (mean pooling of the patch tokens, then ``fc_norm``), a fresh
head whose initial weights are scaled by ``head_init_scale`` (the official ``--init_scale``,
0.001), per-block relative position biases and layer scale.

Initialising one from a checkpoint is :func:`bitrain.checkpoints.build_classifier` (the
fine-tuning configs' ``model`` node): ``models`` never imports ``checkpoints``.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

__all__ = ["apply_norm_settings", "create_classifier", "CLASSIFIER_TARGET"]

# The target a classifier's spec is saved under (compared as a string, never imported from a file).
CLASSIFIER_TARGET = "bitrain.models.classifier.create_classifier"


def create_classifier(
    model_name: str,
    num_classes: int,
    layer_norm_eps: float | None = None,
    group_norm_groups: int | None = None,
    zero_head: bool = False,
    **timm_kwargs: Any,
) -> nn.Module:
    """``timm.create_model(model_name, num_classes=..., **timm_kwargs)``, randomly initialised.

    Args:
        model_name: a timm architecture (``beit_base_patch16_224``, ``vit_base_patch32_224``,
            ``resnetv2_50x1_bit``, ...); never downloads (``pretrained=False`` for timm).
        num_classes: classes of the head.
        layer_norm_eps: ``eps`` of every ``LayerNorm`` when not timm's (Hugging Face's BEiT and
            ViT use 1e-12; timm's 1e-6).
        group_norm_groups: ``num_groups`` of every ``GroupNorm`` when not timm's (Hugging Face's
            BiT configs may say 8; timm builds 32).
        zero_head: start the classification head (weight and bias) at zero, as BiT
            (big_transfer ``train.py``: ``zero_head=True``) and ViT fine-tuning (``vit_jax``
            ``models_vit.py``: ``kernel_init=zeros``) do. A head taken from a pretrained
            checkpoint (same classes) still overwrites it. An initialisation, so not part of
            ``bitrain_spec``.
        **timm_kwargs: further model arguments (``img_size``, ``drop_path_rate``,
            ``global_pool``, ``head_init_scale``, ...). ``img_size`` is kept as a record for
            models that take none (ResNets).

    Returns:
        The timm model, with ``bitrain_spec`` = the arguments that rebuild it.
    """
    if "pretrained" in timm_kwargs or "pretrained_strict" in timm_kwargs:
        raise ValueError(
            "create_classifier builds the architecture only; initialise it from a checkpoint with "
            "bitrain.checkpoints.build_classifier(pretrained=...) or load_pretrained(model, path)"
        )
    if int(num_classes) < 1:
        raise ValueError(f"model.num_classes must be >= 1, got {num_classes}")
    kwargs = dict(timm_kwargs)
    try:
        model = _create(model_name, int(num_classes), kwargs)
    except RuntimeError as err:  # timm: unknown model name
        raise ValueError(f"model.model_name={model_name!r}: {err}") from err
    model.bitrain_spec = {"model_name": model_name, "num_classes": int(num_classes), **timm_kwargs}
    apply_norm_settings(model, layer_norm_eps, group_norm_groups)
    if zero_head:
        _zero_head(model)
    return model


def apply_norm_settings(
    model: nn.Module, layer_norm_eps: float | None = None, group_norm_groups: int | None = None
) -> nn.Module:
    """Set ``eps`` on every ``nn.LayerNorm`` / ``num_groups`` on every ``nn.GroupNorm``.

    timm's constructors do not take them, but both are plain attributes read in ``forward``, so
    the parameters do not change. The model's ``bitrain_spec`` (if any) records them.

    Raises:
        ValueError: a group norm's channels are not divisible by ``group_norm_groups``.
    """
    for name, module in model.named_modules():
        if layer_norm_eps is not None and isinstance(module, nn.LayerNorm):
            module.eps = float(layer_norm_eps)
        if group_norm_groups is not None and isinstance(module, nn.GroupNorm):
            if module.num_channels % int(group_norm_groups):
                raise ValueError(
                    f"group norm '{name}' has {module.num_channels} channels, not divisible by "
                    f"group_norm_groups={group_norm_groups}"
                )
            module.num_groups = int(group_norm_groups)
    if isinstance(getattr(model, "bitrain_spec", None), dict):
        norms = {"layer_norm_eps": layer_norm_eps, "group_norm_groups": group_norm_groups}
        model.bitrain_spec.update({k: v for k, v in norms.items() if v is not None})
    return model


def _create(model_name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model``, with the training resolution of models that take no ``img_size``.

    For those (CNNs) ``img_size`` goes to timm's own metadata, ``pretrained_cfg["input_size"]``,
    which timm's ``resolve_data_config(model=...)`` reads.
    """
    try:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as err:
        if "img_size" not in kwargs or "img_size" not in str(err):
            raise
        rest = {k: v for k, v in kwargs.items() if k != "img_size"}
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **rest)
        size = kwargs["img_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        input_size = (int(kwargs.get("in_chans", 3)), int(h), int(w))
        model.pretrained_cfg = {
            **(getattr(model, "pretrained_cfg", None) or {}),
            "input_size": input_size,
        }
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
