"""The official unilm BEiT layout: ``{"model": state_dict, ..., "args": Namespace}``.

What ``run_beit_pretraining.py`` / ``run_class_finetuning.py`` save (``utils.save_model``). Their
models are timm's, so the key table is the identity but for ``relative_position_index`` buffers
(dropped on import, regenerated on export) and a DDP ``module.`` prefix. The architecture is
bitrain's exact record in ``args`` when it wrote the file, else one inference from the tensor
shapes (:func:`infer_architecture`), with ``args`` for what weights cannot tell (drop path, the
LayerScale init value).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.models.beit import gen_relative_position_index
from torch import nn

from bitrain.data.preprocessing import EvalPreprocessing, official_normalization
from bitrain.io import CheckpointError

log = logging.getLogger(__name__)

# Official model names (modeling_pretrain.py / modeling_finetune.py) -> (embed_dim, depth, heads).
OFFICIAL_SIZES = {"base": (768, 12, 12), "large": (1024, 24, 16)}
TIMM_BEIT = "beit_base_patch16_224"
# unilm's --imagenet_default_mean_and_std, from the (mean, std) it means: the reader read backwards.
_UNILM_NORMALIZATION = {
    official_normalization({"imagenet_default_mean_and_std": flag}): flag for flag in (True, False)
}


def some_keys(keys: Any, n: int = 6) -> str:
    """The first ``n`` keys of a mapping or list, for messages."""
    keys = [str(k) for k in keys]
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def from_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> ours: drop ``relative_position_index`` buffers and a ``module.`` prefix."""
    return {
        key.removeprefix("module."): value
        for key, value in state_dict.items()
        if not key.endswith("relative_position_index")
    }


def to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys -> official keys: each relative position table gets its index buffer back."""
    out = dict(state_dict)
    for key, table in state_dict.items():
        if key.endswith("relative_position_bias_table"):
            grid = grid_from_table(table.shape[0], key)
            index = key.removesuffix("relative_position_bias_table") + "relative_position_index"
            out[index] = gen_relative_position_index((grid, grid))
    return out


def grid_from_table(rows: int, key: str) -> int:
    """The side ``g`` of a square patch grid whose relative position table has ``rows`` rows."""
    side = (math.isqrt(max(rows - 3, 0)) + 1) // 2
    if (2 * side - 1) ** 2 + 3 != rows:
        raise CheckpointError(f"'{key}' has {rows} rows, not (2g-1)^2 + 3 for a square grid g")
    return side


def plain_args(args: Any) -> dict[str, Any]:
    """An official ``args`` (``argparse.Namespace`` or mapping) as a dict."""
    return vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})


def infer_architecture(
    state: Mapping[str, torch.Tensor], args: Mapping[str, Any], required: tuple[str, ...]
) -> dict[str, Any]:
    """The BEiT architecture of an official state dict (the arguments both models share).

    Width from ``cls_token``, depth from the block indices, patch and channels from
    ``patch_embed.proj``, heads and grid from a relative position table (else heads from the model
    name or ``embed_dim // 64``, grid from ``pos_embed``), LayerScale from ``gamma_1``.
    """
    for key in ("cls_token", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", *required):
        if key not in state:
            raise CheckpointError(f"official BEiT weights lack '{key}' (found {some_keys(state)})")
    embed_dim = int(state["cls_token"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    proj = state["patch_embed.proj.weight"]  # [D, C, p, p]
    shared = "rel_pos_bias.relative_position_bias_table" in state
    per_layer = "blocks.0.attn.relative_position_bias_table" in state
    if shared or per_layer:
        key = f"{'blocks.0.attn' if per_layer else 'rel_pos_bias'}.relative_position_bias_table"
        num_heads = int(state[key].shape[1])
        grid = grid_from_table(state[key].shape[0], key)
    elif "pos_embed" in state:
        name = str(args.get("model", ""))
        size = next((s for tag, s in OFFICIAL_SIZES.items() if f"_{tag}_" in name), None)
        num_heads = size[2] if size and size[0] == embed_dim else max(1, embed_dim // 64)
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    else:
        raise CheckpointError("official BEiT weights have no relative position table, no pos_embed")
    img_size = grid * int(proj.shape[-1])
    if (given := args.get("input_size")) not in (None, img_size):
        log.warning("official args.input_size=%s but the weights say %s", given, img_size)
    init = args.get("layer_scale_init_value")  # gamma_1 holds trained values, not the init
    return {
        "img_size": img_size,
        "patch_size": int(proj.shape[-1]),
        "in_chans": int(proj.shape[1]),
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        "qkv_bias": "blocks.0.attn.q_bias" in state,
        "use_abs_pos_emb": "pos_embed" in state,
        "use_rel_pos_bias": per_layer,
        "use_shared_rel_pos_bias": shared,
        "init_values": (float(init) if init else 0.1) if "blocks.0.gamma_1" in state else None,
    }


def mim_kwargs(state: Mapping[str, torch.Tensor], args: Any = None) -> dict[str, Any]:
    """``BeitMIM`` arguments of an official pretraining state dict."""
    args = plain_args(args)
    if isinstance(args.get("bitrain_model_kwargs"), Mapping):
        return dict(args["bitrain_model_kwargs"])  # written by our export: exact
    arch = infer_architecture(state, args, ("lm_head.weight",))
    return {
        **arch,
        "vocab_size": int(state["lm_head.weight"].shape[0]),
        "drop_path_rate": float(args.get("drop_path", 0.1)),
        "layer_norm_eps": 1e-6,  # partial(nn.LayerNorm, eps=1e-6) in modeling_pretrain.py
        "init_std": 0.02,
    }


def classifier_spec(state: Mapping[str, torch.Tensor], args: Any = None) -> dict[str, Any]:
    """``create_classifier`` arguments of an official fine-tuned state dict."""
    args = plain_args(args)
    if isinstance(args.get("bitrain_spec"), Mapping):
        return dict(args["bitrain_spec"])  # written by our export: exact
    arch = infer_architecture(state, args, ("head.weight",))
    num_classes = int(state["head.weight"].shape[0])
    mean_pooling = "fc_norm.weight" in state
    for arg, found in (("nb_classes", num_classes), ("use_mean_pooling", mean_pooling)):
        if args.get(arg) is not None and args[arg] != found:
            log.warning("official args.%s=%s but the weights say %s", arg, args[arg], found)
    name = str(args.get("model", ""))
    spec: dict[str, Any] = {
        "model_name": name if name.startswith("beit_") and timm.is_model(name) else TIMM_BEIT,
        "num_classes": num_classes,
        **arch,
        "init_values": arch["init_values"] or 0.0,
        "global_pool": "avg" if mean_pooling else "token",
    }
    if args.get("drop_path") is not None:
        spec["drop_path_rate"] = float(args["drop_path"])
    return spec


def _model_name(model: nn.Module, suffix: str, default: str) -> str:
    """The official model name of a BEiT's size (``beit_base_patch16_224``), else ``default``."""
    blocks, patch = model.blocks, model.patch_embed
    sizes = (int(model.embed_dim), len(blocks), int(blocks[0].attn.num_heads))
    size = next((tag for tag, s in OFFICIAL_SIZES.items() if s == sizes), None)
    name = f"beit_{size}_patch{patch.patch_size[0]}_{patch.img_size[0]}{suffix}"
    return name if size else default


def mim_args(
    model: nn.Module, normalization: Mapping[str, Any] | None = None
) -> argparse.Namespace:
    """``run_beit_pretraining.py``'s args, bitrain's exact records, unilm's normalisation flag."""
    extra: dict[str, Any] = {}
    if normalization is not None:
        pair = (tuple(normalization["mean"]), tuple(normalization["std"]))
        if pair in _UNILM_NORMALIZATION:
            extra["imagenet_default_mean_and_std"] = _UNILM_NORMALIZATION[pair]
        extra["bitrain_normalization"] = dict(normalization)
    kwargs = model.model_kwargs
    return argparse.Namespace(
        model=_model_name(model, "_8k_vocab", "bitrain_beit_mim"),
        input_size=kwargs["img_size"],
        drop_path=kwargs["drop_path_rate"],
        layer_scale_init_value=kwargs["init_values"] or 0.0,
        rel_pos_bias=kwargs["use_shared_rel_pos_bias"],
        abs_pos_emb=kwargs["use_abs_pos_emb"],
        bitrain_model_kwargs=dict(kwargs),
        **extra,
    )


def classifier_args(
    model: nn.Module, spec: Mapping[str, Any], preprocessing: EvalPreprocessing | None
) -> argparse.Namespace:
    """``run_class_finetuning.py``'s args, bitrain's exact records, unilm's preprocessing fields."""
    blocks, img = model.blocks, int(model.patch_embed.img_size[0])
    table = getattr(blocks[0].attn, "relative_position_bias_table", None)
    gamma = getattr(blocks[0], "gamma_1", None)
    return argparse.Namespace(
        model=_model_name(model, "", "bitrain_beit"),
        nb_classes=int(spec["num_classes"]),
        input_size=img,
        drop_path=float(spec.get("drop_path_rate", 0.0)),
        rel_pos_bias=table is not None,
        disable_rel_pos_bias=table is None,
        abs_pos_emb=model.pos_embed is not None,
        layer_scale_init_value=float(spec.get("init_values") or 0.0) if gamma is not None else 0.0,
        use_mean_pooling=isinstance(getattr(model, "fc_norm", None), nn.LayerNorm),
        qkv_bias=getattr(blocks[0].attn, "q_bias", None) is not None,
        bitrain_spec=dict(spec),
        bitrain_eval_transform=None if preprocessing is None else preprocessing.to_record(),
        **_unilm_preprocessing(preprocessing, img),
    )


def _unilm_preprocessing(spec: EvalPreprocessing | None, size: int) -> dict[str, Any]:
    """The ``crop_pct`` / ``imagenet_default_mean_and_std`` with which unilm builds ``spec``, or {}.

    :func:`~bitrain.data.preprocessing.from_official_args` read backwards: a bicubic resize of the
    shortest edge to ``int(size / crop_pct)``, a centre crop of ``size``; none at 32 px and below.
    """
    if spec is None or size <= 32 or spec.crop != (size, size) or spec.interpolation != "bicubic":
        return {}
    imagenet = _UNILM_NORMALIZATION.get((spec.mean, spec.std))
    if spec.resize is None or spec.resize[0] != "shortest_edge" or imagenet is None:
        return {}
    # half a pixel over, so that unilm's int(size / crop_pct) gives the resize back
    return {"crop_pct": size / (spec.resize[1] + 0.5), "imagenet_default_mean_and_std": imagenet}
