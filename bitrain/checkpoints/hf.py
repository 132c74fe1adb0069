"""Hugging Face model folders: reading, writing, key spelling, and the layer-table machinery.

Folders (``config.json`` + ``model.safetensors``, or ``pytorch_model.bin`` / a sharded
``*.index.json``) are read and written with our own code: ``transformers`` is never imported by
bitrain, it is only the reference of the parity tests. The key tables live with their model family
(:mod:`.hf_beit` for BEiT and ViT, :mod:`.hf_bit`); this module holds what they share: the
transformers 4.x <-> 5.x key spelling (:data:`SPELLING`, one list read both ways; the Hub's BEiT /
ViT checkpoints use 4.x, which transformers 4 and 5 both load and 5 still writes), and
:func:`from_layer_table` / :func:`to_layer_table`, a family's ``{hf: ours}`` tables applied both
ways, with q/k/v stacked into timm's ``attn.qkv``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from bitrain.io import CheckpointError, atomic_write_bytes, load_torch_file

__all__ = [
    "ARCHITECTURES",
    "SPELLING",
    "architecture",
    "from_layer_table",
    "label_list",
    "label_names",
    "read_folder",
    "read_weights",
    "to_4x",
    "to_5x",
    "to_layer_table",
    "write_folder",
]

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
HF_LAYER_NORM_EPS = 1e-12  # BeitConfig / ViTConfig default

# transformers 5.x <-> 4.x key spelling (BEiT and ViT), as (5.x, 4.x) regex fragments. Read
# forwards for 4.x -> 5.x, backwards (reversed order, sides swapped) for 5.x -> 4.x; the order
# keeps each rule from matching another's output (e.g. o_proj before fc2 going forwards).
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
# An input-only alias: the pre-release spelling of BEiT's layer-scale vectors.
_ALIASES = [(re.compile(r"\.gamma_([12])$"), r".lambda_\1")]


def _replacement(fragment: str) -> str:
    """A regex fragment of :data:`SPELLING` as replacement text (its group kept as group 1)."""
    return re.sub(r"\([^)]*\)", r"\\1", fragment).replace("\\.", ".").removeprefix("^")


def to_5x(key: str) -> str:
    """A transformers 4.x (or 5.x) key in the 5.x spelling."""
    for five, four in SPELLING:
        key = re.sub(four, _replacement(five), key)
    for pattern, repl in _ALIASES:
        key = pattern.sub(repl, key)
    return key


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


def read_weights(path: Path) -> dict[str, torch.Tensor]:
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


def read_folder(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """``(state_dict, config, weights file)`` of a Hugging Face (or timm hub) model folder.

    Raises:
        FileNotFoundError: no ``config.json`` or no weights file in the folder.
        CheckpointError: ``config.json`` or an index is not valid JSON, or a shard is unreadable.
    """
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder '{folder}' has no config.json")
    config = read_json(folder / "config.json")
    names = (*_INDEX_FILES, "model.safetensors", "pytorch_model.bin")
    weights = next((folder / n for n in names if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(
            f"model folder '{folder}' has config.json but no model.safetensors or pytorch_model.bin"
        )
    if weights.name not in _INDEX_FILES:
        return read_weights(weights), config, weights
    weight_map = read_json(weights).get("weight_map")
    if not isinstance(weight_map, Mapping):
        raise CheckpointError(f"'{weights}' has no weight_map")
    state: dict[str, torch.Tensor] = {}
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
    atomic_write_bytes(
        folder / "model.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"})
    )
    for name, value in {"config": config, **json_files}.items():
        atomic_write_bytes(folder / f"{name}.json", (json.dumps(value, indent=2) + "\n").encode())
    return folder


# --- configs --------------------------------------------------------------------------------------


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


def config_square(config: Mapping[str, Any], name: str, default: int) -> int:
    """The side of the square size ``config[name]`` (an int or a list/tuple of equal ints)."""
    value = config.get(name, default)
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise CheckpointError(f"Hugging Face config: {name}={value} is not square")
        value = value[0]
    return int(value)


def transformer_sizes(config: Mapping[str, Any], family: str) -> dict[str, Any]:
    """Sizes of a BEiT / ViT config in timm's argument names (exact GELU, a buildable MLP)."""
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(
            f"Hugging Face {family} config uses hidden_act={config['hidden_act']!r}; timm's model "
            "uses exact GELU ('gelu')"
        )
    hidden = int(config.get("hidden_size", 768))
    inner = int(config.get("intermediate_size", 4 * hidden))
    if int(hidden * (inner / hidden)) != inner:
        raise CheckpointError(
            f"Hugging Face config: intermediate_size={inner} is not int(hidden_size * r) for "
            f"r = {inner / hidden}; timm cannot build this MLP width"
        )
    return {
        "img_size": config_square(config, "image_size", 224),
        "patch_size": config_square(config, "patch_size", 16),
        "in_chans": int(config.get("num_channels", 3)),
        "embed_dim": hidden,
        "depth": int(config.get("num_hidden_layers", 12)),
        "num_heads": int(config.get("num_attention_heads", 12)),
        "mlp_ratio": inner / hidden,
        "layer_norm_eps": float(config.get("layer_norm_eps", HF_LAYER_NORM_EPS)),
    }


def transformer_config(model: nn.Module) -> dict[str, Any]:
    """The ``BeitConfig`` / ``ViTConfig`` sizes of a timm BEiT or ViT (square images only)."""
    blocks, patch = model.blocks, model.patch_embed
    img, grid = tuple(patch.img_size), tuple(patch.patch_size)
    if img[0] != img[1] or grid[0] != grid[1]:
        raise CheckpointError(f"to Hugging Face: image {img} / patch {grid} are not square")
    return {
        "hidden_size": int(model.embed_dim),
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
    }


def label_list(names: Any, where: str, num_classes: int | None = None) -> list[str] | None:
    """Class names from a list or an ``{index: name}`` mapping; None when there are none.

    Raises:
        CheckpointError: keys that are not ``0 .. n-1``, or not ``num_classes`` names.
    """
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
        raise CheckpointError(
            f"{where} has {len(names)} label names for a {num_classes}-class head"
        )
    return names


def label_names(config: Mapping[str, Any], num_classes: int | None = None) -> list[str] | None:
    """Class names of a config's ``id2label``; None when absent or HF's ``LABEL_i`` defaults."""
    names = label_list(config.get("id2label"), "Hugging Face config id2label")
    if names is None or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return label_list(names, "Hugging Face config id2label", num_classes)


def weight_bias(hf: str, ours: str) -> dict[str, str]:
    """``{hf.weight: ours.weight, hf.bias: ours.bias}``: one table entry per parameter."""
    return {f"{hf}.weight": f"{ours}.weight", f"{hf}.bias": f"{ours}.bias"}


def one_value(model: nn.Module, kind: type[nn.Module], attr: str) -> Any:
    """The single value of ``attr`` over the model's ``kind`` modules (HF configs hold one)."""
    values = {getattr(m, attr) for m in model.modules() if isinstance(m, kind)}
    if len(values) != 1:
        raise CheckpointError(
            f"the model's {kind.__name__} layers have {attr} values {sorted(values)}; Hugging "
            "Face configs have one"
        )
    return values.pop()


# --- layer tables ---------------------------------------------------------------------------------

_QKV = re.compile(r"attention\.([qkv])_proj\.(weight|bias)")
_OUR_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def from_layer_table(
    sd: Mapping[str, torch.Tensor],
    family: str,
    top: Mapping[str, str],
    block: Mapping[str, str],
    separate_qv_bias: bool,
    drop: set[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """HF (5.x) weights of a BEiT / ViT in our names, by the family's ``{hf: ours}`` tables.

    ``top`` maps whole-model names, ``block`` the names after ``{family}.layers.i.`` (ours after
    ``blocks.i.``); keys in ``drop`` have no place in our model. ``separate_qv_bias``: BEiT's
    ``attn.{q,v}_bias`` (a key bias must be zero), else ViT's one ``attn.qkv.bias``.

    Raises:
        CheckpointError: keys with no name, a missing or mis-shaped q/k/v part, a non-zero BEiT
            key bias, or biases on only some of q/k/v.
    """
    where = f"Hugging Face {'BEiT' if family == 'beit' else 'ViT'} weights"
    layer = re.compile(rf"^{family}\.layers\.(\d+)\.(.+)$")
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        if key in drop or key.endswith("relative_position_index"):
            continue
        if key in top:
            out[top[key]] = value
            continue
        match = layer.match(key)
        rest = match.group(2) if match else ""
        if match and (proj := _QKV.fullmatch(rest)):
            qkv.setdefault(int(match.group(1)), {})[f"{proj.group(1)}.{proj.group(2)}"] = value
        elif match and rest in block:
            out[f"blocks.{match.group(1)}.{block[rest]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{where} have keys with no timm name: {sorted(unknown)[:6]}")
    for i, parts in sorted(qkv.items()):
        out[f"blocks.{i}.attn.qkv.weight"] = _stack_qkv(parts, f"{where}, layer {i}")
        biases = [parts.get(f"{n}.bias") for n in "qkv"]
        if separate_qv_bias:
            if biases[1] is not None and bool(biases[1].any()):
                raise CheckpointError(f"{where}, layer {i} has a non-zero key bias; BEiT has none")
            out.update(
                {f"blocks.{i}.attn.{n}_bias": b for n, b in zip("qv", biases[::2]) if b is not None}
            )
        elif all(b is not None for b in biases):
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat(biases)
        elif any(b is not None for b in biases):
            raise CheckpointError(f"{where}, layer {i} has biases on only some of q/k/v")
    return out


def _stack_qkv(parts: Mapping[str, torch.Tensor], where: str) -> torch.Tensor:
    """The ``attn.qkv.weight`` of one layer's q/k/v weights."""
    missing = {"q.weight", "k.weight", "v.weight"} - parts.keys()
    if missing:
        raise CheckpointError(f"{where} lacks attention {sorted(missing)}")
    shapes = {n: tuple(parts[f"{n}.weight"].shape) for n in "qkv"}
    if len(set(shapes.values())) != 1 or len(shapes["q"]) != 2:
        names = {"q": "query", "k": "key", "v": "value"}
        detail = ", ".join(f"{names[n]}.weight {list(s)}" for n, s in shapes.items())
        raise CheckpointError(
            f"{where}: the attention weights do not fit together ({detail}); each must be "
            "[hidden_size, hidden_size]: the weights file is damaged or from another model"
        )
    return torch.cat([parts["q.weight"], parts["k.weight"], parts["v.weight"]], dim=0)


def to_layer_table(
    model: nn.Module, family: str, top: Mapping[str, str], block: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """A timm BEiT / ViT's weights in HF 5.x names: :func:`from_layer_table`'s tables backwards.

    ``attn.qkv.*`` is split into ``attention.{q,k,v}_proj.*``; BEiT's ``attn.{q,v}_bias`` go to
    ``attention.{q,v}_proj.bias``, zero-filled when the model has none (HF always has them);
    ``relative_position_index`` buffers are left out.
    """
    dim = int(model.embed_dim)
    top_back = {ours: hf for hf, ours in top.items()}
    block_back = {ours: hf for hf, ours in block.items()}
    out: dict[str, torch.Tensor] = {}
    layers = set()
    for key, value in model.state_dict().items():
        value = value.detach()
        if key.endswith("relative_position_index"):
            continue
        if key in top_back:
            out[top_back[key]] = value
            continue
        match = _OUR_BLOCK.match(key)
        pre, rest = (f"{family}.layers.{match.group(1)}.", match.group(2)) if match else ("", "")
        layers.add(pre)
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            for n, part in zip("qkv", value.split(dim, dim=0), strict=True):
                out[f"{pre}attention.{n}_proj.{rest.rsplit('.', 1)[1]}"] = part
        elif rest in ("attn.q_bias", "attn.v_bias"):
            out[f"{pre}attention.{rest[5]}_proj.bias"] = value
        elif rest in block_back:
            out[pre + block_back[rest]] = value
        else:
            raise CheckpointError(f"to Hugging Face: no Hugging Face name for {key!r}")
    if family == "beit":  # HF's BEiT always has q and v biases
        for pre in layers:
            out.setdefault(f"{pre}attention.q_proj.bias", torch.zeros(dim))
            out.setdefault(f"{pre}attention.v_proj.bias", torch.zeros(dim))
    return out
