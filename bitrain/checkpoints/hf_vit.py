"""Hugging Face ViT (``ViTForImageClassification`` / ``ViTModel``) <-> timm ``VisionTransformer``.

timm architecture: ``vit_base_patch32_224`` (class token, ``global_pool="token"``, final ``norm``,
no ``fc_norm``); the spec's other keys override its sizes. Key map (5.x spelling; 4.x is read and
written, :data:`bitrain.checkpoints.hf.SPELLING`)::

    vit.embeddings.cls_token                             cls_token
    vit.embeddings.position_embeddings                   pos_embed
    vit.embeddings.patch_embeddings.projection.*         patch_embed.proj.*
    vit.layers.i.attention.{q,k,v}_proj.*                blocks.i.attn.qkv.*  (stacked q;k;v)
    vit.layers.i.attention.o_proj.*                      blocks.i.attn.proj.*
    vit.layers.i.layernorm_{before,after}.*              blocks.i.norm{1,2}.*
    vit.layers.i.mlp.fc{1,2}.*                           blocks.i.mlp.fc{1,2}.*
    vit.layernorm.*                                      norm.*
    classifier.*                                         head.*

Dropped on import: ``vit.embeddings.mask_token`` and the pre-trained pooler ``vit.pooler.dense.*``
(a timm classifier pools by the class token and has no pooler).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bitrain.checkpoints.hf import (
    from_layer_table,
    one_value,
    to_layer_table,
    transformer_sizes,
    weight_bias,
)
from bitrain.checkpoints.hf_beit import BLOCK as _BEIT_BLOCK
from bitrain.io import CheckpointError

__all__ = ["TIMM_VIT", "vit_from_hf", "vit_to_hf"]

TIMM_VIT = "vit_base_patch32_224"
# BEiT's per-layer table without its layer scale and relative position tables.
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
    sizes = transformer_sizes(config, "ViT")
    state = from_layer_table(
        sd, "vit", TOP, BLOCK, "Hugging Face ViT weights", separate_qv_bias=False, drop=_DROPPED
    )
    head = state.get("head.weight")
    spec = {
        "model_name": TIMM_VIT,
        "num_classes": int(head.shape[0]) if head is not None else None,
        **sizes,
        "global_pool": "token",
        "qkv_bias": bool(config.get("qkv_bias", True)),
    }
    return state, spec


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
    sd = model.state_dict()
    dim = int(model.embed_dim)
    state = to_layer_table(sd, "vit", TOP, BLOCK, dim, "to Hugging Face")
    patch, blocks = model.patch_embed, model.blocks
    img, grid = tuple(patch.img_size), tuple(patch.patch_size)
    if img[0] != img[1] or grid[0] != grid[1]:
        raise CheckpointError(f"to Hugging Face: image {img} / patch {grid} are not square")
    config = {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": dim,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": int(blocks[0].attn.num_heads),
        "intermediate_size": int(blocks[0].mlp.fc1.out_features),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": float(one_value(model, nn.LayerNorm, "eps")),
        "image_size": int(img[0]),
        "patch_size": int(grid[0]),
        "num_channels": int(patch.proj.in_channels),
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "encoder_stride": int(grid[0]),
    }
    return state, config
