"""Load and save BEiT MIM weights in three layouts: bitrain, official unilm ``.pth``, Hugging Face.

* **bitrain** -- the Lightning ``.ckpt`` written by :mod:`bitrain.tasks.mim`:
  ``{"state_dict": {"model.<BeitMIM key>": ...}, "hyper_parameters": {"model": {"_target_": ...,
  **kwargs}, ...}, ...}``. :func:`save_mim_model` writes the same layout with only the model
  (``hyper_parameters = {"model": ...}``), so one reader serves both.
* **official** -- what ``unilm/beit/run_beit_pretraining.py`` saves (``utils.save_model``):
  ``{"model": state_dict, "optimizer": ..., "epoch": int, "scaler": ..., "args": Namespace}``.
  Key names equal timm's (``modeling_pretrain.py`` is built on timm), except that the official
  model keeps ``relative_position_index`` buffers in its state dict; they are dropped on import
  and regenerated on export. Model arguments come from ``args`` when present, else from the
  tensor shapes.
* **hf** -- a ``BeitForMaskedImageModeling`` folder; see :mod:`bitrain.models.hf`.

Everything is read weights-only (:func:`bitrain.io.load_torch_file`); official files are allowed
their ``argparse.Namespace`` and nothing else.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from timm.models.beit import gen_relative_position_index

from bitrain.io import CheckpointError, atomic_save, load_torch_file
from bitrain.models.beit import BeitMIM
from bitrain.models.hf import from_hf_beit, load_hf_folder, save_hf_folder, weights_file

__all__ = [
    "CheckpointError",
    "build_mim_model",
    "detect_format",
    "from_official_beit",
    "infer_official_kwargs",
    "load_mim_model",
    "load_mim_state",
    "save_mim_model",
    "to_official_beit",
]

log = logging.getLogger(__name__)

Format = Literal["bitrain", "official", "hf"]
FORMATS: tuple[str, ...] = ("bitrain", "official", "hf")
BEIT_MIM_TARGET = "bitrain.models.beit.BeitMIM"

# Official model names (modeling_pretrain.py) -> (embed_dim, depth, num_heads).
_OFFICIAL_SIZES = {"base": (768, 12, 12), "large": (1024, 24, 16)}


# --- official unilm layout ---------------------------------------------------------------------


def from_official_beit(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``VisionTransformerForMaskedImageModeling`` keys -> ``BeitMIM`` keys.

    The names are the same; this drops the ``relative_position_index`` buffers (timm rebuilds
    them) and a DDP ``module.`` prefix if the state dict was saved from a wrapped model.
    """
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.endswith("relative_position_index"):
            continue
        out[key] = value
    return out


def to_official_beit(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``BeitMIM`` keys -> official keys: adds the ``relative_position_index`` buffers.

    The window (patch grid) of each relative position table is recovered from its length
    ``(2 gh - 1)(2 gw - 1) + 3`` (square grids).
    """
    out = dict(state_dict)
    for key, table in state_dict.items():
        if key.endswith("relative_position_bias_table"):
            grid = _grid_from_table(table.shape[0], key)
            out[key.removesuffix("relative_position_bias_table") + "relative_position_index"] = (
                gen_relative_position_index((grid, grid))
            )
    return out


def _grid_from_table(rows: int, key: str) -> int:
    side = (math.isqrt(rows - 3) + 1) // 2
    if (2 * side - 1) ** 2 + 3 != rows:
        raise CheckpointError(
            f"'{key}' has {rows} rows, not (2g-1)^2 + 3 for any square patch grid g"
        )
    return side


def infer_official_kwargs(
    state_dict: Mapping[str, torch.Tensor], args: Any = None
) -> dict[str, Any]:
    """``BeitMIM`` arguments for an official state dict.

    The architecture is read from the tensor shapes (width from ``cls_token``, depth from the
    block indices, vocabulary from ``lm_head``, patch size and channels from the patch conv, heads
    from a relative position table, grid from the table / ``pos_embed`` / index, LayerScale from
    ``gamma_1``); ``args`` (the official command line) supplies what weights cannot tell: drop path,
    the LayerScale init value, the head count when there is no table (from the model name).
    """
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    if bitrain_kwargs := args.get("bitrain_model_kwargs"):
        return dict(bitrain_kwargs)  # written by to_official export: exact
    for key in ("cls_token", "lm_head.weight", "patch_embed.proj.weight"):
        if key not in state_dict:
            raise CheckpointError(
                f"official BEiT state dict has no '{key}'; found keys {_some_keys(state_dict)}"
            )
    embed_dim = state_dict["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    proj = state_dict["patch_embed.proj.weight"]  # [D, C, p, p]
    patch = int(proj.shape[-1])
    shared = "rel_pos_bias.relative_position_bias_table" in state_dict
    per_layer = "blocks.0.attn.relative_position_bias_table" in state_dict
    table_key = (
        "rel_pos_bias.relative_position_bias_table"
        if shared
        else "blocks.0.attn.relative_position_bias_table"
    )
    name = str(args.get("model", ""))
    size = next((s for tag, s in _OFFICIAL_SIZES.items() if f"_{tag}_" in name), None)
    if shared or per_layer:
        num_heads = int(state_dict[table_key].shape[1])
        grid = _grid_from_table(state_dict[table_key].shape[0], table_key)
    else:
        num_heads = size[2] if size and size[0] == embed_dim else max(1, embed_dim // 64)
        if "pos_embed" not in state_dict:
            raise CheckpointError("official BEiT state dict has no rel-pos table and no pos_embed")
        grid = math.isqrt(state_dict["pos_embed"].shape[1] - 1)
    img_size = grid * patch
    if args.get("input_size") not in (None, img_size):
        log.warning("official args.input_size=%s but weights say %s", args["input_size"], img_size)
    has_gamma = "blocks.0.gamma_1" in state_dict
    layer_scale = args.get("layer_scale_init_value")
    fc1 = state_dict["blocks.0.mlp.fc1.weight"]
    return {
        "img_size": img_size,
        "patch_size": patch,
        "in_chans": int(proj.shape[1]),
        "vocab_size": int(state_dict["lm_head.weight"].shape[0]),
        "embed_dim": int(embed_dim),
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": fc1.shape[0] / embed_dim,
        "qkv_bias": "blocks.0.attn.q_bias" in state_dict,
        "drop_path_rate": float(args.get("drop_path", 0.1)),
        "init_values": (float(layer_scale) if layer_scale else 0.1) if has_gamma else None,
        "use_abs_pos_emb": "pos_embed" in state_dict,
        "use_rel_pos_bias": per_layer,
        "use_shared_rel_pos_bias": shared,
        "layer_norm_eps": 1e-6,  # partial(nn.LayerNorm, eps=1e-6) in modeling_pretrain.py
        "init_std": 0.02,
    }


def _official_args(kwargs: Mapping[str, Any]) -> argparse.Namespace:
    """The fields of ``run_beit_pretraining.py``'s args that describe the model, plus ours."""
    size = next(
        (
            tag
            for tag, s in _OFFICIAL_SIZES.items()
            if s == (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"])
        ),
        None,
    )
    name = f"beit_{size}_patch{kwargs['patch_size']}_{kwargs['img_size']}_8k_vocab" if size else ""
    return argparse.Namespace(
        model=name or "bitrain_beit_mim",
        input_size=kwargs["img_size"],
        drop_path=kwargs["drop_path_rate"],
        layer_scale_init_value=kwargs["init_values"] or 0.0,
        rel_pos_bias=kwargs["use_shared_rel_pos_bias"],
        abs_pos_emb=kwargs["use_abs_pos_emb"],
        bitrain_model_kwargs=dict(kwargs),
    )


# --- format detection and loading ---------------------------------------------------------------


def _some_keys(mapping: Mapping[str, Any], n: int = 6) -> list[str]:
    keys = list(mapping.keys())
    return keys[:n] + (["..."] if len(keys) > n else [])


def detect_format(obj: Any) -> Format:
    """Which layout a loaded checkpoint object is (see the module docstring).

    Raises:
        CheckpointError: none of them; the message lists a few of the keys found.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a dict")
    if "state_dict" in obj and "hyper_parameters" in obj:
        return "bitrain"
    for key in ("model", "module"):
        if isinstance(obj.get(key), Mapping):
            return "official"
    if "lm_head.weight" in obj or "module.lm_head.weight" in obj:
        return "official"
    raise CheckpointError(
        "checkpoint is neither a bitrain .ckpt (state_dict + hyper_parameters) nor an official "
        f"BEiT MIM .pth ('model' or a state dict with lm_head.weight); found keys {_some_keys(obj)}"
    )


def load_mim_state(
    path_or_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any], Format]:
    """Read any supported checkpoint: ``(BeitMIM state_dict, BeitMIM kwargs, format)``.

    Raises:
        FileNotFoundError: nothing at ``path_or_dir``.
        CheckpointError: unknown format, unsafe pickle, or not a BEiT MIM model.
    """
    path = Path(path_or_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint not found: '{path}' (expected a .ckpt/.pth file or a Hugging Face folder)"
        )
    if path.is_dir():
        state, config = load_hf_folder(path)
        try:
            state, kwargs = from_hf_beit(state, config)
        except CheckpointError as err:
            raise CheckpointError(f"'{weights_file(path)}': {err}") from None
        return state, kwargs, "hf"
    obj = load_torch_file(path, map_location=map_location, allow_namespace=True)
    fmt = detect_format(obj)
    if fmt == "bitrain":
        return (*_from_bitrain(obj, path), fmt)
    if isinstance(obj.get("model"), Mapping):
        raw, args = obj["model"], obj.get("args")
    elif isinstance(obj.get("module"), Mapping):
        raw, args = obj["module"], obj.get("args")
    else:
        raw, args = obj, None
    state = from_official_beit(raw)
    if "lm_head.weight" not in state or "mask_token" not in state:
        raise CheckpointError(
            f"'{path}' is not a BEiT masked-image-modeling model (no lm_head.weight / mask_token: "
            f"a classifier or another model?); found keys {_some_keys(state)}"
        )
    return state, infer_official_kwargs(state, args), fmt


def _from_bitrain(obj: Mapping[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    hparams = obj["hyper_parameters"]
    model_cfg = hparams.get("model") if isinstance(hparams, Mapping) else None
    if not isinstance(model_cfg, Mapping):
        raise CheckpointError(
            f"bitrain checkpoint '{path}' has no hyper_parameters['model']; found "
            f"{_some_keys(hparams) if isinstance(hparams, Mapping) else type(hparams).__name__}"
        )
    kwargs = dict(model_cfg)
    target = kwargs.pop("_target_", BEIT_MIM_TARGET)
    if target != BEIT_MIM_TARGET:
        raise CheckpointError(
            f"bitrain checkpoint '{path}' holds a {target}, not a {BEIT_MIM_TARGET}"
        )
    state = {k[len("model.") :]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise CheckpointError(
            f"bitrain checkpoint '{path}' has no 'model.*' weights; found "
            f"{_some_keys(obj['state_dict'])}"
        )
    return state, kwargs


def load_mim_model(
    path_or_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> BeitMIM:
    """Build a :class:`BeitMIM` from a bitrain ``.ckpt``/``.pt``, official ``.pth`` or HF folder.

    The format is detected; loading is strict (every key must match).

    Raises:
        FileNotFoundError: nothing at ``path_or_dir``.
        CheckpointError: unknown format, unsafe file, wrong model, or mismatched weights.
    """
    state, kwargs, fmt = load_mim_state(path_or_dir, map_location)
    model = build_mim_model(state, kwargs, where=f"{fmt} checkpoint '{path_or_dir}'")
    return model.to(map_location)


def build_mim_model(
    state: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any], where: str = "checkpoint"
) -> BeitMIM:
    """``BeitMIM(**kwargs)`` with ``state`` loaded strictly.

    Raises:
        CheckpointError: the arguments are invalid or the weights do not fit them.
    """
    try:
        model = BeitMIM(**kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot build BeitMIM({dict(kwargs)}): {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{where} does not match BeitMIM({dict(kwargs)}): {err}") from err
    return model


def save_mim_model(model: BeitMIM, path: str | os.PathLike, format: Format = "bitrain") -> Path:
    """Save ``model`` as ``format``.

    * ``bitrain``: ``{"state_dict": {"model.<key>": ...}, "hyper_parameters": {"model":
      {"_target_": ..., **model_kwargs}}}`` -- the Lightning ``.ckpt`` layout, model only.
    * ``official``: ``{"model": official state dict, "args": Namespace(...)}``.
    * ``hf``: a folder, see :func:`bitrain.models.hf.save_hf_folder`.

    Returns:
        The path written.
    """
    if format == "hf":
        return save_hf_folder(model, path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if format == "bitrain":
        obj = {
            "state_dict": {f"model.{k}": v for k, v in state.items()},
            "hyper_parameters": {"model": {"_target_": BEIT_MIM_TARGET, **model.model_kwargs}},
        }
    elif format == "official":
        obj = {"model": to_official_beit(state), "args": _official_args(model.model_kwargs)}
    else:
        raise ValueError(f"unknown checkpoint format {format!r}; choose one of {FORMATS}")
    return atomic_save(obj, path)


# --- any encoder or classifier checkpoint, for fine-tuning -------------------------------------


def _is_tensor_mapping(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def load_encoder_state(
    path_or_dir: str | os.PathLike, use_ema: bool = False
) -> tuple[dict[str, torch.Tensor], str]:
    """Weights of any supported checkpoint in timm key names: ``(state_dict, format)``.

    Formats: a bitrain ``.ckpt`` (pretraining: the ``BeitMIM``; fine-tuning: the classifier, or
    its EMA with ``use_ema``), an official unilm ``.pth`` (``{"model": ...}``, with or without
    ``args``; pretraining or fine-tuned), a timm state dict (``.pth``/``.bin``/``.safetensors``, or
    a timm hub folder with ``config.json`` + ``model.safetensors``), a Hugging Face folder
    (``BeitForMaskedImageModeling``; classifiers through :mod:`bitrain.models.hf_classifier`).
    The result still carries pretraining-only keys; see
    :func:`bitrain.models.classifier.adapt_state_dict`.

    Raises:
        FileNotFoundError: nothing at the path.
        CheckpointError: unreadable, unsafe, or not a model checkpoint.
    """
    path = Path(path_or_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint not found: '{path}'. Give a bitrain .ckpt (outputs/<task>/<run>/"
            "checkpoints/last.ckpt), an official BEiT .pth (github.com/microsoft/unilm/tree/"
            "master/beit), a timm .pth/.safetensors, or a Hugging Face model folder"
        )
    if path.is_dir():
        return _folder_state(path)
    if path.suffix == ".safetensors":
        from bitrain.models.hf import _read_weights

        return _read_weights(path), "timm"
    obj = load_torch_file(path, allow_namespace=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and "hyper_parameters" in obj:
        prefix = "ema.module." if use_ema else "model."
        state = {k[len(prefix) :]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
        if not state:
            what = (
                "EMA weights (ema.module.*): was the run trained with task.ema?"
                if use_ema
                else ("model.* weights")
            )
            raise CheckpointError(f"bitrain checkpoint '{path}' has no {what}")
        return state, "bitrain"
    if isinstance(obj, Mapping):
        for key in ("model", "module", "state_dict", "model_ema"):
            if _is_tensor_mapping(obj.get(key)):
                return dict(obj[key]), "official" if key in ("model", "module") else "timm"
        if _is_tensor_mapping(obj):
            return dict(obj), "timm"
    raise CheckpointError(
        f"'{path}' is not a model checkpoint: expected a bitrain .ckpt, an official .pth with "
        f"'model', or a state dict of tensors; found "
        f"{_some_keys(obj) if isinstance(obj, Mapping) else type(obj).__name__}"
    )


def _folder_state(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A Hugging Face model folder or a timm hub folder."""
    import json

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"'{folder}' is a directory without config.json: not a Hugging Face or timm model "
            "folder"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"'{cfg_path}' is not valid JSON ({err})") from err
    if "architecture" in config and "architectures" not in config:  # timm push_to_hub layout
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / name).is_file():
                from bitrain.models.hf import _read_weights

                return _read_weights(folder / name), "timm"
        raise FileNotFoundError(f"timm folder '{folder}' has no model.safetensors")
    architectures = config.get("architectures") or []
    if any(a.endswith("ForMaskedImageModeling") for a in architectures):
        state, _, _ = load_mim_state(folder)
        return state, "hf"
    try:
        from bitrain.models import hf_classifier
    except ImportError as err:
        raise CheckpointError(
            f"Hugging Face folder '{folder}' ({architectures}) holds a classifier, and this "
            "bitrain has no Hugging Face classifier import"
        ) from err
    _, _, state, _ = hf_classifier.load_hf_classifier(folder)
    return state, "hf"
