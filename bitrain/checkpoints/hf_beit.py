"""Hugging Face BEiT and ViT <-> bitrain / timm: their key tables and configs.

``BeitForMaskedImageModeling`` <-> :class:`~bitrain.models.beit.BeitMIM` and
``BeitForImageClassification`` / ``BeitModel`` <-> timm ``beit_base_patch16_224`` share the
embeddings, blocks and relative position tables (:data:`BLOCK`, :func:`top`); only the end differs
(the MIM head's ``layernorm`` + ``lm_head``, or ``beit.layernorm`` / ``beit.pooler.layernorm`` +
``classifier``). Names are transformers 5.x's (4.x is read and written,
:data:`bitrain.checkpoints.hf.SPELLING`). HF's ``BeitModel`` has its own final ``beit.layernorm``
unless ``use_mean_pooling``; BeitMIM (as the official model) has one final norm, so MIM folders are
written with ``use_mean_pooling: true`` and a second norm is refused. ``layer_norm_eps`` (HF 1e-12,
BEiT 1e-6) travels in the config both ways.

ViT (``ViTForImageClassification`` / ``ViTModel`` <-> timm ``vit_base_patch32_224``: class token,
``global_pool="token"``, final ``norm``, no ``fc_norm``) uses BEiT's per-layer table without layer
scale and relative positions (:data:`VIT_BLOCK`) and :data:`VIT_TOP`.
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
from bitrain.io import CheckpointError

__all__ = [
    "BLOCK",
    "TIMM_BEIT",
    "TIMM_VIT",
    "beit_from_hf",
    "beit_to_hf",
    "top",
    "vit_from_hf",
    "vit_to_hf",
]

TIMM_BEIT = "beit_base_patch16_224"

# Per-layer names (after "beit.layers.i." / "blocks.i."), q/k/v aside; ViT uses the first five.
BLOCK: dict[str, str] = {
    **weight_bias("layernorm_before", "norm1"),
    **weight_bias("layernorm_after", "norm2"),
    **weight_bias("attention.o_proj", "attn.proj"),
    **weight_bias("mlp.fc1", "mlp.fc1"),
    **weight_bias("mlp.fc2", "mlp.fc2"),
    "lambda_1": "gamma_1",
    "lambda_2": "gamma_2",
    "relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
}


def top(kind: str) -> dict[str, str]:
    """Whole-model names (HF -> ours) of a BEiT ``kind``: ``"mim"``, else the classifier's."""
    out = {
        "beit.embeddings.cls_token": "cls_token",
        "beit.embeddings.position_embeddings": "pos_embed",
        **weight_bias("beit.embeddings.patch_embeddings.projection", "patch_embed.proj"),
        "beit.shared_position_bias.relative_position_bias_table": (
            "rel_pos_bias.relative_position_bias_table"
        ),
    }
    if kind == "mim":
        out["beit.embeddings.mask_token"] = "mask_token"
        out.update(weight_bias("layernorm", "norm"), **weight_bias("lm_head", "lm_head"))
    else:
        out.update(weight_bias("beit.layernorm", "norm"))
        out.update(weight_bias("beit.pooler.layernorm", "fc_norm"))
        out.update(weight_bias("classifier", "head"))
    return out


def _architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a ``BeitConfig`` says about the network, in our argument names."""
    if config.get("model_type", "beit") != "beit":
        raise CheckpointError(f"Hugging Face config has model_type {config['model_type']!r}")
    return {
        **transformer_sizes(config, "BEiT"),
        "use_abs_pos_emb": bool(config.get("use_absolute_position_embeddings", False)),
        "use_rel_pos_bias": bool(config.get("use_relative_position_bias", False)),
        "use_shared_rel_pos_bias": bool(config.get("use_shared_relative_position_bias", False)),
    }


def beit_from_hf(
    sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], kind: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """HF BEiT weights (5.x spelling) -> ``(our state dict, arguments)``.

    ``kind="mim"``: ``BeitMIM`` keys and kwargs; else timm keys and the ``create_classifier``
    spec (less ``num_classes``).
    """
    layer_scale = float(config.get("layer_scale_init_value", 0.1))
    if kind != "mim":
        args = {
            "model_name": TIMM_BEIT,
            **_architecture(config),
            "global_pool": "avg" if config.get("use_mean_pooling", True) else "token",
            "init_values": max(layer_scale, 0.0),  # 0: no LayerScale (timm drops None)
        }
        drop = {"beit.embeddings.mask_token"}
        return from_layer_table(
            sd, "beit", top(kind), BLOCK, separate_qv_bias=True, drop=drop
        ), args
    if any(k.startswith("beit.layernorm.") for k in sd):
        raise CheckpointError(
            "Hugging Face BEiT weights carry beit.layernorm (use_mean_pooling=false) as well as "
            "the MIM head's layernorm: two final norms, which BeitMIM (one final norm, like the "
            "official model) cannot represent"
        )
    if not config.get("use_mask_token", False):
        raise CheckpointError(
            "Hugging Face BEiT config has use_mask_token=false: this is not a masked-image-"
            "modeling model (BeitForMaskedImageModeling)"
        )
    args = {
        **_architecture(config),
        "vocab_size": int(config.get("vocab_size", 8192)),
        "qkv_bias": True,
        "drop_path_rate": float(config.get("drop_path_rate", 0.1)),
        "init_values": layer_scale if layer_scale > 0 else None,
        "init_std": float(config.get("initializer_range", 0.02)),
    }
    return from_layer_table(sd, "beit", top(kind), BLOCK, separate_qv_bias=True), args


def beit_to_hf(model: nn.Module, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our BEiT (``BeitMIM``, or a timm ``Beit`` classifier) as HF 5.x weights and config.

    Raises:
        CheckpointError: a classifier whose pooling HF's BEiT cannot express.
    """
    state = to_layer_table(model, "beit", top(kind), BLOCK)
    kwargs = model.model_kwargs if kind == "mim" else {}
    init_values = (kwargs or getattr(model, "bitrain_spec", None) or {}).get("init_values")
    blocks = model.blocks
    config = {
        "model_type": "beit",
        **transformer_config(model),
        "initializer_range": float(kwargs.get("init_std", 0.02)),
        "use_absolute_position_embeddings": model.pos_embed is not None,
        "use_relative_position_bias": getattr(blocks[0].attn, "relative_position_bias_table", None)
        is not None,
        "use_shared_relative_position_bias": model.rel_pos_bias is not None,
        "layer_scale_init_value": float(init_values or 0.1)
        if getattr(blocks[0], "gamma_1", None) is not None
        else 0.0,
        "drop_path_rate": float(kwargs.get("drop_path_rate", 0.0)),
    }
    if kind == "mim":
        config.update(
            architectures=["BeitForMaskedImageModeling"],
            vocab_size=int(kwargs["vocab_size"]),
            use_mask_token=True,
            use_mean_pooling=True,  # BeitModel's own final norm = identity; the head's is ours
            # BeitConfig's segmentation fields, so that every BEiT class reads the file
            pool_scales=[1, 2, 3, 6],
            use_auxiliary_head=True,
            auxiliary_loss_weight=0.4,
            auxiliary_channels=256,
            auxiliary_num_convs=1,
            auxiliary_concat_input=False,
            semantic_loss_ignore_index=255,
            add_fpn=False,
            reshape_hidden_states=True,
        )
        return state, config
    if model.global_pool == "avg" and isinstance(model.fc_norm, nn.LayerNorm):
        mean_pooling = True
    elif model.global_pool == "token" and isinstance(model.norm, nn.LayerNorm):
        mean_pooling = False
    else:
        raise CheckpointError(
            f"timm Beit with global_pool={model.global_pool!r} and fc_norm="
            f"{type(model.fc_norm).__name__}; Hugging Face BEiT pools by mean + fc_norm "
            "(global_pool='avg') or by the normed CLS token (global_pool='token')"
        )
    config.update(
        architectures=["BeitForImageClassification"],
        use_mask_token=False,
        use_mean_pooling=mean_pooling,
    )
    return state, config


# --- ViT ------------------------------------------------------------------------------------------

TIMM_VIT = "vit_base_patch32_224"
# BEiT's per-layer table without its layer scale and relative positions.
VIT_BLOCK = {k: v for k, v in BLOCK.items() if not k.startswith(("lambda", "relative"))}
VIT_TOP: dict[str, str] = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    **weight_bias("vit.embeddings.patch_embeddings.projection", "patch_embed.proj"),
    **weight_bias("vit.layernorm", "norm"),
    **weight_bias("classifier", "head"),
}
# Dropped on import: a timm classifier pools by the class token and has no pooler.
_VIT_DROPPED = {"vit.embeddings.mask_token", "vit.pooler.dense.weight", "vit.pooler.dense.bias"}


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
    return from_layer_table(
        sd, "vit", VIT_TOP, VIT_BLOCK, separate_qv_bias=False, drop=_VIT_DROPPED
    ), spec


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
    return to_layer_table(model, "vit", VIT_TOP, VIT_BLOCK), config
