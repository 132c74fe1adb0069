"""Hugging Face model folders <-> bitrain / timm: files, configs, one rename table per family.

After transformers' ``create_rename_keys`` + ``read_in_q_k_v`` (convert_beit_unilm_to_pytorch.py)
and timm's ``checkpoint_filter_fn``: a family's weights are ONE list of ``(hf, ours)`` rules
(:data:`RULES`) that :func:`from_hf` applies HF -> ours and :func:`to_hf` backwards, around one step
each for HF's q/k/v <-> timm's ``attn.qkv`` and BiT's Linear head ``[C, F]`` <-> timm's 1x1 conv
``[C, F, 1, 1]``. The rules are in transformers 5.x's key spelling; the Hub's 4.x one (which bitrain
writes) is converted at the edge. What the other side cannot be exactly is a
:class:`CheckpointError` saying why. ``transformers`` itself is only the parity tests' reference.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from timm.layers import StdConv2d
from timm.models.beit import Beit
from timm.models.resnetv2 import PreActBottleneck, ResNetV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from bitrain.checkpoints.official import TIMM_BEIT
from bitrain.io import CheckpointError, atomic_write_bytes, load_torch_file
from bitrain.models.beit import BeitMIM

State = dict[str, torch.Tensor]

# HF architecture -> (family, kind): "mim" (masked image modeling), "classifier", "backbone".
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "BeitForMaskedImageModeling": ("beit", "mim"),
    "BeitForImageClassification": ("beit", "classifier"),
    "BeitModel": ("beit", "backbone"),
    "ViTForImageClassification": ("vit", "classifier"),
    "ViTModel": ("vit", "backbone"),
    "BitForImageClassification": ("bit", "classifier"),
    "BitModel": ("bit", "backbone"),
}
_NAMES = {"beit": "BEiT", "vit": "ViT", "bit": "BiT"}

# --- key spelling ---------------------------------------------------------------------------------
# transformers' (5.x, 4.x) BEiT/ViT key spellings as regex fragments, forwards for 4.x -> 5.x,
# backwards for 5.x -> 4.x; the order keeps a rule off another's output (o_proj before fc2).
SPELLING: list[tuple[str, str]] = [
    (r"^(beit|vit)\.layers\.", r"^(beit|vit)\.encoder\.layer\."),
    (r"^beit\.shared_position_bias\.", r"^beit\.encoder\.relative_position_bias\."),
    (r"\.relative_position_bias\.", r"\.attention\.attention\.relative_position_bias\."),
    (r"\.attention\.q_proj\.", r"\.attention\.attention\.query\."),
    (r"\.attention\.k_proj\.", r"\.attention\.attention\.key\."),
    (r"\.attention\.v_proj\.", r"\.attention\.attention\.value\."),
    (r"\.attention\.o_proj\.", r"\.attention\.output\.dense\."),
    (r"\.mlp\.fc1\.", r"\.intermediate\.dense\."),
    (r"\.mlp\.fc2\.", r"\.output\.dense\."),
]


def _replacement(fragment: str) -> str:
    """A :data:`SPELLING` fragment as replacement text, its group kept as group 1."""
    return re.sub(r"\([^)]*\)", r"\\1", fragment).replace("\\.", ".").removeprefix("^")


def to_5x(key: str) -> str:
    """A transformers 4.x (or 5.x) key in the 5.x spelling."""
    for five, four in SPELLING:
        key = re.sub(four, _replacement(five), key)
    return re.sub(r"\.gamma_([12])$", r".lambda_\1", key)  # BEiT's pre-release layer scale


def to_4x(key: str) -> str:
    """A transformers 5.x key in the 4.x spelling (what bitrain writes)."""
    for five, four in reversed(SPELLING):
        key = re.sub(five, _replacement(four), key)
    return key


# --- folders --------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a :class:`CheckpointError` naming the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"'{path}' is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"'{path}' holds a {type(value).__name__}, not a JSON object")
    return value


def read_weights(path: Path) -> State:
    """Tensors of a ``.safetensors`` file or a weights-only torch file (a state dict)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"could not read safetensors file '{path}' ({err})") from None
    state = load_torch_file(path, what="weights file")
    if not isinstance(state, dict):
        raise CheckpointError(f"'{path}' holds a {type(state).__name__}, not a state dict")
    return state


_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_folder(path: str | os.PathLike) -> tuple[State, dict[str, Any], Path]:
    """``(state_dict, config, weights file)`` of a Hugging Face (or timm hub) model folder."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder '{folder}' has no config.json")
    config = read_json(folder / "config.json")
    names = (*_INDEX_FILES, "model.safetensors", "pytorch_model.bin")
    weights = next((folder / n for n in names if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"'{folder}' has no model.safetensors or pytorch_model.bin")
    if weights.name not in _INDEX_FILES:
        return read_weights(weights), config, weights
    weight_map = read_json(weights).get("weight_map")
    if not isinstance(weight_map, Mapping):
        raise CheckpointError(f"'{weights}' has no weight_map")
    state: State = {}
    for shard in sorted({str(v) for v in weight_map.values()}):
        shard_path = (folder / shard).resolve()
        if shard_path.parent != folder.resolve():
            raise CheckpointError(f"'{weights}' names a shard outside the folder: {shard!r}")
        state.update(read_weights(shard_path))
    return state, config, weights


def write_folder(
    folder: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    **json_files: Mapping[str, Any],
) -> Path:
    """``model.safetensors`` + ``config.json`` (+ ``NAME.json`` for each keyword), each atomic."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    blob = safetensors_bytes(tensors, metadata={"format": "pt"})
    atomic_write_bytes(folder / "model.safetensors", blob)
    for name, value in {"config": config, **json_files}.items():
        atomic_write_bytes(folder / f"{name}.json", (json.dumps(value, indent=2) + "\n").encode())
    return folder


# --- configs and labels ---------------------------------------------------------------------------
def architecture(config: Mapping[str, Any], where: str = "Hugging Face config") -> tuple[str, ...]:
    """``(architecture, family, kind)`` of a config's ``architectures``, or a CheckpointError."""
    names = [str(a) for a in config.get("architectures") or []]
    for name in names:
        if name in ARCHITECTURES:
            return (name, *ARCHITECTURES[name])
    raise CheckpointError(
        f"{where} names architectures {names or '(none)'}; bitrain reads "
        f"{', '.join(ARCHITECTURES)} (Hugging Face) and timm hub folders ('architecture')"
    )


def label_list(names: Any, where: str, num_classes: int | None = None) -> list[str] | None:
    """Class names from a list or an ``{index: name}`` mapping (keys 0 .. n-1); None if none."""
    if not names:
        return None
    if isinstance(names, Mapping):
        try:
            items = sorted((int(k), str(v)) for k, v in names.items())
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{where} has non-integer keys ({err})") from None
        if [i for i, _ in items] != list(range(len(items))):
            raise CheckpointError(f"{where} keys are not 0 .. n-1")
        names = [name for _, name in items]
    names = [str(n) for n in names]
    if num_classes is not None and len(names) != num_classes:
        raise CheckpointError(f"{where} has {len(names)} labels for a {num_classes}-class head")
    return names


def label_names(config: Mapping[str, Any], num_classes: int | None = None) -> list[str] | None:
    """Class names of a config's ``id2label``; None when absent or HF's ``LABEL_i`` defaults."""
    names = label_list(config.get("id2label"), "Hugging Face config id2label")
    if names is None or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return label_list(names, "Hugging Face config id2label", num_classes)


def _square(config: Mapping[str, Any], name: str, default: int) -> int:
    value = config.get(name, default)
    sides = set(value) if isinstance(value, list | tuple) else {value}
    if len(sides) != 1:
        raise CheckpointError(f"Hugging Face config: {name}={value} is not square")
    return int(sides.pop())


def _one_value(model: nn.Module, kind: type[nn.Module], attr: str) -> Any:
    values = {getattr(m, attr) for m in model.modules() if isinstance(m, kind)}
    if len(values) != 1:
        raise CheckpointError(
            f"the model's {kind.__name__}s differ in {attr} ({sorted(values)}); HF configs hold one"
        )
    return values.pop()


# --- the rename engine ----------------------------------------------------------------------------
# What each {slot} of a rule matches; a rule's two sides name the same slots.
SLOTS = {"i": r"\d+", "j": r"\d+", "n": "[12]", "p": "[qkv]", "w": "weight|bias"}
SLOTS["bit"] = r"(?:conv[123]|downsample\.conv)\.weight|norm[123]\.(?:weight|bias)"  # BiT block
_TABLE = "relative_position_bias_table"
_ENCODER = [  # BEiT and ViT alike, after their "beit." / "vit." prefix
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.{w}", "patch_embed.proj.{w}"),
    ("layers.{i}.layernorm_before.{w}", "blocks.{i}.norm1.{w}"),
    ("layers.{i}.layernorm_after.{w}", "blocks.{i}.norm2.{w}"),
    ("layers.{i}.attention.{p}_proj.{w}", "blocks.{i}.attn.{p}_proj.{w}"),  # <-> attn.qkv: _qkv_*
    ("layers.{i}.attention.o_proj.{w}", "blocks.{i}.attn.proj.{w}"),
    ("layers.{i}.mlp.fc{n}.{w}", "blocks.{i}.mlp.fc{n}.{w}"),
]
_BEIT = [
    *((f"beit.{hf}", ours) for hf, ours in _ENCODER),
    ("beit.layers.{i}.lambda_{n}", "blocks.{i}.gamma_{n}"),
    ("beit.layers.{i}.relative_position_bias." + _TABLE, "blocks.{i}.attn." + _TABLE),
    ("beit.shared_position_bias." + _TABLE, "rel_pos_bias." + _TABLE),
]
# (hf, ours) per table; None: the other side's key has no counterpart (dropped on the way in).
# HF's BeitModel adds beit.layernorm unless use_mean_pooling; BeitMIM, as the official model, has
# only the MIM head's.
RULES: dict[str, list[tuple[str, str | None]]] = {
    "mim": [
        *_BEIT,
        ("beit.embeddings.mask_token", "mask_token"),
        ("layernorm.{w}", "norm.{w}"),
        ("lm_head.{w}", "lm_head.{w}"),
    ],
    "beit": [
        *_BEIT,
        ("beit.embeddings.mask_token", None),
        ("beit.layernorm.{w}", "norm.{w}"),
        ("beit.pooler.layernorm.{w}", "fc_norm.{w}"),
        ("classifier.{w}", "head.{w}"),
    ],
    "vit": [  # a timm classifier pools by the class token and has no pooler
        *((f"vit.{hf}", ours) for hf, ours in _ENCODER),
        ("vit.embeddings.mask_token", None),
        ("vit.pooler.dense.{w}", None),
        ("vit.layernorm.{w}", "norm.{w}"),
        ("classifier.{w}", "head.{w}"),
    ],
    "bit": [
        ("bit.embedder.convolution.weight", "stem.conv.weight"),
        ("bit.encoder.stages.{i}.layers.{j}.{bit}", "stages.{i}.blocks.{j}.{bit}"),
        ("bit.norm.{w}", "norm.{w}"),
        ("classifier.1.{w}", "head.fc.{w}"),  # weight [C, F] <-> [C, F, 1, 1]
    ],
}


@functools.cache
def _regex(rule_side: str) -> re.Pattern:
    """One side of a rule as a regex: literal text escaped, each ``{slot}`` a named group."""
    side = re.split(r"\{(\w+)\}", rule_side)
    pattern = "".join(f"(?P<{p}>{SLOTS[p]})" if k % 2 else re.escape(p) for k, p in enumerate(side))
    return re.compile(pattern)


def rename(
    state: Mapping[str, torch.Tensor], rules: list[tuple[str | None, str | None]], backwards: bool
) -> tuple[State, list[str]]:
    """``(state renamed by the first rule that matches, keys none matched)``; targets None dropped.

    Rules read HF -> ours, ``backwards`` ours -> HF. ``relative_position_index`` buffers are dropped
    too (each model rebuilds its own).
    """
    pairs = [(ours, hf) if backwards else (hf, ours) for hf, ours in rules]
    out, unknown = {}, []
    for key, value in state.items():
        if key.endswith("relative_position_index"):
            continue
        for source, target in pairs:
            if source is not None and (match := _regex(source).fullmatch(key)):
                if target is not None:
                    out[target.format(**match.groupdict())] = value
                break
        else:
            unknown.append(key)
    return out, unknown


# blocks.i.attn. then: a q/k/v part (groups 2, 3), timm's fused qkv (4), BEiT's q_bias / v_bias (5)
_QKV = re.compile(
    r"(blocks\.\d+\.attn\.)(?:([qkv])_proj\.(weight|bias)|qkv\.(weight|bias)|([qv])_bias)"
)


def _qkv_in(state: State, beit: bool, where: str) -> State:
    """``attn.{q,k,v}_proj`` -> timm's ``attn.qkv``; BEiT keeps q and v biases apart (k's is 0)."""
    out: State = {}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _QKV.fullmatch(key)
        if match and match[2]:
            layers.setdefault(match[1], {})[f"{match[2]}.{match[3]}"] = value
        else:
            out[key] = value
    for pre, parts in layers.items():
        here = f"{where}, layer {pre.split('.')[1]}"
        missing = {"q.weight", "k.weight", "v.weight"} - parts.keys()
        if missing:
            raise CheckpointError(f"{here} lacks attention {sorted(missing)}")
        shapes = {n: tuple(parts[f"{n[0]}.weight"].shape) for n in ("query", "key", "value")}
        if len(set(shapes.values())) != 1 or len(shapes["query"]) != 2:
            detail = ", ".join(f"{n}.weight {list(s)}" for n, s in shapes.items())
            raise CheckpointError(
                f"{here}: attention {detail} do not fit together; each must be [hidden_size, "
                "hidden_size]: the weights file is damaged or from another model"
            )
        out[pre + "qkv.weight"] = torch.cat([parts[f"{n}.weight"] for n in "qkv"])
        q, k, v = (parts.get(f"{n}.bias") for n in "qkv")
        if beit:
            if k is not None and bool(k.any()):
                raise CheckpointError(f"{here} has a non-zero key bias; BEiT has none")
            out.update({f"{pre}{n}_bias": b for n, b in (("q", q), ("v", v)) if b is not None})
        elif all(b is not None for b in (q, k, v)):
            out[pre + "qkv.bias"] = torch.cat([q, k, v])
        elif any(b is not None for b in (q, k, v)):
            raise CheckpointError(f"{here} has biases on only some of q/k/v")
    return out


def _qkv_out(state: State, dim: int, beit: bool) -> State:
    """``attn.qkv`` (and BEiT's ``{q,v}_bias``, zeros if none) -> ``attn.{q,k,v}_proj``."""
    out: State = {}
    for key, value in state.items():
        match = _QKV.fullmatch(key)
        if match and match[4]:
            parts = value.split(dim)
            out.update({f"{match[1]}{n}_proj.{match[4]}": p for n, p in zip("qkv", parts)})
            for n in "qv" if beit else "":
                out.setdefault(f"{match[1]}{n}_proj.bias", torch.zeros(dim, dtype=value.dtype))
        elif match and match[5]:
            out[f"{match[1]}{match[5]}_proj.bias"] = value
        else:
            out[key] = value
    return out


# --- both ways ------------------------------------------------------------------------------------
def from_hf(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> tuple[State, dict[str, Any]]:
    """HF weights (4.x or 5.x spelling) -> ``(our state dict, our arguments)``, by architecture.

    ``BeitMIM`` keys and kwargs for ``BeitForMaskedImageModeling``, else timm keys and the
    ``create_classifier`` spec (``num_classes`` None without a head); the config is checked first.
    """
    _, family, kind = architecture(config)
    args = _args(config, family, kind)
    sd = {}
    for key, value in state_dict.items():
        if kind != "mim" and not key.startswith((f"{family}.", "classifier.")):
            key = f"{family}.{key}"  # head-less models are saved without the prefix
        sd[to_5x(key)] = value
    if kind == "mim" and any(k.startswith("beit.layernorm.") for k in sd):
        raise CheckpointError(
            "Hugging Face BEiT weights carry beit.layernorm (use_mean_pooling=false) and the MIM "
            "head's layernorm: two final norms; BeitMIM has one, like the official model"
        )
    where = f"Hugging Face {_NAMES[family]} weights"
    state, unknown = rename(sd, RULES["mim" if kind == "mim" else family], backwards=False)
    if unknown:
        raise CheckpointError(f"{where} have keys with no timm name: {sorted(unknown)[:6]}")
    if family != "bit":
        state = _qkv_in(state, family == "beit", where)
    elif (fc := state.get("head.fc.weight")) is not None:
        state["head.fc.weight"] = fc.reshape(*fc.shape, 1, 1)
    if kind != "mim":
        head = state.get("head.weight", state.get("head.fc.weight"))
        args["num_classes"] = None if head is None else int(head.shape[0])
    return state, args


def to_hf(
    model: nn.Module, label_names: list[str] | None = None, spelling: str = "4.x"
) -> tuple[State, dict[str, Any]]:
    """A ``BeitMIM`` or a timm Beit / VisionTransformer / ResNetV2 (BiT) classifier as HF files.

    Classifiers' ``id2label`` come from ``label_names`` (else ``LABEL_i``). ``spelling``: "4.x" (the
    Hub's files) or "5.x" (transformers 5's in-memory names).
    """
    if spelling not in ("4.x", "5.x"):
        raise ValueError(f"spelling must be '4.x' or '5.x', got {spelling!r}")
    kinds = ((BeitMIM, "mim"), (Beit, "beit"), (VisionTransformer, "vit"), (ResNetV2, "bit"))
    table = next((name for cls, name in kinds if isinstance(model, cls)), None)
    if table is None:
        raise CheckpointError(
            f"a {type(model).__name__} has no Hugging Face counterpart; supported: bitrain's "
            "BeitMIM and timm Beit, VisionTransformer and ResNetV2 (BiT) classifiers"
        )
    config = _bit_config(model) if table == "bit" else _encoder_config(model, table)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if table == "bit" and "head.fc.weight" in state:
        state["head.fc.weight"] = state["head.fc.weight"].flatten(1)
    elif table != "bit":
        state = _qkv_out(state, int(model.embed_dim), beit=table != "vit")
    state, unknown = rename(state, RULES[table], backwards=True)
    if unknown:
        raise CheckpointError(f"to Hugging Face: no Hugging Face name for {sorted(unknown)[:6]}")
    if table != "mim":
        config.update(_labels(model, label_names))
    key = to_4x if spelling == "4.x" else str
    return {key(k): v.clone().contiguous() for k, v in state.items()}, config


def _labels(model: nn.Module, label_names: list[str] | None) -> dict[str, Any]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module) or not list(head.parameters()):
        raise CheckpointError("the model has no classification head (num_classes=0) to export")
    n = int(model.num_classes)
    names = [f"LABEL_{i}" for i in range(n)] if label_names is None else list(label_names)
    if len(names) != n:
        raise ValueError(f"{len(names)} label_names for a {n}-class model; one per class, in order")
    if len(set(names)) != len(names):
        raise ValueError("label_names has duplicates (label2id needs unique names)")
    id2label = {str(i): str(name) for i, name in enumerate(names)}
    return {"id2label": id2label, "label2id": {name: int(i) for i, name in id2label.items()}}


# --- BEiT and ViT configs -------------------------------------------------------------------------
TIMM_VIT = "vit_base_patch32_224"


def _args(config: Mapping[str, Any], family: str, kind: str) -> dict[str, Any]:
    """``BeitMIM`` kwargs (``kind="mim"``), else the ``create_classifier`` spec less num_classes."""
    if family == "bit":
        return _bit_spec(config)
    if family == "beit" and config.get("model_type", "beit") != "beit":
        raise CheckpointError(f"Hugging Face config has model_type {config['model_type']!r}")
    if kind == "mim" and not config.get("use_mask_token", False):
        raise CheckpointError(
            "Hugging Face BEiT config has use_mask_token=false: not a BeitForMaskedImageModeling"
        )
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(
            f"Hugging Face {_NAMES[family]} config has hidden_act={config['hidden_act']!r}; "
            "timm's model uses exact GELU ('gelu')"
        )
    hidden = int(config.get("hidden_size", 768))
    inner = int(config.get("intermediate_size", 4 * hidden))
    if int(hidden * (inner / hidden)) != inner:
        raise CheckpointError(
            f"Hugging Face config: intermediate_size={inner} is not int(hidden_size * r) for "
            f"r = {inner / hidden}; timm cannot build this MLP width"
        )
    args = {
        "img_size": _square(config, "image_size", 224),
        "patch_size": _square(config, "patch_size", 16),
        "in_chans": int(config.get("num_channels", 3)),
        "embed_dim": hidden,
        "depth": int(config.get("num_hidden_layers", 12)),
        "num_heads": int(config.get("num_attention_heads", 12)),
        "mlp_ratio": inner / hidden,
        "layer_norm_eps": float(config.get("layer_norm_eps", 1e-12)),  # BeitConfig / ViTConfig
    }
    if family == "vit":
        qkv_bias = bool(config.get("qkv_bias", True))
        return {"model_name": TIMM_VIT, **args, "global_pool": "token", "qkv_bias": qkv_bias}
    args["use_abs_pos_emb"] = bool(config.get("use_absolute_position_embeddings", False))
    args["use_rel_pos_bias"] = bool(config.get("use_relative_position_bias", False))
    args["use_shared_rel_pos_bias"] = bool(config.get("use_shared_relative_position_bias", False))
    layer_scale = float(config.get("layer_scale_init_value", 0.1))
    if kind != "mim":
        pool = "avg" if config.get("use_mean_pooling", True) else "token"
        init = max(layer_scale, 0.0)  # not None: timm drops it and beit_base's 0.1 would apply
        return {"model_name": TIMM_BEIT, **args, "global_pool": pool, "init_values": init}
    return {
        **args,
        "vocab_size": int(config.get("vocab_size", 8192)),
        "qkv_bias": True,
        "drop_path_rate": float(config.get("drop_path_rate", 0.1)),
        "init_values": layer_scale if layer_scale > 0 else None,
        "init_std": float(config.get("initializer_range", 0.02)),
    }


def _encoder_config(model: Beit | VisionTransformer, table: str) -> dict[str, Any]:
    """The ``BeitConfig`` (``table`` "mim" / "beit") or ``ViTConfig`` of a model HF's can be."""
    blocks, patch = model.blocks, model.patch_embed
    img, grid = tuple(patch.img_size), tuple(patch.patch_size)
    if img[0] != img[1] or grid[0] != grid[1]:
        raise CheckpointError(f"to Hugging Face: image {img} / patch {grid} are not square")
    config = {
        "hidden_size": int(model.embed_dim),
        "num_hidden_layers": len(blocks),
        "num_attention_heads": int(blocks[0].attn.num_heads),
        "intermediate_size": int(blocks[0].mlp.fc1.out_features),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": float(_one_value(model, nn.LayerNorm, "eps")),
        "image_size": int(img[0]),
        "patch_size": int(grid[0]),
        "num_channels": int(patch.proj.in_channels),
    }
    if table == "vit":
        no_cls = getattr(model, "no_embed_class", False) or model.cls_token is None
        if no_cls or getattr(model, "num_reg_tokens", 0) or model.global_pool != "token":
            raise CheckpointError(
                "Hugging Face ViT needs a timm VisionTransformer with a class token in pos_embed, "
                f"no register tokens and global_pool='token'; got global_pool={model.global_pool!r}"
            )
        if not isinstance(model.fc_norm, nn.Identity) or not isinstance(model.norm, nn.LayerNorm):
            raise CheckpointError("Hugging Face ViT: final norm, no fc_norm; this model differs")
        config.update(qkv_bias=blocks[0].attn.qkv.bias is not None, encoder_stride=int(grid[0]))
        return {"architectures": ["ViTForImageClassification"], "model_type": "vit", **config}
    kwargs = model.model_kwargs if table == "mim" else {}
    init_values = (kwargs or getattr(model, "bitrain_spec", None) or {}).get("init_values")
    layer_scale = getattr(blocks[0], "gamma_1", None) is not None
    config = {
        "model_type": "beit",
        **config,
        "initializer_range": float(kwargs.get("init_std", 0.02)),
        "use_absolute_position_embeddings": model.pos_embed is not None,
        "use_relative_position_bias": blocks[0].attn.relative_position_bias_table is not None,
        "use_shared_relative_position_bias": model.rel_pos_bias is not None,
        "layer_scale_init_value": float(init_values or 0.1) if layer_scale else 0.0,
        "drop_path_rate": float(kwargs.get("drop_path_rate", 0.0)),
    }
    if table == "mim":
        return {
            **config,
            "architectures": ["BeitForMaskedImageModeling"],
            "vocab_size": int(kwargs["vocab_size"]),
            "use_mask_token": True,
            "use_mean_pooling": True,  # BeitModel's own final norm = identity; the head's is ours
        }
    pooled_norm = {"avg": model.fc_norm, "token": model.norm}.get(model.global_pool)
    if not isinstance(pooled_norm, nn.LayerNorm):
        raise CheckpointError(
            f"timm Beit with global_pool={model.global_pool!r} and fc_norm="
            f"{type(model.fc_norm).__name__}; Hugging Face BEiT pools by mean + fc_norm "
            "(global_pool='avg') or by the normed CLS token (global_pool='token')"
        )
    config.update(architectures=["BeitForImageClassification"], use_mask_token=False)
    return {**config, "use_mean_pooling": model.global_pool == "avg"}


# --- BiT configs ----------------------------------------------------------------------------------
# timm's resnetv2_*_bit names fix the depths: depths -> (timm name, its width factor). The widths
# travel as channels / stem_chs, HF's num_groups (timm builds 32) as group_norm_groups.
TIMM_BIT: dict[tuple[int, ...], tuple[str, int]] = {
    (3, 4, 6, 3): ("resnetv2_50x1_bit", 1),
    (3, 4, 23, 3): ("resnetv2_101x1_bit", 1),
    (3, 8, 36, 3): ("resnetv2_152x2_bit", 2),
}
TIMM_GROUPS = 32  # partial(GroupNormAct, num_groups=32) in timm's ResNetV2
BIT_CONV_EPS = 1e-8  # HF's BiT weight standardisation eps (hard-coded), timm's *_bit models too
BIT_GROUP_NORM_EPS = 1e-5  # HF's BitGroupNormActivation (hard-coded), timm's GroupNormAct too
# The BitConfig values for which HF's BiT is timm's network; bitrain writes them, reads no other.
_TIMM_NETWORK = {
    "layer_type": "preactivation",
    "global_padding": None,
    "embedding_dynamic_padding": False,
    "hidden_act": "relu",
    "output_stride": 32,
    "width_factor": 1,
}


def _make_div(value: float, divisor: int = 8) -> int:
    """Channel rounding of HF's BiT and timm's ResNetV2 (``make_div`` / ``make_divisible``)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def _bit_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """``create_classifier`` kwargs (less ``num_classes``) of a BiT config."""
    for name, wanted in _TIMM_NETWORK.items():
        if config.get(name, wanted) != wanted:
            raise CheckpointError(
                f"Hugging Face BiT config has {name}={config[name]!r}; timm's BiT needs {wanted!r}"
            )
    depths = tuple(int(d) for d in config.get("depths", (3, 4, 6, 3)))
    if depths not in TIMM_BIT:
        raise CheckpointError(
            f"Hugging Face BiT config has depths={list(depths)}; timm's BiT models fix theirs "
            f"({', '.join(f'{n}: {list(d)}' for d, (n, _) in TIMM_BIT.items())})"
        )
    name, wf = TIMM_BIT[depths]
    hidden = [int(h) for h in config.get("hidden_sizes", (256, 512, 1024, 2048))]
    stem = int(config.get("embedding_size", 64))
    for what, chs in (("hidden_sizes", hidden), ("embedding_size", [stem])):
        if any(_make_div(c) != c or c % wf for c in chs):
            raise CheckpointError(
                f"Hugging Face BiT config has {what}={chs if len(chs) > 1 else chs[0]}; timm "
                f"builds multiples of 8 only (and of {wf} for {name})"
            )
    groups = int(config.get("num_groups", TIMM_GROUPS))
    normed = sorted({stem, *hidden, *(_make_div(h * 0.25) for h in hidden)})
    bad = [c for c in normed if c % TIMM_GROUPS or c % groups]
    if bad:
        raise CheckpointError(
            f"Hugging Face BiT config has group-normed widths {bad} not divisible by num_groups="
            f"{groups} or by {TIMM_GROUPS} (timm builds {TIMM_GROUPS} groups, then bitrain sets "
            "num_groups)"
        )
    return {
        "model_name": name,
        "img_size": _square(config, "image_size", 224),
        "in_chans": int(config.get("num_channels", 3)),
        "channels": [c // wf for c in hidden],
        "stem_chs": stem // wf,
        "group_norm_groups": groups,
    }


def _bit_config(model: ResNetV2) -> dict[str, Any]:
    """The ``BitConfig`` of a timm ``ResNetV2`` that is HF's BiT network (stem, convs, norms)."""
    stem = model.stem
    problems = []
    if not isinstance(getattr(stem, "conv", None), StdConv2d):
        problems.append("the stem conv is not a weight-standardised StdConv2d")
    pad, pool = getattr(stem, "pad", None), getattr(stem, "pool", None)
    if not isinstance(pad, nn.ConstantPad2d) or not isinstance(pool, nn.MaxPool2d):
        problems.append("the stem is not BiT's 'fixed' stem (conv, zero pad 1, max pool 3/2)")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m is not model.head.fc]
    if any(not isinstance(m, StdConv2d) or m.eps != BIT_CONV_EPS for m in convs):
        problems.append(f"not every conv is a StdConv2d with eps={BIT_CONV_EPS}")
    if any(not isinstance(b, PreActBottleneck) for stage in model.stages for b in stage.blocks):
        problems.append("the blocks are not pre-activation bottlenecks")
    if any(m.dilation != (1, 1) for m in convs):
        problems.append("it uses dilation (output_stride < 32)")
    if not isinstance(model.norm, nn.GroupNorm):
        problems.append("it has no final group norm (not pre-activation)")
    if _one_value(model, nn.GroupNorm, "eps") != BIT_GROUP_NORM_EPS:
        problems.append(f"its group norms do not use eps={BIT_GROUP_NORM_EPS}")
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    if any(not isinstance(getattr(m, "act", None), nn.ReLU) for m in norms):
        problems.append("its activation is not ReLU")
    if problems:
        raise CheckpointError("this ResNetV2 is not Hugging Face's BiT: " + "; ".join(problems))
    spec = getattr(model, "bitrain_spec", {})
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224))[1]
    return {
        "architectures": ["BitForImageClassification"],
        "model_type": "bit",
        "num_channels": int(stem.conv.in_channels),
        "embedding_size": int(stem.conv.out_channels),
        "hidden_sizes": [int(stage.blocks[0].conv3.out_channels) for stage in model.stages],
        "depths": [len(stage.blocks) for stage in model.stages],
        **_TIMM_NETWORK,
        "num_groups": int(_one_value(model, nn.GroupNorm, "num_groups")),
        "drop_path_rate": 0.0,
        "image_size": int(spec.get("img_size", size)),
    }
