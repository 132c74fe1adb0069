"""Hugging Face BEiT <-> bitrain / timm: one key table for the MIM model and the classifier.

``BeitForMaskedImageModeling`` <-> :class:`~bitrain.models.beit.BeitMIM` and
``BeitForImageClassification`` / ``BeitModel`` <-> timm ``beit_base_patch16_224`` share the
embeddings, the blocks and the relative position tables; only the end differs (the MIM head's
``layernorm`` + ``lm_head`` against ``beit.layernorm`` or ``beit.pooler.layernorm`` +
``classifier``). Export reads the same table backwards. Key map (transformers 5.x spelling; 4.x is
accepted and written, :data:`bitrain.checkpoints.hf.SPELLING`)::

    beit.embeddings.cls_token                            cls_token
    beit.embeddings.mask_token              (MIM)        mask_token
    beit.embeddings.position_embeddings                  pos_embed
    beit.embeddings.patch_embeddings.projection.*        patch_embed.proj.*
    beit.shared_position_bias.relative_position_bias_table
                                                         rel_pos_bias.relative_position_bias_table
    beit.layers.i.attention.{q,k,v}_proj.weight          blocks.i.attn.qkv.weight  (stacked q;k;v)
    beit.layers.i.attention.{q,v}_proj.bias              blocks.i.attn.{q,v}_bias  (k has none)
    beit.layers.i.attention.o_proj.*                     blocks.i.attn.proj.*
    beit.layers.i.relative_position_bias.relative_position_bias_table
                                                         blocks.i.attn.relative_position_bias_table
    beit.layers.i.layernorm_{before,after}.*             blocks.i.norm{1,2}.*
    beit.layers.i.mlp.fc{1,2}.*                          blocks.i.mlp.fc{1,2}.*
    beit.layers.i.lambda_{1,2}                           blocks.i.gamma_{1,2}
    layernorm.*                             (MIM)        norm.*     (the MIM head's norm)
    lm_head.*                               (MIM)        lm_head.*
    beit.layernorm.*                   (classifier)      norm.*     (CLS-token pooling)
    beit.pooler.layernorm.*            (classifier)      fc_norm.*  (mean pooling)
    classifier.*                       (classifier)      head.*

HF's ``BeitModel`` has its own final ``beit.layernorm`` unless ``use_mean_pooling``; the official
pretraining model (and ``BeitMIM``) has one final norm, so MIM folders are written with
``use_mean_pooling: true`` and folders with a second norm are refused. HF's default
``layer_norm_eps`` is 1e-12 while BEiT's is 1e-6: the value travels in the config both ways.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bitrain.checkpoints.hf import (
    HF_LAYER_NORM_EPS,
    from_layer_table,
    one_value,
    to_layer_table,
    transformer_sizes,
    weight_bias,
)
from bitrain.io import CheckpointError

__all__ = ["BLOCK", "TIMM_BEIT", "beit_config", "beit_from_hf", "beit_to_hf", "top"]

TIMM_BEIT = "beit_base_patch16_224"
_WHERE = "Hugging Face BEiT weights"

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
    """Whole-model names (HF -> ours) of a BEiT ``kind``: ``"mim"`` or ``"classifier"``."""
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


# --- config <-> architecture ----------------------------------------------------------------------


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


def _mim_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    if not config.get("use_mask_token", False):
        raise CheckpointError(
            "Hugging Face BEiT config has use_mask_token=false: this is not a masked-image-"
            "modeling model (BeitForMaskedImageModeling)"
        )
    layer_scale = float(config.get("layer_scale_init_value", 0.1))
    return {
        **_architecture(config),
        "vocab_size": int(config.get("vocab_size", 8192)),
        "qkv_bias": True,
        "drop_path_rate": float(config.get("drop_path_rate", 0.1)),
        "init_values": layer_scale if layer_scale > 0 else None,
        "layer_norm_eps": float(config.get("layer_norm_eps", HF_LAYER_NORM_EPS)),
        "init_std": float(config.get("initializer_range", 0.02)),
    }


def _classifier_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "model_name": TIMM_BEIT,
        **_architecture(config),
        "global_pool": "avg" if config.get("use_mean_pooling", True) else "token",
        # 0: no LayerScale (timm.create_model drops None)
        "init_values": max(float(config.get("layer_scale_init_value", 0.1)), 0.0),
    }


def beit_config(arch: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """A complete ``BeitConfig`` dict for our architecture arguments.

    ``arch`` has :func:`_architecture`'s names plus ``layer_norm_eps``, ``init_values``, and
    ``vocab_size`` (MIM) or ``use_mean_pooling`` (classifier).
    """
    dim = int(arch["embed_dim"])
    config: dict[str, Any] = {
        "model_type": "beit",
        "hidden_size": dim,
        "num_hidden_layers": int(arch["depth"]),
        "num_attention_heads": int(arch["num_heads"]),
        "intermediate_size": int(dim * arch["mlp_ratio"]),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": float(arch.get("init_std", 0.02)),
        "layer_norm_eps": float(arch["layer_norm_eps"]),
        "image_size": int(arch["img_size"]),
        "patch_size": int(arch["patch_size"]),
        "num_channels": int(arch["in_chans"]),
        "use_absolute_position_embeddings": bool(arch["use_abs_pos_emb"]),
        "use_relative_position_bias": bool(arch["use_rel_pos_bias"]),
        "use_shared_relative_position_bias": bool(arch["use_shared_rel_pos_bias"]),
        "layer_scale_init_value": float(arch["init_values"] or 0.0),
        "drop_path_rate": float(arch.get("drop_path_rate", 0.0)),
    }
    if kind == "mim":
        config.update(
            architectures=["BeitForMaskedImageModeling"],
            vocab_size=int(arch["vocab_size"]),
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
    else:
        config.update(
            architectures=["BeitForImageClassification"],
            use_mask_token=False,
            use_mean_pooling=bool(arch["use_mean_pooling"]),
        )
    return config


# --- weights --------------------------------------------------------------------------------------


def beit_from_hf(
    sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], kind: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """HF BEiT weights (5.x spelling) -> ``(our state dict, arguments)``.

    ``kind="mim"``: ``BeitMIM`` keys and kwargs. ``kind="classifier"``: timm keys and the
    ``create_classifier`` spec (``num_classes`` None for a head-less ``BeitModel``).

    Raises:
        CheckpointError: a config or weights that the model cannot be.
    """
    if kind == "mim":
        if any(k.startswith("beit.layernorm.") for k in sd):
            raise CheckpointError(
                "Hugging Face BEiT weights carry beit.layernorm (use_mean_pooling=false) as well "
                "as the MIM head's layernorm: two final norms, which BeitMIM (one final norm, like "
                "the official model) cannot represent"
            )
        args = _mim_kwargs(config)
        drop: set[str] = set()
    else:
        args = _classifier_spec(config)
        drop = {"beit.embeddings.mask_token"}
    state = from_layer_table(sd, "beit", top(kind), BLOCK, _WHERE, separate_qv_bias=True, drop=drop)
    if kind != "mim":
        head = state.get("head.weight")
        args["num_classes"] = int(head.shape[0]) if head is not None else None
    return state, args


def beit_to_hf(model: nn.Module, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our BEiT (``BeitMIM`` or a timm ``Beit`` classifier) as HF 5.x weights and config.

    Raises:
        CheckpointError: a classifier whose pooling HF's BEiT cannot express.
    """
    dim = int(model.embed_dim)
    state = to_layer_table(model.state_dict(), "beit", top(kind), BLOCK, dim, "to Hugging Face")
    if kind == "mim":
        return state, beit_config(model.model_kwargs, "mim")
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
    blocks, patch = model.blocks, model.patch_embed
    img, grid = tuple(patch.img_size), tuple(patch.patch_size)
    if img[0] != img[1] or grid[0] != grid[1]:
        raise CheckpointError(f"to Hugging Face: image {img} / patch {grid} are not square")
    init_values = getattr(model, "bitrain_spec", {}).get("init_values")
    has_scale = getattr(blocks[0], "gamma_1", None) is not None
    arch = {
        "embed_dim": dim,
        "depth": len(blocks),
        "num_heads": int(blocks[0].attn.num_heads),
        "mlp_ratio": blocks[0].mlp.fc1.out_features / dim,
        "layer_norm_eps": float(one_value(model, nn.LayerNorm, "eps")),
        "img_size": int(img[0]),
        "patch_size": int(grid[0]),
        "in_chans": int(patch.proj.in_channels),
        "use_abs_pos_emb": model.pos_embed is not None,
        "use_rel_pos_bias": getattr(blocks[0].attn, "relative_position_bias_table", None)
        is not None,
        "use_shared_rel_pos_bias": model.rel_pos_bias is not None,
        "init_values": float(init_values or 0.1) if has_scale else 0.0,
        "use_mean_pooling": mean_pooling,
    }
    return state, beit_config(arch, "classifier")
