"""Hugging Face image classifiers (BEiT, ViT, BiT) <-> timm classifiers of bitrain.

Reads and writes Hugging Face folders of ``BeitForImageClassification``,
``ViTForImageClassification`` and ``BitForImageClassification`` (and of the head-less
``BeitModel`` / ``ViTModel`` / ``BitModel``) with our own code; ``transformers`` is never imported
here, it is only the reference the parity tests compare against. Folders are read through
:func:`bitrain.models.hf.load_hf_folder`; weights may use the transformers 5.x key spelling or the
4.x one (:data:`LEGACY_RENAMES`), and head-less folders may lack the ``beit.`` / ``vit.`` /
``bit.`` prefix. Folders are written in the 4.x spelling, which transformers 4 and 5 both load.

timm architectures (the ``model_name`` of the spec; the spec's other keys override its sizes):

* BEiT -> ``beit_base_patch16_224`` (``timm.models.beit.Beit``). HF ``use_mean_pooling=True``
  (mean of the patch tokens, then ``beit.pooler.layernorm``) is timm ``global_pool="avg"`` (its
  ``fc_norm``); ``use_mean_pooling=False`` (the CLS token after ``beit.layernorm``) is
  ``global_pool="token"`` (its ``norm``). Absolute position embeddings, per-layer and shared
  relative position tables (timm's Beit has both, so a shared table stays shared) and LayerScale
  map one to one.
* ViT -> ``vit_base_patch32_224`` (``timm.models.vision_transformer.VisionTransformer``, class
  token, ``global_pool="token"``, final ``norm``, no ``fc_norm``).
* BiT -> ``resnetv2_{50x1,101x1,152x2}_bit`` (``timm.models.resnetv2.ResNetV2``): its spec,
  key map and the checks that an HF BiT config is timm's network are in
  :mod:`bitrain.models.hf_bit`.

Key map (transformers 5.x spelling on the left; ``{p}`` is ``beit`` or ``vit``)::

    {p}.embeddings.cls_token                             cls_token
    {p}.embeddings.position_embeddings                   pos_embed
    {p}.embeddings.patch_embeddings.projection.*         patch_embed.proj.*
    beit.shared_position_bias.relative_position_bias_table
                                                         rel_pos_bias.relative_position_bias_table
    {p}.layers.i.attention.{q,k,v}_proj.weight           blocks.i.attn.qkv.weight  (stacked q;k;v)
    beit.layers.i.attention.{q,v}_proj.bias              blocks.i.attn.{q,v}_bias  (k has no bias)
    vit.layers.i.attention.{q,k,v}_proj.bias             blocks.i.attn.qkv.bias    (stacked q;k;v)
    {p}.layers.i.attention.o_proj.*                      blocks.i.attn.proj.*
    beit.layers.i.relative_position_bias.relative_position_bias_table
                                                         blocks.i.attn.relative_position_bias_table
    {p}.layers.i.layernorm_{before,after}.*              blocks.i.norm{1,2}.*
    {p}.layers.i.mlp.fc{1,2}.*                           blocks.i.mlp.fc{1,2}.*
    beit.layers.i.lambda_{1,2}                           blocks.i.gamma_{1,2}
    {p}.layernorm.*   (CLS pooling)                      norm.*
    beit.pooler.layernorm.*   (mean pooling)             fc_norm.*
    classifier.*                                         head.*

Dropped on import: ``{p}.embeddings.mask_token`` and ViT's ``vit.pooler.dense.*`` (a classifier
does not use them) and ``relative_position_index`` buffers.

Norm settings that timm's constructors do not take as plain values: HF's ``layer_norm_eps``
(default 1e-12; timm's BEiT and ViT use 1e-6) and BiT's ``num_groups`` (timm uses 32).
:func:`create_classifier` cannot record them (it passes every spec key to timm), so
:func:`build_classifier_from_hf` sets them on the built model's ``LayerNorm`` / ``GroupNorm``
modules after creation (:func:`apply_norm_settings`); a model rebuilt from the spec alone has
timm's values. :func:`save_hf_classifier` reads them back from the modules, so they travel both
ways with the model.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from bitrain.io import CheckpointError, atomic_write_bytes
from bitrain.models.hf import (
    LEGACY_RENAMES,
    _to_legacy,
    beit_qv_biases,
    config_square,
    head_classes,
    load_hf_folder,
    map_layer_keys,
    one_value,
    stack_qkv_weight,
    unmap_layer_keys,
    weight_bias,
    weights_file,
)
from bitrain.models.hf import normalize_hf_keys as _normalize_hf_keys
from bitrain.models.hf_bit import TIMM_GROUPS, bit_spec, bit_state, bit_to_hf

__all__ = [
    "ARCHITECTURES",
    "LEGACY_RENAMES",
    "apply_norm_settings",
    "build_classifier_from_hf",
    "from_hf_classifier",
    "hf_norm_settings",
    "load_hf_classifier",
    "save_hf_classifier",
    "to_hf_classifier",
]

log = logging.getLogger(__name__)

# HF architecture -> (family, has a classification head).
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "BeitForImageClassification": ("beit", True),
    "BeitModel": ("beit", False),
    "ViTForImageClassification": ("vit", True),
    "ViTModel": ("vit", False),
    "BitForImageClassification": ("bit", True),
    "BitModel": ("bit", False),
}
TIMM_BEIT = "beit_base_patch16_224"
TIMM_VIT = "vit_base_patch32_224"
TIMM_LAYER_NORM_EPS = 1e-6  # partial(LayerNorm, eps=1e-6) in timm's Beit / VisionTransformer
_HF_LAYER_NORM_EPS = 1e-12  # BeitConfig / ViTConfig default


# Per-block names (after "{p}.layers.i." / "blocks.i."), q/k/v aside.
_BLOCK: dict[str, str] = {
    **weight_bias("layernorm_before", "norm1"),
    **weight_bias("layernorm_after", "norm2"),
    **weight_bias("attention.o_proj", "attn.proj"),
    **weight_bias("mlp.fc1", "mlp.fc1"),
    **weight_bias("mlp.fc2", "mlp.fc2"),
    "lambda_1": "gamma_1",
    "lambda_2": "gamma_2",
    "relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
}


def _top(family: str) -> dict[str, str]:
    """Whole-model names (HF 5.x -> timm) of a BEiT or ViT classifier."""
    p = family
    out = {
        f"{p}.embeddings.cls_token": "cls_token",
        f"{p}.embeddings.position_embeddings": "pos_embed",
        **weight_bias(f"{p}.embeddings.patch_embeddings.projection", "patch_embed.proj"),
        **weight_bias(f"{p}.layernorm", "norm"),
        **weight_bias("classifier", "head"),
    }
    if family == "beit":
        out["beit.shared_position_bias.relative_position_bias_table"] = (
            "rel_pos_bias.relative_position_bias_table"
        )
        out.update(weight_bias("beit.pooler.layernorm", "fc_norm"))
    return out


# --- reading -----------------------------------------------------------------------------------


def _architecture(config: Mapping[str, Any]) -> tuple[str, str, bool]:
    """``(architecture, family, has_head)`` of a HF config, or a :class:`CheckpointError`."""
    architectures = list(config.get("architectures") or [])
    for arch in architectures:
        if arch in ARCHITECTURES:
            return (arch, *ARCHITECTURES[arch])
    raise CheckpointError(
        f"Hugging Face config has architectures {architectures or '(none)'}; bitrain imports "
        f"only {', '.join(ARCHITECTURES)} as a timm classifier"
    )


def normalize_hf_keys(state_dict: Mapping[str, torch.Tensor], family: str) -> dict[str, Any]:
    """HF keys in 5.x spelling with the family prefix; ``relative_position_index`` dropped.

    Head-less models (``BeitModel`` ...) are saved without the ``beit.``/``vit.``/``bit.``
    prefix; it is added.
    """
    prefixed = {}
    for key, value in state_dict.items():
        if not key.startswith((f"{family}.", "classifier.")):
            key = f"{family}.{key}"
        prefixed[key] = value
    return _normalize_hf_keys(prefixed, rename=family != "bit")


def _mlp_ratio(config: Mapping[str, Any], hidden: int) -> float:
    inner = int(config.get("intermediate_size", 4 * hidden))
    ratio = inner / hidden
    if int(hidden * ratio) != inner:
        raise CheckpointError(
            f"Hugging Face config: intermediate_size={inner} is not int(hidden_size * r) for "
            f"r = {ratio}; timm cannot build this MLP width"
        )
    return ratio


def _transformer_spec(config: Mapping[str, Any], family: str) -> dict[str, Any]:
    """``create_classifier`` kwargs (less ``num_classes``) of a BEiT or ViT config."""
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(
            f"Hugging Face {family} config uses hidden_act={config['hidden_act']!r}; timm's model "
            "uses exact GELU ('gelu')"
        )
    hidden = int(config.get("hidden_size", 768))
    spec: dict[str, Any] = {
        "model_name": TIMM_BEIT if family == "beit" else TIMM_VIT,
        "img_size": config_square(config, "image_size", 224, "Hugging Face config"),
        "patch_size": config_square(config, "patch_size", 16, "Hugging Face config"),
        "in_chans": int(config.get("num_channels", 3)),
        "embed_dim": hidden,
        "depth": int(config.get("num_hidden_layers", 12)),
        "num_heads": int(config.get("num_attention_heads", 12)),
        "mlp_ratio": _mlp_ratio(config, hidden),
    }
    if family == "beit":
        layer_scale = float(config.get("layer_scale_init_value", 0.1))
        spec.update(
            global_pool="avg" if config.get("use_mean_pooling", True) else "token",
            use_abs_pos_emb=bool(config.get("use_absolute_position_embeddings", False)),
            use_rel_pos_bias=bool(config.get("use_relative_position_bias", False)),
            use_shared_rel_pos_bias=bool(config.get("use_shared_relative_position_bias", False)),
            init_values=max(layer_scale, 0.0),  # 0: none (timm.create_model drops None)
        )
    else:
        spec.update(global_pool="token", qkv_bias=bool(config.get("qkv_bias", True)))
    return spec


def _transformer_state(sd: Mapping[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    top = _top(family)
    dropped = {
        f"{family}.embeddings.mask_token",
        "vit.pooler.dense.weight",
        "vit.pooler.dense.bias",
    }
    layer = re.compile(rf"^{family}\.layers\.(\d+)\.(.+)$")
    kept = {k: v for k, v in sd.items() if k not in dropped}
    out, qkv, unknown = map_layer_keys(kept, top, layer, _BLOCK.get)
    if unknown:
        raise CheckpointError(
            f"Hugging Face {family} weights have keys with no timm name: {sorted(unknown)[:6]}"
        )
    for i, parts in sorted(qkv.items()):
        out[f"blocks.{i}.attn.qkv.weight"] = stack_qkv_weight(
            parts, f"Hugging Face {family} layer {i}"
        )
        if family == "beit":
            error = f"Hugging Face BEiT layer {i} has a non-zero key bias; timm's Beit has none"
            out.update(beit_qv_biases(parts, i, error))
        else:
            biases = [parts.get(f"{n}.bias") for n in "qkv"]
            if all(b is not None for b in biases):
                out[f"blocks.{i}.attn.qkv.bias"] = torch.cat(biases)
            elif any(b is not None for b in biases):
                raise CheckpointError(
                    f"Hugging Face ViT layer {i} has biases on only some of q/k/v"
                )
    return out


def _label_names(config: Mapping[str, Any], num_classes: int | None) -> list[str] | None:
    """Class names from ``id2label`` (by index); None when absent or HF's ``LABEL_i`` defaults."""
    id2label = config.get("id2label") or {}
    if not id2label:
        return None
    try:
        items = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"Hugging Face config id2label has non-integer keys ({err})") from err
    if [i for i, _ in items] != list(range(len(items))):
        raise CheckpointError("Hugging Face config id2label keys are not 0 .. n-1")
    names = [name for _, name in items]
    if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None
    if num_classes is not None and len(names) != num_classes:
        raise CheckpointError(
            f"Hugging Face config id2label has {len(names)} labels but the classifier has "
            f"{num_classes} outputs"
        )
    return names


def hf_norm_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The norm settings of a HF config that timm's constructors cannot take.

    Returns:
        ``{"layer_norm_eps": float}`` (BEiT, ViT) or ``{"group_norm_groups": int}`` (BiT): the
        keyword arguments of :func:`apply_norm_settings`.
    """
    _, family, _ = _architecture(config)
    if family == "bit":
        return {"group_norm_groups": int(config.get("num_groups", TIMM_GROUPS))}
    return {"layer_norm_eps": float(config.get("layer_norm_eps", _HF_LAYER_NORM_EPS))}


def apply_norm_settings(
    model: nn.Module, layer_norm_eps: float | None = None, group_norm_groups: int | None = None
) -> nn.Module:
    """Set ``eps`` on every ``nn.LayerNorm`` / ``num_groups`` on every ``nn.GroupNorm``.

    Both are plain attributes read in ``forward``; the parameters do not change.

    Raises:
        CheckpointError: a group norm's channels are not divisible by ``group_norm_groups``.
    """
    for name, module in model.named_modules():
        if layer_norm_eps is not None and isinstance(module, nn.LayerNorm):
            module.eps = float(layer_norm_eps)
        if group_norm_groups is not None and isinstance(module, nn.GroupNorm):
            if module.num_channels % int(group_norm_groups):
                raise CheckpointError(
                    f"group norm '{name}' has {module.num_channels} channels, not divisible by "
                    f"num_groups={group_norm_groups}"
                )
            module.num_groups = int(group_norm_groups)
    return model


def from_hf_classifier(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert HF classifier weights to timm keys.

    Args:
        state_dict: HF weights (5.x or 4.x key spelling).
        config: the folder's ``config.json`` as a dict.

    Returns:
        ``(spec, state_dict)``: ``spec`` = ``create_classifier`` kwargs (``num_classes`` None for
        a head-less model), ``state_dict`` in timm names. See :func:`hf_norm_settings` for what
        the spec cannot carry.

    Raises:
        CheckpointError: another architecture, a config timm cannot build, or unknown weights.
    """
    _, family, _ = _architecture(config)
    sd = normalize_hf_keys(state_dict, family)
    if family == "bit":
        spec, state = bit_spec(config), bit_state(sd)
        head = state.get("head.fc.weight")
    else:
        spec, state = _transformer_spec(config, family), _transformer_state(sd, family)
        head = state.get("head.weight")
    num_classes = int(head.shape[0]) if head is not None else None
    return {"model_name": spec.pop("model_name"), "num_classes": num_classes, **spec}, state


def _load(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict]:
    state, config = load_hf_folder(folder)
    _architecture(config)  # the clear error before any other
    try:
        spec, timm_state = from_hf_classifier(state, config)
    except CheckpointError as err:
        raise CheckpointError(f"'{weights_file(folder)}': {err}") from None
    return spec, timm_state, config


def load_hf_classifier(
    folder: str | os.PathLike,
) -> tuple[str, dict[str, Any], dict[str, torch.Tensor], list[str] | None]:
    """Read a HF image-classifier folder as a timm classifier.

    Args:
        folder: a folder with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``
            / a sharded index) of one of :data:`ARCHITECTURES`.

    Returns:
        ``(model_name, spec, state_dict, label_names)``: ``create_classifier(**spec)`` builds the
        model (``spec["num_classes"]`` is None for a head-less folder: the caller chooses), the
        timm ``state_dict`` loads into it with ``strict=True``, ``label_names`` come from
        ``id2label`` (None when they are HF's ``LABEL_i`` defaults). The norm settings timm cannot
        take (see the module docstring) are applied by :func:`build_classifier_from_hf`.

    Raises:
        FileNotFoundError: no ``config.json`` or weights in the folder.
        CheckpointError: another architecture, or a model timm cannot represent.
    """
    spec, state, config = _load(folder)
    return spec["model_name"], spec, state, _label_names(config, spec["num_classes"])


def build_classifier_from_hf(
    folder: str | os.PathLike, num_classes: int | None = None
) -> nn.Module:
    """A HF image-classifier folder as a timm model in eval mode, with ``label_names``.

    ``create_classifier(**spec)``, then :func:`apply_norm_settings` (HF's ``layer_norm_eps`` /
    BiT ``num_groups``, when they differ from timm's), then a strict load of the weights.

    Args:
        folder: the HF folder (see :func:`load_hf_classifier`).
        num_classes: classes of a fresh head, for a head-less folder (``BeitModel`` ...) only.

    Raises:
        FileNotFoundError: no ``config.json`` or weights in the folder.
        CheckpointError: unsupported folder, weights that do not fit, or ``num_classes`` missing
            (head-less folder) / given for a folder that has a head of its own.
    """
    from bitrain.models.classifier import create_classifier

    spec, state, config = _load(folder)
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
    try:
        model = create_classifier(**spec)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"cannot build the timm model for '{folder}' ({spec}): {err}"
        ) from err
    settings = hf_norm_settings(config)
    apply_norm_settings(model, **settings)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(
            f"Hugging Face folder '{folder}' does not fit {spec['model_name']}({spec}): {err}"
        ) from err
    fresh = ("head.", "fc_norm.") if headless else ()
    missing = [k for k in result.missing_keys if not (fresh and k.startswith(fresh))]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"Hugging Face folder '{folder}' does not fit {spec['model_name']}({spec}): missing "
            f"{missing[:6]}, unexpected {result.unexpected_keys[:6]}"
        )
    if headless and result.missing_keys:
        log.info("'%s' has no head: left fresh %s", folder, result.missing_keys)
    model.label_names = None if headless else _label_names(config, spec["num_classes"])
    return model.eval()


# --- writing -----------------------------------------------------------------------------------


def _family(model: nn.Module) -> str:
    if isinstance(model, timm.models.beit.Beit):
        return "beit"
    if isinstance(model, timm.models.vision_transformer.VisionTransformer):
        return "vit"
    if isinstance(model, timm.models.resnetv2.ResNetV2):
        return "bit"
    raise CheckpointError(
        f"save_hf_classifier: a {type(model).__name__} has no Hugging Face classifier "
        "counterpart; supported: timm Beit, VisionTransformer and ResNetV2 (BiT)"
    )


def _transformer_to_hf(model: nn.Module, family: str) -> tuple[dict, dict[str, Any]]:
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    dim = int(model.embed_dim)
    out = unmap_layer_keys(
        sd,
        {v: k for k, v in _top(family).items()},
        family,
        {v: k for k, v in _BLOCK.items()}.get,
        dim,
        "to_hf_classifier: no Hugging Face name for timm key",
    )
    blocks = model.blocks
    attn = blocks[0].attn
    patch = model.patch_embed
    img, grid = tuple(patch.img_size), tuple(patch.patch_size)
    if img[0] != img[1] or grid[0] != grid[1]:
        raise CheckpointError(f"to_hf_classifier: image {img} / patch {grid} are not square")
    eps = one_value(model, nn.LayerNorm, "eps")
    config: dict[str, Any] = {
        "hidden_size": dim,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": int(attn.num_heads),
        "intermediate_size": int(blocks[0].mlp.fc1.out_features),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": float(eps),
        "image_size": int(img[0]),
        "patch_size": int(grid[0]),
        "num_channels": int(patch.proj.in_channels),
    }
    if family == "beit":
        if model.global_pool == "avg" and isinstance(model.fc_norm, nn.LayerNorm):
            mean_pooling = True
        elif model.global_pool == "token" and isinstance(model.norm, nn.LayerNorm):
            mean_pooling = False
        else:
            raise CheckpointError(
                f"to_hf_classifier: timm Beit with global_pool={model.global_pool!r} and "
                f"fc_norm={type(model.fc_norm).__name__}; Hugging Face BEiT pools by mean + "
                "fc_norm (global_pool='avg') or by the normed CLS token (global_pool='token')"
            )
        if attn.q_bias is None:  # HF always has q/v biases
            for i in range(len(blocks)):
                for name in ("q", "v"):
                    out[f"beit.layers.{i}.attention.{name}_proj.bias"] = torch.zeros(dim)
        init_values = getattr(model, "bitrain_spec", {}).get("init_values")
        has_scale = getattr(blocks[0], "gamma_1", None) is not None
        config.update(
            architectures=["BeitForImageClassification"],
            model_type="beit",
            use_mask_token=False,
            use_absolute_position_embeddings=model.pos_embed is not None,
            use_relative_position_bias=getattr(attn, "relative_position_bias_table", None)
            is not None,
            use_shared_relative_position_bias=model.rel_pos_bias is not None,
            layer_scale_init_value=float(init_values or 0.1) if has_scale else 0.0,
            drop_path_rate=0.0,
            use_mean_pooling=mean_pooling,
        )
        head = sd.get("head.weight")
    else:
        no_cls = getattr(model, "no_embed_class", False) or model.cls_token is None
        if no_cls or getattr(model, "num_reg_tokens", 0) or model.global_pool != "token":
            raise CheckpointError(
                "to_hf_classifier: Hugging Face ViT needs a timm VisionTransformer with a class "
                "token in pos_embed, no register tokens and global_pool='token'; got "
                f"global_pool={model.global_pool!r}"
            )
        if not isinstance(model.fc_norm, nn.Identity) or not isinstance(model.norm, nn.LayerNorm):
            raise CheckpointError("to_hf_classifier: ViT with fc_norm / without a final norm")
        config.update(
            architectures=["ViTForImageClassification"],
            model_type="vit",
            qkv_bias="blocks.0.attn.qkv.bias" in sd,
            encoder_stride=int(grid[0]),
        )
        head = sd.get("head.weight")
    config["num_labels"] = head_classes(head)
    return out, config


def to_hf_classifier(
    model: nn.Module, label_names: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Export a timm classifier as HF weights (4.x spelling) and a complete ``config.json`` dict.

    Args:
        model: a timm Beit, VisionTransformer or ResNetV2 (BiT) with a head, e.g. from
            :func:`~bitrain.models.classifier.create_classifier`.
        label_names: class names for ``id2label`` / ``label2id``; default ``LABEL_i``.

    Raises:
        CheckpointError: a model Hugging Face's classifiers cannot represent.
        ValueError: ``label_names`` of the wrong length.
    """
    family = _family(model)
    if family == "bit":
        out, config = bit_to_hf(model)
    else:
        out, config = _transformer_to_hf(model, family)
        out = {_to_legacy(k): v for k, v in out.items()}
    n = config.pop("num_labels")
    names = [f"LABEL_{i}" for i in range(n)] if label_names is None else list(label_names)
    if len(names) != n:
        raise ValueError(
            f"save_hf_classifier: {len(names)} label_names for a {n}-class model; give one name "
            "per class, in class-index order"
        )
    if len(set(names)) != len(names):
        raise ValueError("save_hf_classifier: label_names has duplicates (label2id needs unique)")
    config["id2label"] = {str(i): str(name) for i, name in enumerate(names)}
    config["label2id"] = {str(name): i for i, name in enumerate(names)}
    return {k: v.clone().contiguous() for k, v in out.items()}, config


def save_hf_classifier(
    model: nn.Module, folder: str | os.PathLike, label_names: list[str] | None = None
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``AutoModelForImageClassification`` loads.

    Args:
        model: see :func:`to_hf_classifier`.
        folder: created if missing; existing files of the same names are replaced atomically.
        label_names: class names; default: ``model.label_names`` when the model has them.

    Returns:
        The folder.
    """
    if label_names is None:
        label_names = getattr(model, "label_names", None)
    state, config = to_hf_classifier(model, label_names)
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    atomic_write_bytes(folder / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    return folder
