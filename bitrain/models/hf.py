"""Hugging Face ``BeitForMaskedImageModeling`` <-> :class:`~bitrain.models.beit.BeitMIM` weights.

Reads and writes Hugging Face folders (``config.json`` + ``model.safetensors``, or a
``pytorch_model.bin`` / sharded ``*.index.json``) with our own code: ``transformers`` is never
imported here, it is only the reference the parity tests compare against.

Key map (transformers 5.x spelling; the 4.x spelling is accepted on input, see
:data:`LEGACY_RENAMES`, which restates what transformers' own ``conversion_mapping.py`` does for
``BeitModel``)::

    beit.embeddings.{cls_token, mask_token}              cls_token, mask_token
    beit.embeddings.patch_embeddings.projection.*        patch_embed.proj.*
    beit.embeddings.position_embeddings                  pos_embed
    beit.shared_position_bias.relative_position_bias_table
                                                         rel_pos_bias.relative_position_bias_table
    beit.layers.i.attention.{q,k,v}_proj.weight          blocks.i.attn.qkv.weight  (stacked q;k;v)
    beit.layers.i.attention.{q,v}_proj.bias              blocks.i.attn.{q,v}_bias  (k has no bias)
    beit.layers.i.attention.o_proj.*                     blocks.i.attn.proj.*
    beit.layers.i.relative_position_bias.relative_position_bias_table
                                                         blocks.i.attn.relative_position_bias_table
    beit.layers.i.layernorm_{before,after}.*             blocks.i.norm{1,2}.*
    beit.layers.i.mlp.fc{1,2}.*                          blocks.i.mlp.fc{1,2}.*
    beit.layers.i.lambda_{1,2}                           blocks.i.gamma_{1,2}
    layernorm.*  (the MIM head's norm)                   norm.*
    lm_head.*                                            lm_head.*

Folders are written in the 4.x spelling, which transformers 4.x and 5.x both load (5.x renames on
load and writes 4.x itself). HF's ``BeitModel`` has its own final ``beit.layernorm`` unless
``use_mean_pooling`` is set, in which case it is an identity; the official pretraining model (and
ours) has a single final norm, so we write ``use_mean_pooling: true`` and refuse folders that
carry a second norm. HF's default ``layer_norm_eps`` is 1e-12 while BEiT's is 1e-6: the value
travels in the config both ways.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from bitrain.io import CheckpointError, atomic_write_bytes, load_torch_file
from bitrain.models.beit import BeitMIM

__all__ = [
    "LEGACY_RENAMES",
    "from_hf_beit",
    "load_hf_folder",
    "save_hf_folder",
    "to_hf_beit",
]

# transformers 4.x (and the checkpoints on the Hub converted with it) -> 5.x spelling, for BEiT
# (and ViT: bitrain.models.hf_classifier) weights.
LEGACY_RENAMES: list[tuple[str, str]] = [
    (r"^(beit|vit)\.encoder\.layer\.", r"\1.layers."),
    (r"^beit\.encoder\.relative_position_bias\.", "beit.shared_position_bias."),
    (r"\.attention\.attention\.relative_position_bias\.", ".relative_position_bias."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.gamma_([12])$", r".lambda_\1"),  # pre-release spelling of the layer-scale vectors
]

_HEAD = "beit."
_LAYER = re.compile(r"^beit\.layers\.(\d+)\.(.+)$")
_LAYER_RENAMES = {
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
    "attention.o_proj.": "attn.proj.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
    "lambda_1": "gamma_1",
    "lambda_2": "gamma_2",
    "relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
}
_TOP_RENAMES = {
    "beit.embeddings.cls_token": "cls_token",
    "beit.embeddings.mask_token": "mask_token",
    "beit.embeddings.position_embeddings": "pos_embed",
    "beit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "beit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "beit.shared_position_bias.relative_position_bias_table": (
        "rel_pos_bias.relative_position_bias_table"
    ),
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
}


def normalize_hf_keys(
    state_dict: Mapping[str, torch.Tensor], *, rename: bool = True
) -> dict[str, torch.Tensor]:
    """Rewrite legacy (transformers 4.x) keys to 5.x; drop ``relative_position_index`` buffers.

    Args:
        state_dict: Hugging Face weights.
        rename: apply :data:`LEGACY_RENAMES` (BEiT and ViT keys); ``False`` only drops buffers.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            continue  # a buffer derived from the grid, regenerated by the model
        if rename:
            for pattern, repl in LEGACY_RENAMES:
                key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def config_to_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``BeitMIM`` constructor arguments from a Hugging Face ``BeitConfig`` dict.

    Raises:
        CheckpointError: the config describes something ``BeitMIM`` cannot be (no mask token,
            non-square images, another activation, another model type).
    """
    if config.get("model_type", "beit") != "beit":
        raise CheckpointError(
            f"Hugging Face config has model_type {config['model_type']!r}, not 'beit'"
        )
    if not config.get("use_mask_token", False):
        raise CheckpointError(
            "Hugging Face BEiT config has use_mask_token=false: this is not a masked-image-"
            "modeling model (BeitForMaskedImageModeling); a classifier cannot be loaded as BeitMIM"
        )
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(
            f"Hugging Face BEiT config uses hidden_act={config['hidden_act']!r}; BeitMIM (timm) "
            "uses exact GELU ('gelu')"
        )
    hidden = int(config.get("hidden_size", 768))
    layer_scale = float(config.get("layer_scale_init_value", 0.1))
    return {
        "img_size": config_square(config, "image_size", 224),
        "patch_size": config_square(config, "patch_size", 16),
        "in_chans": int(config.get("num_channels", 3)),
        "vocab_size": int(config.get("vocab_size", 8192)),
        "embed_dim": hidden,
        "depth": int(config.get("num_hidden_layers", 12)),
        "num_heads": int(config.get("num_attention_heads", 12)),
        "mlp_ratio": int(config.get("intermediate_size", 4 * hidden)) / hidden,
        "qkv_bias": True,
        "drop_path_rate": float(config.get("drop_path_rate", 0.1)),
        "init_values": layer_scale if layer_scale > 0 else None,
        "use_abs_pos_emb": bool(config.get("use_absolute_position_embeddings", False)),
        "use_rel_pos_bias": bool(config.get("use_relative_position_bias", False)),
        "use_shared_rel_pos_bias": bool(config.get("use_shared_relative_position_bias", False)),
        "layer_norm_eps": float(config.get("layer_norm_eps", 1e-12)),
        "init_std": float(config.get("initializer_range", 0.02)),
    }


def config_square(
    config: Mapping[str, Any], name: str, default: int, what: str = "Hugging Face BEiT config"
) -> int:
    """The side of the square size ``config[name]`` (an int or a list/tuple of equal ints)."""
    value = config.get(name, default)
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise CheckpointError(f"{what}: {name}={value} is not square")
        value = value[0]
    return int(value)


def from_hf_beit(
    state_dict: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Convert a ``BeitForMaskedImageModeling`` state dict to ``BeitMIM`` keys.

    Args:
        state_dict: HF weights, 5.x or 4.x key spelling.
        config: the folder's ``config.json`` as a dict.

    Returns:
        ``(state_dict, model_kwargs)`` for ``BeitMIM(**model_kwargs).load_state_dict(...)``.

    Raises:
        CheckpointError: unknown keys, a missing q/k/v part, or a second final LayerNorm.
    """
    kwargs = config_to_kwargs(config)
    sd = normalize_hf_keys(state_dict)
    if any(k.startswith("beit.layernorm.") for k in sd):
        raise CheckpointError(
            "Hugging Face BEiT weights carry beit.layernorm (use_mean_pooling=false) as well as "
            "the MIM head's layernorm: two final norms, which BeitMIM (one final norm, like the "
            "official model) cannot represent"
        )
    out, qkv, unknown = map_layer_keys(sd, _TOP_RENAMES, _LAYER, _prefix_renamer(_LAYER_RENAMES))
    if unknown:
        raise CheckpointError(
            f"Hugging Face BEiT weights have keys BeitMIM does not know: {sorted(unknown)[:6]}"
        )
    for i, parts in sorted(qkv.items()):
        out[f"blocks.{i}.attn.qkv.weight"] = stack_qkv_weight(parts, f"Hugging Face BEiT layer {i}")
        out.update(beit_qv_biases(parts, i, f"Hugging Face BEiT layer {i} has a non-zero key bias"))
    return out, kwargs


def _prefix_renamer(renames: Mapping[str, str]) -> Callable[[str], str | None]:
    """Renames a per-layer key's rest by the first matching prefix of ``renames`` (else None)."""

    def rename(rest: str) -> str | None:
        for src, dst in renames.items():
            if rest.startswith(src):
                return dst + rest[len(src) :]
        return None

    return rename


_OUR_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_QKV_PROJ = re.compile(r"attention\.([qkv])_proj\.(weight|bias)")


def map_layer_keys(
    sd: Mapping[str, torch.Tensor],
    top: Mapping[str, str],
    layer: re.Pattern[str],
    rename: Callable[[str], str | None],
) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]], list[str]]:
    """Sort the HF (5.x spelling) weights of a BEiT or ViT into ``blocks.i.*`` names.

    Used by :func:`from_hf_beit` and :mod:`bitrain.models.hf_classifier`.

    Args:
        sd: HF weights in 5.x spelling.
        top: whole-model HF name -> our name.
        layer: matches per-layer keys; group 1 is the layer index, group 2 the rest.
        rename: our name (after ``blocks.i.``) of a per-layer rest, or None when it has none.

    Returns:
        ``(out, qkv, unknown)``: renamed tensors; per layer, the q/k/v projections as
        ``{"q.weight": ..., "k.bias": ...}`` (stacked by the caller, see
        :func:`stack_qkv_weight`); the keys with no name.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
            continue
        match = layer.match(key)
        if match is None:
            unknown.append(key)
            continue
        i, rest = int(match.group(1)), match.group(2)
        proj = _QKV_PROJ.fullmatch(rest)
        if proj:
            qkv.setdefault(i, {})[f"{proj.group(1)}.{proj.group(2)}"] = value
            continue
        name = rename(rest)
        if name is None:
            unknown.append(key)
        else:
            out[f"blocks.{i}.{name}"] = value
    return out, qkv, unknown


def unmap_layer_keys(
    sd: Mapping[str, torch.Tensor],
    top: Mapping[str, str],
    family: str,
    rename: Callable[[str], str | None],
    dim: int,
    error: str,
) -> dict[str, torch.Tensor]:
    """Our BEiT / ViT weights (detached) in HF 5.x names: the inverse of :func:`map_layer_keys`.

    ``attn.qkv.*`` is split into ``attention.{q,k,v}_proj.*`` and BEiT's ``attn.{q,v}_bias`` go to
    ``attention.{q,v}_proj.bias``; ``relative_position_index`` buffers are left out.

    Args:
        sd: our state dict.
        top: our whole-model name -> HF name.
        family: the HF prefix (``beit`` / ``vit``) of ``{family}.layers.i.*``.
        rename: HF name (after ``{family}.layers.i.``) of a per-block rest, or None.
        dim: the embedding width (rows of each of q, k, v).
        error: the start of the message for a key with no HF name.

    Raises:
        CheckpointError: a key with no HF name.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        value = value.detach()
        if key.endswith("relative_position_index"):
            continue
        if key in top:
            out[top[key]] = value
            continue
        match = _OUR_BLOCK.match(key)
        if match is None:
            raise CheckpointError(f"{error} {key!r}")
        pre, rest = f"{family}.layers.{match.group(1)}.", match.group(2)
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            for n, part in zip("qkv", value.split(dim, dim=0), strict=True):
                out[f"{pre}attention.{n}_proj.{kind}"] = part
        elif rest in ("attn.q_bias", "attn.v_bias"):
            out[f"{pre}attention.{rest[5]}_proj.bias"] = value
        elif (name := rename(rest)) is not None:
            out[pre + name] = value
        else:
            raise CheckpointError(f"{error} {key!r}")
    return out


def weight_bias(hf: str, timm: str) -> dict[str, str]:
    """``{hf.weight: timm.weight, hf.bias: timm.bias}``: one key-map entry per parameter."""
    return {f"{hf}.weight": f"{timm}.weight", f"{hf}.bias": f"{timm}.bias"}


def one_value(model: torch.nn.Module, kind: type[torch.nn.Module], attr: str) -> Any:
    """The single value of ``attr`` over the model's ``kind`` modules (HF configs hold one).

    Raises:
        CheckpointError: the modules disagree (or there are none).
    """
    values = {getattr(m, attr) for m in model.modules() if isinstance(m, kind)}
    if len(values) != 1:
        raise CheckpointError(
            f"to_hf_classifier: the model's {kind.__name__} layers have {attr} values "
            f"{sorted(values)}; Hugging Face configs have one"
        )
    return values.pop()


def head_classes(weight: torch.Tensor | None) -> int:
    """Classes of a classifier head weight; a head-less model cannot be exported as a classifier."""
    if weight is None:
        raise CheckpointError(
            "to_hf_classifier: the model has no classification head (num_classes=0)"
        )
    return int(weight.shape[0])


def stack_qkv_weight(parts: Mapping[str, torch.Tensor], where: str) -> torch.Tensor:
    """The ``attn.qkv.weight`` of one layer's q/k/v weights (``where`` names it in errors)."""
    missing = {"q.weight", "k.weight", "v.weight"} - parts.keys()
    if missing:
        raise CheckpointError(f"{where} lacks attention {sorted(missing)}")
    shapes = {n: tuple(parts[f"{n}.weight"].shape) for n in ("q", "k", "v")}
    if len(set(shapes.values())) != 1 or len(shapes["q"]) != 2:
        names = {"q": "query", "k": "key", "v": "value"}
        detail = ", ".join(f"{names[n]}.weight {list(s)}" for n, s in shapes.items())
        raise CheckpointError(
            f"{where}: the attention weights do not fit together ({detail}); each must be "
            "[hidden_size, hidden_size]: the weights file is damaged or from another model"
        )
    return torch.cat([parts["q.weight"], parts["k.weight"], parts["v.weight"]], dim=0)


def beit_qv_biases(
    parts: Mapping[str, torch.Tensor], i: int, key_bias_error: str
) -> dict[str, torch.Tensor]:
    """BEiT's separate ``blocks.i.attn.{q,v}_bias`` of layer ``i``; a non-zero k bias is refused.

    Raises:
        CheckpointError: with ``key_bias_error``, when the layer's key bias is not zero.
    """
    if "k.bias" in parts and bool(parts["k.bias"].any()):
        raise CheckpointError(key_bias_error)
    return {
        f"blocks.{i}.attn.{name}_bias": parts[f"{name}.bias"]
        for name in ("q", "v")
        if f"{name}.bias" in parts
    }


def to_hf_beit(
    model: BeitMIM, spelling: Literal["4.x", "5.x"] = "4.x"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Export a ``BeitMIM`` as a ``BeitForMaskedImageModeling`` state dict and config dict.

    A model built with ``qkv_bias=False`` is written with zero q/v biases (HF always has them).

    Args:
        model: the model to export.
        spelling: key spelling. ``"4.x"`` (default) is what the Hub's BEiT checkpoints use and
            what transformers 5 itself writes with ``save_pretrained``; transformers 4.x and 5.x
            both load it. ``"5.x"`` is the in-memory spelling of transformers 5.

    Returns:
        ``(state_dict, config)``: contiguous tensors and a complete ``config.json`` dict.
    """
    dim = model.embed_dim
    out = unmap_layer_keys(
        model.state_dict(),
        {v: k for k, v in _TOP_RENAMES.items()},
        "beit",
        _prefix_renamer({v: k for k, v in _LAYER_RENAMES.items()}),
        dim,
        "to_hf_beit: no Hugging Face name for BeitMIM key",
    )
    if not model.model_kwargs["qkv_bias"]:
        for i in range(len(model.blocks)):
            for name in ("q", "v"):
                out[f"beit.layers.{i}.attention.{name}_proj.bias"] = torch.zeros(dim)
    if spelling == "4.x":
        out = {_to_legacy(k): v for k, v in out.items()}
    elif spelling != "5.x":
        raise ValueError(f"to_hf_beit: spelling must be '4.x' or '5.x', got {spelling!r}")
    out = {k: v.clone().contiguous() for k, v in out.items()}
    return out, kwargs_to_config(model.model_kwargs)


# transformers 5.x -> 4.x spelling (the inverse of LEGACY_RENAMES, without the gamma alias).
_TO_LEGACY: list[tuple[str, str]] = [
    (r"^(beit|vit)\.layers\.", r"\1.encoder.layer."),
    (r"^beit\.shared_position_bias\.", "beit.encoder.relative_position_bias."),
    (
        r"^(beit\.encoder\.layer\.\d+)\.relative_position_bias\.",
        r"\1.attention.attention.relative_position_bias.",
    ),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]


def _to_legacy(key: str) -> str:
    """A transformers 5.x key in the 4.x spelling (BEiT and ViT)."""
    for pattern, repl in _TO_LEGACY:
        key = re.sub(pattern, repl, key)
    return key


def kwargs_to_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A complete Hugging Face ``BeitConfig`` dict for ``BeitForMaskedImageModeling``."""
    dim = int(kwargs["embed_dim"])
    return {
        "architectures": ["BeitForMaskedImageModeling"],
        "model_type": "beit",
        "vocab_size": int(kwargs["vocab_size"]),
        "hidden_size": dim,
        "num_hidden_layers": int(kwargs["depth"]),
        "num_attention_heads": int(kwargs["num_heads"]),
        "intermediate_size": int(dim * kwargs["mlp_ratio"]),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": float(kwargs["init_std"]),
        "layer_norm_eps": float(kwargs["layer_norm_eps"]),
        "image_size": int(kwargs["img_size"]),
        "patch_size": int(kwargs["patch_size"]),
        "num_channels": int(kwargs["in_chans"]),
        "use_mask_token": True,
        "use_absolute_position_embeddings": bool(kwargs["use_abs_pos_emb"]),
        "use_relative_position_bias": bool(kwargs["use_rel_pos_bias"]),
        "use_shared_relative_position_bias": bool(kwargs["use_shared_rel_pos_bias"]),
        "layer_scale_init_value": float(kwargs["init_values"] or 0.0),
        "drop_path_rate": float(kwargs["drop_path_rate"]),
        "use_mean_pooling": True,  # BeitModel's own final norm = identity; the head's is ours
        "pool_scales": [1, 2, 3, 6],
        "use_auxiliary_head": True,
        "auxiliary_loss_weight": 0.4,
        "auxiliary_channels": 256,
        "auxiliary_num_convs": 1,
        "auxiliary_concat_input": False,
        "semantic_loss_ignore_index": 255,
        "add_fpn": False,
        "reshape_hidden_states": True,
    }


# --- folders -----------------------------------------------------------------------------------


def weights_file(folder: str | os.PathLike) -> str:
    """The weights file name of a Hugging Face folder, for error messages."""
    folder = Path(folder)
    for name in (
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
        "model.safetensors",
        "pytorch_model.bin",
    ):
        if (folder / name).is_file():
            return str(folder / name)
    return str(folder)


def load_hf_folder(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a Hugging Face model folder: ``(state_dict, config)``.

    Weights from ``model.safetensors``, a sharded ``model.safetensors.index.json``, or
    ``pytorch_model.bin`` (read weights-only).

    Raises:
        FileNotFoundError: no ``config.json`` or no weights file in the folder.
        CheckpointError: ``config.json`` is not valid JSON.
    """
    folder = Path(path).expanduser()
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"Hugging Face folder '{folder}' has no config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"'{cfg_path}' is not valid JSON ({err})") from err
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_weights(folder / shard))
            return state, config
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _read_weights(folder / name), config
    raise FileNotFoundError(
        f"Hugging Face folder '{folder}' has config.json but no model.safetensors or "
        "pytorch_model.bin"
    )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"could not read safetensors file '{path}' ({err})") from err
    state = load_torch_file(path, what="Hugging Face weights")
    if not isinstance(state, dict):
        raise CheckpointError(f"'{path}' holds a {type(state).__name__}, not a state dict")
    return state


def save_hf_folder(model: BeitMIM, path: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``BeitForMaskedImageModeling`` loads.

    Returns:
        The folder.
    """
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    state, config = to_hf_beit(model)
    tmp = folder / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    atomic_write_bytes(folder / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    return folder
