"""Fine-tuned classifier checkpoints: load any format into a timm model, export to any format.

:func:`load_classifier` reads a bitrain fine-tuning ``.ckpt``, a timm hub folder, a Hugging Face
classifier folder, an official unilm fine-tuned ``.pth`` (with or without ``args``) or a bare
state dict (with ``model_name``); :func:`save_classifier` writes the ``bitrain``, ``timm``,
``official`` and ``hf`` layouts. The evaluation preprocessing travels with the model as data (a
Hugging Face ``preprocessor_config.json``, timm's ``pretrained_cfg``, bitrain's record; read and
written by :mod:`bitrain.data.preprocessing`, never a code path taken from the file). Encoder
weights for fine-tuning and the MIM formats are in :mod:`bitrain.models.checkpoints`;
docs/checkpoints.md has the tables.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bitrain.data.preprocessing import (
    EvalPreprocessing,
    from_processor_config,
    from_timm_args,
    read_record,
)
from bitrain.io import CheckpointError, atomic_save, load_torch_file
from bitrain.io import plain_tree as _plain
from bitrain.models.checkpoints import (
    _OFFICIAL_SIZES,
    BEIT_MIM_TARGET,
    _grid_from_table,
    _is_tensor_mapping,
    _some_keys,
    from_official_beit,
    load_encoder_state,
    to_official_beit,
)

log = logging.getLogger(__name__)


def load_classifier(
    path_or_dir: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    use_ema: bool = False,
    model_name: str | None = None,
    **spec: Any,
) -> torch.nn.Module:
    """A fine-tuned classifier as a timm model in eval mode, with ``label_names`` attached.

    Supported (see :data:`CLASSIFIER_FORMATS` and docs/checkpoints.md):

    * a bitrain fine-tuning ``.ckpt`` (or a :func:`save_classifier` ``bitrain`` export);
    * a timm hub folder (``config.json`` with ``architecture`` + ``model.safetensors``);
    * a Hugging Face classifier folder (``config.json`` with ``architectures``
      ``[Beit|ViT|Bit]ForImageClassification``), through
      :func:`bitrain.models.hf_classifier.build_classifier_from_hf`;
    * an official unilm fine-tuned ``.pth`` (``{"model": state, "args": Namespace}``, as
      ``run_class_finetuning.py`` saves it); without ``args`` the BEiT architecture is read from
      the tensor shapes (:func:`infer_official_classifier_spec`);
    * a bare timm state dict (``.pth``/``.bin``/``.safetensors``): give ``model_name`` (and the
      other :func:`~bitrain.models.classifier.create_classifier` arguments in ``spec``).

    The model also carries ``bitrain_spec`` (the arguments that rebuild it),
    ``bitrain_source_format`` (one of :data:`CLASSIFIER_FORMATS`) and
    ``bitrain_eval_transform`` (the evaluation preprocessing the checkpoint records, as a
    validated :class:`~bitrain.data.preprocessing.EvalPreprocessing`, or None when it records
    none). A record is data: one that names code to run is refused (CheckpointError).

    Args:
        path_or_dir: the checkpoint file or folder.
        map_location: device of the returned model.
        use_ema: the EMA weights (bitrain ``ema.module.*``, official ``model_ema``).
        model_name: timm architecture of a bare state dict (or to override an official file's).
        **spec: further ``create_classifier`` arguments with ``model_name`` (``num_classes`` is
            read from the head when not given).

    Raises:
        FileNotFoundError: nothing at the path.
        CheckpointError: an unknown layout, a pretraining (MIM) checkpoint, a bare state dict
            without ``model_name``, or weights that do not fit their model.
        ValueError: ``spec`` without ``model_name``, or either given for a checkpoint that names
            its own architecture.
    """
    path = Path(path_or_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"classifier checkpoint not found: '{path}' (expected a bitrain .ckpt, an official "
            ".pth, a timm .pth/.safetensors, or a timm / Hugging Face model folder)"
        )
    if spec and model_name is None:
        raise ValueError(
            f"load_classifier: {sorted(spec)} given without model_name; pass model_name=<timm "
            "architecture> with the other create_classifier arguments"
        )
    user_spec = {"model_name": model_name, **spec} if model_name is not None else None
    if path.is_dir():
        loaded = _folder_classifier(path, user_spec, use_ema)
    else:
        loaded = _file_classifier(path, user_spec, use_ema)
    model = _build_classifier(loaded, path)
    return model.to(map_location).eval()


class _Loaded:
    """What a reader found: model arguments, timm state dict, and what travels with them."""

    def __init__(
        self,
        fmt: str,
        spec: Mapping[str, Any] | None,
        state: Mapping[str, torch.Tensor],
        label_names: Any = None,
        eval_transform: EvalPreprocessing | None = None,
        norm_settings: Mapping[str, Any] | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.fmt = fmt
        self.spec = dict(spec) if spec is not None else None
        self.state = state
        self.label_names = label_names
        self.eval_transform = eval_transform
        self.norm_settings = dict(norm_settings or {})
        self.model = model


def _label_list(names: Any, where: str) -> list[str] | None:
    if not names:
        return None
    if isinstance(names, Mapping):  # timm allows {index: name}
        try:
            items = sorted((int(k), str(v)) for k, v in names.items())
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: label_names has non-integer keys ({err})") from err
        if [i for i, _ in items] != list(range(len(items))):
            raise CheckpointError(f"{where}: label_names keys are not 0 .. n-1")
        return [name for _, name in items]
    return [str(n) for n in names]


def _build_classifier(loaded: _Loaded, path: Path) -> torch.nn.Module:
    """``create_classifier(**spec)`` + norm settings + strict load, with clear errors."""
    from bitrain.models.classifier import create_classifier
    from bitrain.models.hf_classifier import apply_norm_settings

    where = f"{loaded.fmt} checkpoint '{path}'"
    model = loaded.model
    if model is None:
        spec = _checked_spec(loaded.spec or {}, where)
        if spec.get("num_classes") is None:
            spec["num_classes"] = _head_classes(loaded.state, where)
        spec.pop("pretrained", None)
        try:
            model = create_classifier(**spec)
        except (TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"{where}: cannot build create_classifier({spec}): {err}"
            ) from err
        apply_norm_settings(model, **loaded.norm_settings)
        state = {
            k.removeprefix("module."): v
            for k, v in loaded.state.items()
            if not k.endswith("relative_position_index")
        }
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            hint = (
                " Check model_name and the other arguments against the checkpoint."
                if loaded.fmt in ("timm", "official")
                else ""
            )
            raise CheckpointError(
                f"{where} does not fit {spec['model_name']}({spec}): {err}.{hint}"
            ) from err
    names = _label_list(loaded.label_names, where)
    num_classes = int(model.bitrain_spec["num_classes"])
    if names is not None and len(names) != num_classes:
        raise CheckpointError(
            f"{where} has {len(names)} label names for a {num_classes}-class head"
        )
    model.label_names = names
    model.bitrain_source_format = loaded.fmt
    model.bitrain_eval_transform = loaded.eval_transform
    return model


# timm.create_model arguments that would read or fetch weights from a place the file chooses.
_LOADER_ARGS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path"}


def _checked_spec(spec: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The model arguments a file records, as plain data that chooses no code and no file.

    ``model_name`` must be a registered timm architecture (no ``hf-hub:`` name, which would fetch
    a config); values must be numbers, strings, booleans, None or lists of them; a string never
    holds an OmegaConf interpolation (``${...}``); no argument makes timm load weights.
    """

    def plain(value: Any, key: str) -> Any:
        if isinstance(value, list | tuple):
            return [plain(v, key) for v in value]
        if isinstance(value, str) and "${" in value:
            raise CheckpointError(f"{where}: model argument {key}={value!r} is an interpolation")
        if value is not None and not isinstance(value, bool | int | float | str):
            raise CheckpointError(
                f"{where}: model argument {key} is a {type(value).__name__}, not a plain value"
            )
        return value

    import timm

    out = {str(k): plain(v, str(k)) for k, v in spec.items() if k != "pretrained"}
    name = out.get("model_name")
    if not isinstance(name, str) or ":" in name or not timm.is_model(name):
        raise CheckpointError(f"{where}: model_name {name!r} is not a timm architecture")
    loaders = sorted(_LOADER_ARGS & out.keys())
    if loaders:
        raise CheckpointError(f"{where}: model arguments {loaders} would load other weights")
    return out


def _head_classes(state: Mapping[str, torch.Tensor], where: str) -> int:
    for key in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight"):
        if key in state:
            return int(state[key].shape[0])
    raise CheckpointError(
        f"{where}: no classification head (head.weight / head.fc.weight) to read num_classes "
        "from; pass num_classes"
    )


def _mim_error(path: Path, fmt: str) -> CheckpointError:
    return CheckpointError(
        f"'{path}' is a pretraining (MIM) checkpoint ({fmt}), not a classifier: fine-tune it "
        f"first with `python -m bitrain.finetune model.pretrained={path}`"
    )


def _no_spec(user_spec: Mapping[str, Any] | None, path: Path, fmt: str) -> None:
    if user_spec is not None:
        raise ValueError(
            f"'{path}' is a {fmt} checkpoint that names its own architecture; model_name and "
            "spec are only for bare state dicts (and to override an official .pth)"
        )


def _no_ema(use_ema: bool, path: Path, fmt: str) -> None:
    if use_ema:
        raise CheckpointError(
            f"'{path}' ({fmt}) has no EMA weights: use_ema is for bitrain .ckpt files of runs "
            "trained with task.ema and official .pth files with 'model_ema'"
        )


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"'{path}' is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"'{path}' holds a {type(value).__name__}, not a JSON object")
    return value


def _folder_classifier(folder: Path, user_spec: Mapping[str, Any] | None, use_ema: bool) -> _Loaded:
    """A timm hub folder or a Hugging Face classifier folder."""
    from bitrain.models.hf import _read_weights

    expected = (
        "expected a timm hub folder (config.json with 'architecture' + model.safetensors) or a "
        "Hugging Face classifier folder (config.json with architectures "
        "[Beit|ViT|Bit]ForImageClassification + model.safetensors)"
    )
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"'{folder}' is a folder without config.json: {expected}")
    config = _read_json(cfg_path)
    if "architecture" in config and "architectures" not in config:
        _no_spec(user_spec, folder, "timm")
        _no_ema(use_ema, folder, "timm")
        weights = next(
            (
                folder / n
                for n in ("model.safetensors", "pytorch_model.bin")
                if (folder / n).is_file()
            ),
            None,
        )
        if weights is None:
            raise CheckpointError(
                f"timm folder '{folder}' has no model.safetensors (or pytorch_model.bin)"
            )
        if isinstance(config.get("bitrain_spec"), Mapping):
            spec = dict(config["bitrain_spec"])
        else:
            spec = {k: v for k, v in (config.get("model_args") or {}).items()}
            spec = {"model_name": config["architecture"], **spec}
            spec["num_classes"] = config.get("num_classes", spec.get("num_classes"))
        node = _timm_folder_preprocessing(config, cfg_path)
        return _Loaded(
            "timm",
            spec,
            _read_weights(weights),
            config.get("label_names"),
            node,
            config.get("bitrain_norm_settings"),
        )
    architectures = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith("ForMaskedImageModeling") for a in architectures):
        raise _mim_error(folder, "Hugging Face " + "/".join(architectures))
    if not architectures:
        raise CheckpointError(
            f"'{cfg_path}' names no 'architecture' nor 'architectures': {expected}"
        )
    from bitrain.models.hf_classifier import ARCHITECTURES, build_classifier_from_hf

    _no_spec(user_spec, folder, "Hugging Face")
    _no_ema(use_ema, folder, "Hugging Face")
    known = [a for a in architectures if a in ARCHITECTURES]
    if not known:
        heads = [a for a, (_, has_head) in ARCHITECTURES.items() if has_head]
        raise CheckpointError(
            f"Hugging Face folder '{folder}' holds {architectures}; load_classifier reads "
            f"{', '.join(heads)} (or a timm folder, config.json with 'architecture')"
        )
    if not ARCHITECTURES[known[0]][1]:
        raise CheckpointError(
            f"Hugging Face folder '{folder}' holds a head-less {known[0]}, not a classifier: "
            f"fine-tune it first with `python -m bitrain.finetune model.pretrained={folder}`"
        )
    model = build_classifier_from_hf(folder)
    processor = folder / "preprocessor_config.json"
    node = None
    if processor.is_file():
        node = from_processor_config(_read_json(processor), str(processor))
    return _Loaded("hf", None, {}, model.label_names, node, model=model)


def _file_classifier(path: Path, user_spec: Mapping[str, Any] | None, use_ema: bool) -> _Loaded:
    """A bitrain ``.ckpt``, an official ``.pth`` or a bare timm state dict."""
    from bitrain.models.classifier import CLASSIFIER_TARGET

    if path.suffix == ".safetensors":
        from bitrain.models.hf import _read_weights

        obj: Any = _read_weights(path)
    else:
        obj = load_torch_file(path, allow_namespace=True)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a checkpoint dict")
    if "state_dict" in obj and "hyper_parameters" in obj:
        hparams = obj["hyper_parameters"]
        model_cfg = hparams.get("model") if isinstance(hparams, Mapping) else None
        if not isinstance(model_cfg, Mapping):
            raise CheckpointError(
                f"'{path}' is not a bitrain fine-tuning checkpoint (no hyper_parameters['model'])"
            )
        target = model_cfg.get("_target_")
        if target == BEIT_MIM_TARGET:
            raise _mim_error(path, "bitrain")
        if target != CLASSIFIER_TARGET:
            raise CheckpointError(
                f"'{path}' holds a {target}, not a classifier ({CLASSIFIER_TARGET})"
            )
        _no_spec(user_spec, path, "bitrain")
        state, _ = load_encoder_state(path, use_ema=use_ema)
        spec = {k: v for k, v in model_cfg.items() if k not in ("_target_", "pretrained")}
        return _Loaded(
            "bitrain",
            spec,
            state,
            obj.get("label_names"),
            _recorded(hparams.get("eval_transform"), f"'{path}' hyper_parameters.eval_transform"),
            obj.get("norm_settings"),
        )
    for key in ("model", "module"):
        if _is_tensor_mapping(obj.get(key)):
            return _official_classifier(path, obj, key, user_spec, use_ema)
    if _is_tensor_mapping(obj.get("state_dict")):
        obj = obj["state_dict"]
    if not _is_tensor_mapping(obj):
        raise CheckpointError(
            f"'{path}' is not a classifier checkpoint: expected a bitrain .ckpt (state_dict + "
            "hyper_parameters), an official .pth ({'model': ..., 'args': ...}) or a timm state "
            f"dict of tensors; found keys {_some_keys(obj)}"
        )
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if "lm_head.weight" in state:
        raise _mim_error(path, "state dict")
    _no_ema(use_ema, path, "a bare state dict")
    if user_spec is None:
        raise CheckpointError(
            f"'{path}' is a bare state dict, which does not say its architecture: pass "
            "model_name=<timm architecture> (and the other create_classifier arguments, e.g. "
            "img_size, patch_size, embed_dim, depth, num_heads) to load_classifier, or "
            "--model-name / --model-kwargs to scripts/convert_checkpoint.py"
        )
    return _Loaded("timm", user_spec, state)


def _official_classifier(
    path: Path,
    obj: Mapping[str, Any],
    key: str,
    user_spec: Mapping[str, Any] | None,
    use_ema: bool,
) -> _Loaded:
    raw = obj[key]
    if use_ema:
        if not _is_tensor_mapping(obj.get("model_ema")):
            _no_ema(True, path, "official")
        raw = obj["model_ema"]
    state = from_official_beit(raw)  # drops module. and relative_position_index
    if "lm_head.weight" in state or ("mask_token" in state and "head.weight" not in state):
        raise _mim_error(path, "official")
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    if user_spec is not None:
        spec = dict(user_spec)
    else:
        try:
            spec = infer_official_classifier_spec(state, args)
        except CheckpointError as err:
            raise CheckpointError(
                f"'{path}': {err}. If this is not a BEiT, pass model_name=<timm architecture> "
                "(and its arguments) to load_classifier"
            ) from err
    return _Loaded(
        "official",
        spec,
        state,
        obj.get("label_names") or args.get("bitrain_label_names"),
        _recorded(args.get("bitrain_eval_transform"), f"'{path}' args.bitrain_eval_transform"),
        args.get("bitrain_norm_settings"),
    )


def infer_official_classifier_spec(
    state_dict: Mapping[str, torch.Tensor], args: Any = None
) -> dict[str, Any]:
    """``create_classifier`` arguments of an official fine-tuned BEiT state dict.

    Like :func:`infer_official_kwargs` for pretraining checkpoints: width from ``cls_token``,
    depth from the block indices, patch size and channels from the patch conv, heads (columns) and
    patch grid (rows) from a relative position table (else heads from the model name and grid from
    ``pos_embed``), classes from ``head.weight``, mean pooling from ``fc_norm.*``, per-layer /
    shared relative positions and absolute positions from their tensors, LayerScale from
    ``gamma_1``. ``args`` (the ``run_class_finetuning.py`` command line) supplies the LayerScale
    init value and the drop-path rate; an ``args.bitrain_spec`` written by :func:`save_classifier`
    is used as is.

    Raises:
        CheckpointError: a tensor the inference needs is missing.
    """
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    if isinstance(args.get("bitrain_spec"), Mapping):
        return dict(args["bitrain_spec"])
    for key in ("cls_token", "patch_embed.proj.weight", "head.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state_dict:
            raise CheckpointError(
                f"official fine-tuned BEiT state dict has no '{key}'; found keys "
                f"{_some_keys(state_dict)}"
            )
    embed_dim = int(state_dict["cls_token"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    proj = state_dict["patch_embed.proj.weight"]
    patch = int(proj.shape[-1])
    shared = "rel_pos_bias.relative_position_bias_table" in state_dict
    per_layer = "blocks.0.attn.relative_position_bias_table" in state_dict
    name = str(args.get("model", ""))
    if shared or per_layer:
        table_key = (
            "blocks.0.attn.relative_position_bias_table"
            if per_layer
            else "rel_pos_bias.relative_position_bias_table"
        )
        num_heads = int(state_dict[table_key].shape[1])
        grid = _grid_from_table(state_dict[table_key].shape[0], table_key)
    else:
        size = next((s for tag, s in _OFFICIAL_SIZES.items() if f"_{tag}_" in name), None)
        num_heads = size[2] if size and size[0] == embed_dim else max(1, embed_dim // 64)
        if "pos_embed" not in state_dict:
            raise CheckpointError(
                "official BEiT state dict has neither a relative position table nor pos_embed"
            )
        grid = math.isqrt(state_dict["pos_embed"].shape[1] - 1)
    img_size = grid * patch
    num_classes = int(state_dict["head.weight"].shape[0])
    mean_pooling = "fc_norm.weight" in state_dict
    for arg, found in (
        ("input_size", img_size),
        ("nb_classes", num_classes),
        ("use_mean_pooling", mean_pooling),
    ):
        if args.get(arg) is not None and args[arg] != found:
            log.warning("official args.%s=%s but the weights say %s", arg, args[arg], found)
    layer_scale = args.get("layer_scale_init_value")
    has_gamma = "blocks.0.gamma_1" in state_dict
    import timm

    spec: dict[str, Any] = {
        "model_name": name if name.startswith("beit_") and timm.is_model(name) else _TIMM_BEIT,
        "num_classes": num_classes,
        "img_size": img_size,
        "patch_size": patch,
        "in_chans": int(proj.shape[1]),
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        "qkv_bias": "blocks.0.attn.q_bias" in state_dict,
        "use_abs_pos_emb": "pos_embed" in state_dict,
        "use_rel_pos_bias": per_layer,
        "use_shared_rel_pos_bias": shared,
        "init_values": (float(layer_scale) if layer_scale else 0.1) if has_gamma else 0.0,
        "global_pool": "avg" if mean_pooling else "token",
    }
    if args.get("drop_path") is not None:
        spec["drop_path_rate"] = float(args["drop_path"])
    return spec


_TIMM_BEIT = "beit_base_patch16_224"
CLASSIFIER_FORMATS: tuple[str, ...] = ("bitrain", "timm", "official", "hf")


# --- classifier export ---------------------------------------------------------------------------


def save_classifier(
    model: torch.nn.Module,
    path: str | os.PathLike,
    format: str = "bitrain",
    label_names: list[str] | None = None,
    eval_transform: EvalPreprocessing | Mapping[str, Any] | None = None,
) -> Path:
    """Write a timm classifier in one of :data:`CLASSIFIER_FORMATS` (read back by load_classifier).

    * ``bitrain``: ``{"state_dict": {"model.<key>": ...}, "hyper_parameters": {"model":
      {"_target_": CLASSIFIER_TARGET, **bitrain_spec}, "eval_transform": record}, "label_names",
      "norm_settings"}`` -- the fine-tuning ``.ckpt`` layout, model only.
    * ``timm``: a timm hub folder: ``config.json`` (``architecture``, ``num_classes``,
      ``num_features``, ``global_pool``, ``label_names``, ``model_args``, ``pretrained_cfg`` with
      the evaluation preprocessing, plus ``bitrain_*`` records) + ``model.safetensors``.
    * ``official``: ``{"model": state dict with relative_position_index buffers, "args":
      Namespace(model, nb_classes, input_size, rel_pos_bias, abs_pos_emb,
      layer_scale_init_value, use_mean_pooling, ..., bitrain_spec), "label_names"}``
      (``run_class_finetuning.py``'s layout). BEiT only.
    * ``hf``: a Hugging Face folder (:func:`bitrain.models.hf_classifier.save_hf_classifier`)
      plus ``preprocessor_config.json`` with the evaluation preprocessing.

    Args:
        model: a timm classifier (from :func:`load_classifier` or ``create_classifier``; other
            timm models need a ``bitrain_spec``-free format: ``timm`` or ``hf``).
        path: file (``bitrain``, ``official``) or folder (``timm``, ``hf``).
        format: one of :data:`CLASSIFIER_FORMATS`.
        label_names: class names; default ``model.label_names``.
        eval_transform: the evaluation preprocessing (an
            :class:`~bitrain.data.preprocessing.EvalPreprocessing` or its record); default
            ``model.bitrain_eval_transform``, else timm's data config of the model.

    Returns:
        The path written.

    Raises:
        ValueError: an unknown format, or label names of the wrong length.
        CheckpointError: a model the format cannot hold (official: not a BEiT; hf: not a
            BEiT / ViT / BiT).
    """
    if format not in CLASSIFIER_FORMATS:
        raise ValueError(
            f"unknown classifier format {format!r}; choose one of {CLASSIFIER_FORMATS}"
        )
    if label_names is None:
        label_names = getattr(model, "label_names", None)
    label_names = list(label_names) if label_names else None
    num_classes = getattr(model, "num_classes", 0) or _head_classes(model.state_dict(), "model")
    num_classes = int(num_classes)
    if label_names is not None and len(label_names) != num_classes:
        raise ValueError(
            f"save_classifier: {len(label_names)} label_names for a {num_classes}-class model; "
            "give one name per class, in class-index order"
        )
    if eval_transform is None:
        eval_transform = getattr(model, "bitrain_eval_transform", None)
    if isinstance(eval_transform, Mapping):
        eval_transform = read_record(eval_transform, "save_classifier(eval_transform=...)")
    node: EvalPreprocessing | None = eval_transform
    if format == "hf":
        return _save_hf(model, path, label_names, node)
    spec = _spec_of(model)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    norms = classifier_norm_settings(model)
    if format == "timm":
        return _save_timm(model, Path(path).expanduser(), spec, state, label_names, node, norms)
    if format == "bitrain":
        from bitrain.models.classifier import CLASSIFIER_TARGET

        hparams: dict[str, Any] = {"model": {"_target_": CLASSIFIER_TARGET, **spec}}
        if node is not None:
            hparams["eval_transform"] = node.to_record()
        obj = {
            "state_dict": {f"model.{k}": v for k, v in state.items()},
            "hyper_parameters": hparams,
            "label_names": label_names,
            "norm_settings": norms,
        }
        return atomic_save(obj, path)
    import timm

    if not isinstance(model, timm.models.beit.Beit):
        raise CheckpointError(
            f"the official unilm layout holds BEiT classifiers only; this is a "
            f"{type(model).__name__}: export it as 'timm' or 'hf' instead"
        )
    obj = {
        "model": to_official_beit(state),
        "args": _official_classifier_args(model, spec, norms, node),
        "label_names": label_names,
    }
    return atomic_save(obj, path)


def _spec_of(model: torch.nn.Module) -> dict[str, Any]:
    spec = getattr(model, "bitrain_spec", None)
    if not isinstance(spec, Mapping) or "model_name" not in spec:
        raise CheckpointError(
            f"save_classifier: the {type(model).__name__} has no bitrain_spec (the "
            "create_classifier arguments that rebuild it); build it with create_classifier or "
            "load_classifier"
        )
    out = _plain({k: v for k, v in spec.items() if k != "pretrained"})
    out["num_classes"] = int(out["num_classes"])
    return out


def classifier_norm_settings(model: torch.nn.Module) -> dict[str, Any]:
    """The model's LayerNorm ``eps`` / GroupNorm ``num_groups`` when all its layers share one.

    :func:`~bitrain.models.classifier.create_classifier` cannot take them (a Hugging Face model
    may use other values than timm's), so exports record them and :func:`load_classifier` sets
    them back (:func:`bitrain.models.hf_classifier.apply_norm_settings`).
    """
    out: dict[str, Any] = {}
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    if len(eps) == 1:
        out["layer_norm_eps"] = float(eps.pop())
    groups = {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    if len(groups) == 1:
        out["group_norm_groups"] = int(groups.pop())
    return out


def _official_classifier_args(
    model: torch.nn.Module,
    spec: Mapping[str, Any],
    norms: Mapping[str, Any],
    node: EvalPreprocessing | None,
) -> argparse.Namespace:
    """The model fields of ``run_class_finetuning.py``'s args, plus the exact bitrain records."""
    blocks = model.blocks
    dim, depth, heads = int(model.embed_dim), len(blocks), int(blocks[0].attn.num_heads)
    patch = int(model.patch_embed.patch_size[0])
    img = int(model.patch_embed.img_size[0])
    size = next((t for t, s in _OFFICIAL_SIZES.items() if s == (dim, depth, heads)), None)
    gamma = getattr(blocks[0], "gamma_1", None)
    return argparse.Namespace(
        model=f"beit_{size}_patch{patch}_{img}" if size else "bitrain_beit",
        nb_classes=int(spec["num_classes"]),
        input_size=img,
        drop_path=float(spec.get("drop_path_rate", 0.0)),
        rel_pos_bias=getattr(blocks[0].attn, "relative_position_bias_table", None) is not None,
        disable_rel_pos_bias=getattr(blocks[0].attn, "relative_position_bias_table", None) is None,
        abs_pos_emb=model.pos_embed is not None,
        layer_scale_init_value=float(spec.get("init_values") or 0.0) if gamma is not None else 0.0,
        use_mean_pooling=isinstance(getattr(model, "fc_norm", None), torch.nn.LayerNorm),
        qkv_bias=getattr(blocks[0].attn, "q_bias", None) is not None,
        bitrain_spec=dict(spec),
        bitrain_norm_settings=dict(norms),
        bitrain_eval_transform=None if node is None else node.to_record(),
    )


def _save_timm(
    model: torch.nn.Module,
    folder: Path,
    spec: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    label_names: list[str] | None,
    node: EvalPreprocessing | None,
    norms: Mapping[str, Any],
) -> Path:
    """A timm hub folder, as ``timm.models.push_to_hf_hub`` lays it out (``save_for_hf``)."""
    import json

    from safetensors.torch import save as safetensors_bytes

    from bitrain.io import atomic_write_bytes

    preprocessing = _preprocessing_or_default(model, spec, node)
    data = (preprocessing and preprocessing.to_timm_cfg(int(spec.get("in_chans", 3)))) or {}
    base = dict(getattr(model, "pretrained_cfg", None) or {})
    pretrained_cfg = {
        k: base[k]
        for k in ("first_conv", "classifier", "fixed_input_size", "pool_size")
        if base.get(k) is not None
    }
    pretrained_cfg.update(data)
    pretrained_cfg["num_classes"] = int(spec["num_classes"])
    pretrained_cfg["custom_load"] = False
    config: dict[str, Any] = {
        "architecture": spec["model_name"],
        "num_classes": int(spec["num_classes"]),
        "num_features": int(getattr(model, "num_features", 0)),
    }
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)  # ResNets: a SelectAdaptivePool2d
    if isinstance(pool, str) and pool:
        config["global_pool"] = pool
    if label_names:
        config["label_names"] = list(label_names)
    config["model_args"] = _timm_model_args(model, spec)
    config["pretrained_cfg"] = pretrained_cfg
    config["bitrain_spec"] = dict(spec)
    config["bitrain_norm_settings"] = dict(norms)
    if node is not None:
        config["bitrain_eval_transform"] = node.to_record()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(
        folder / "model.safetensors", safetensors_bytes(dict(state), metadata={"format": "pt"})
    )
    atomic_write_bytes(folder / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    return folder


def _timm_model_args(model: torch.nn.Module, spec: Mapping[str, Any]) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments that rebuild the model (timm's ``model_args``)."""
    import inspect

    args = {k: v for k, v in spec.items() if k not in ("model_name", "pretrained")}
    if "img_size" in args:
        params = inspect.signature(type(model).__init__).parameters
        if "img_size" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            args.pop("img_size")  # a record only (ResNets): timm.create_model would refuse it
    return _plain(args)


def _recorded(record: Any, where: str) -> EvalPreprocessing | None:
    """A file's evaluation-preprocessing record as data (None when the file records none)."""
    return None if record is None else read_record(record, where)


# The data fields of timm's pretrained_cfg that define its evaluation transform.
_TIMM_CFG_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


def _timm_folder_preprocessing(config: Mapping[str, Any], where: Path) -> EvalPreprocessing | None:
    """The record bitrain wrote into a timm folder's config.json, else timm's ``pretrained_cfg``."""
    if config.get("bitrain_eval_transform") is not None:
        return read_record(config["bitrain_eval_transform"], f"'{where}' bitrain_eval_transform")
    cfg = config.get("pretrained_cfg") or {}
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"'{where}': pretrained_cfg is a {type(cfg).__name__}, not a mapping")
    if not cfg.get("input_size"):
        return None
    args = {k: cfg[k] for k in _TIMM_CFG_KEYS if cfg.get(k) is not None}
    return from_timm_args(args, f"'{where}' pretrained_cfg")


def _save_hf(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    label_names: list[str] | None,
    node: EvalPreprocessing | None,
) -> Path:
    import json

    from bitrain.io import atomic_write_bytes
    from bitrain.models.hf_classifier import save_hf_classifier

    out = save_hf_classifier(model, folder, label_names=label_names)
    spec = dict(getattr(model, "bitrain_spec", None) or {})
    preprocessing = _preprocessing_or_default(model, spec, node)
    if preprocessing is not None:
        processor = preprocessing.to_processor_config()
        from bitrain.models.hf_classifier import _family

        processor["image_processor_type"] = _processor_type(_family(model), processor)
        atomic_write_bytes(
            out / "preprocessor_config.json",
            (json.dumps(processor, indent=2) + "\n").encode(),
        )
    return out


def _processor_type(family: str, processor: Mapping[str, Any]) -> str:
    """The HF image processor whose ``resize`` means what ``processor["size"]`` says."""
    exact = "height" in processor["size"]
    if family == "beit" and exact:
        return "BeitImageProcessor"
    if family == "vit" and exact and not processor["do_center_crop"]:
        return "ViTImageProcessor"
    return "BitImageProcessor"  # shortest-edge resize + centre crop (timm's eval transform)


def _preprocessing_or_default(
    model: torch.nn.Module, spec: Mapping[str, Any], node: EvalPreprocessing | None
) -> EvalPreprocessing | None:
    """``node``, else timm's default evaluation transform for the model.

    None, with a warning, when timm's default cannot be expressed (e.g. a ``border`` crop mode).
    """
    if node is not None:
        return node
    from timm.data import resolve_data_config

    args: dict[str, Any] = {}
    if spec.get("img_size"):
        size = spec["img_size"]
        size = size if isinstance(size, list | tuple) else (size, size)
        args["input_size"] = (int(spec.get("in_chans", 3)), *map(int, size))
    data = resolve_data_config(args, model=model)
    try:
        return from_timm_args({k: data[k] for k in _TIMM_CFG_KEYS if data.get(k) is not None})
    except CheckpointError as err:
        log.warning("no preprocessing written for the export: %s", err)
        return None
