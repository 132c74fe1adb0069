"""Hugging Face ViT (``ViTForImageClassification`` / ``ViTModel``) <-> timm ``VisionTransformer``.

timm architecture: ``vit_base_patch32_224`` (class token, ``global_pool="token"``, final ``norm``,
no ``fc_norm``); the spec's other keys override its sizes. The key table is BEiT's per-layer one
without layer scale and relative positions (:data:`BLOCK`) plus :data:`TOP` (transformers 5.x
names; 4.x is read and written, :data:`bitrain.checkpoints.hf.SPELLING`). Dropped on import:
``vit.embeddings.mask_token`` and the pre-trained pooler ``vit.pooler.dense.*`` (a timm classifier
pools by the class token and has no pooler).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bitrain.checkpoints.hf import (
    from_layer_table,
    to_layer_table,
    transformer_config,
    transformer_sizes,
    weight_bias,
)
from bitrain.checkpoints.hf_beit import BLOCK as _BEIT_BLOCK
from bitrain.io import CheckpointError

__all__ = ["TIMM_VIT", "vit_from_hf", "vit_to_hf"]

TIMM_VIT = "vit_base_patch32_224"
BLOCK = {k: v for k, v in _BEIT_BLOCK.items() if not k.startswith(("lambda", "relative"))}
TOP: dict[str, str] = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    **weight_bias("vit.embeddings.patch_embeddings.projection", "patch_embed.proj"),
    **weight_bias("vit.layernorm", "norm"),
    **weight_bias("classifier", "head"),
}
_DROPPED = {"vit.embeddings.mask_token", "vit.pooler.dense.weight", "vit.pooler.dense.bias"}


def vit_from_hf(
    sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """HF ViT weights (5.x spelling) -> ``(timm state dict, create_classifier spec)``."""
    spec = {
        "model_name": TIMM_VIT,
        **transformer_sizes(config, "ViT"),
        "global_pool": "token",
        "qkv_bias": bool(config.get("qkv_bias", True)),
    }
    return from_layer_table(sd, "vit", TOP, BLOCK, separate_qv_bias=False, drop=_DROPPED), spec


def vit_to_hf(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A timm ViT classifier as HF 5.x weights and a ``ViTConfig`` dict.

    Raises:
        CheckpointError: a ViT that HF's cannot be (no class token in ``pos_embed``, register
            tokens, another pooling, ``fc_norm``, no final norm, non-square patches).
    """
    no_cls = getattr(model, "no_embed_class", False) or model.cls_token is None
    if no_cls or getattr(model, "num_reg_tokens", 0) or model.global_pool != "token":
        raise CheckpointError(
            "Hugging Face ViT needs a timm VisionTransformer with a class token in pos_embed, "
            f"no register tokens and global_pool='token'; got global_pool={model.global_pool!r}"
        )
    if not isinstance(model.fc_norm, nn.Identity) or not isinstance(model.norm, nn.LayerNorm):
        raise CheckpointError(
            "Hugging Face ViT has no fc_norm and a final norm; this model differs"
        )
    config = {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        **transformer_config(model),
        "qkv_bias": model.blocks[0].attn.qkv.bias is not None,
    }
    config["encoder_stride"] = config["patch_size"]
    return to_layer_table(model, "vit", TOP, BLOCK), config
