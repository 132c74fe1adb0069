"""Classifier checkpoints: load any format into a timm model, export to any format.

:func:`load_classifier` reads a bitrain fine-tuning ``.ckpt``, a timm hub folder, a Hugging Face
classifier folder, an official unilm fine-tuned ``.pth`` (with or without ``args``) or a bare
state dict (with ``model_name``); :func:`save_classifier` writes the ``bitrain``, ``timm``,
``official`` and ``hf`` layouts. The evaluation preprocessing travels with the model as data (a
Hugging Face ``preprocessor_config.json``, timm's ``pretrained_cfg``, bitrain's record; read and
written by :mod:`bitrain.data.preprocessing`, never a code path taken from the file). The timm
hub folder layout is here too (a ``config.json`` + weights with timm's own key names); the other
formats' tables are in :mod:`.official` and :mod:`.huggingface`. docs/checkpoints.md has the
tables.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch

from bitrain.checkpoints.hf import read_folder, read_json, write_folder
from bitrain.checkpoints.huggingface import build_classifier_from_hf, save_hf_classifier
from bitrain.checkpoints.official import (
    classifier_args,
    classifier_spec,
    from_official,
    to_official,
)
from bitrain.checkpoints.sniff import (
    Sniffed,
    bitrain_state,
    is_tensor_mapping,
    sniff,
    tensors_of,
)
from bitrain.data.preprocessing import (
    EvalPreprocessing,
    from_official_args,
    from_processor_config,
    from_timm_args,
    read_record,
)
from bitrain.io import CheckpointError, atomic_save
from bitrain.io import plain_tree as _plain
from bitrain.models.classifier import CLASSIFIER_TARGET, create_classifier

log = logging.getLogger(__name__)


def load_classifier(
    path_or_dir: str | os.PathLike | Sniffed,
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
        path_or_dir: the checkpoint file or folder (or what :func:`~.sniff.sniff` found there).
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
    found = path_or_dir if isinstance(path_or_dir, Sniffed) else sniff(path_or_dir)
    path = found.path
    if spec and model_name is None:
        raise ValueError(
            f"load_classifier: {sorted(spec)} given without model_name; pass model_name=<timm "
            "architecture> with the other create_classifier arguments"
        )
    user_spec = {"model_name": model_name, **spec} if model_name is not None else None
    if found.kind == "mim":
        raise CheckpointError(
            f"'{path}' is a pretraining (MIM) checkpoint ({found.format}), not a classifier: "
            f"fine-tune it first with `python -m bitrain.finetune model.pretrained={path}`"
        )
    if found.format != "timm" or path.is_dir():
        _no_spec(user_spec, path, found.format)
    if use_ema and found.format not in ("bitrain", "official"):
        _no_ema(path, found.format)
    reader = {"bitrain": _bitrain, "official": _official, "hf": _hf, "timm": _timm}[found.format]
    model = _build_classifier(reader(found, user_spec, use_ema), path)
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
    """``create_classifier(**spec)`` + strict load, with clear errors.

    Files written before the norm settings were ``create_classifier`` arguments keep them in a
    separate record (``norm_settings``); they join the spec.
    """
    where = f"{loaded.fmt} checkpoint '{path}'"
    model = loaded.model
    if model is None:
        spec = _checked_spec({**loaded.norm_settings, **(loaded.spec or {})}, where)
        if spec.get("num_classes") is None:
            spec["num_classes"] = _head_classes(loaded.state, where)
        spec.pop("pretrained", None)
        try:
            model = create_classifier(**spec)
        except (TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"{where}: cannot build create_classifier({spec}): {err}"
            ) from err
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
    # timm's own metadata says the same, so timm's resolve_data_config(model=...) preprocesses
    # as the checkpoint records wherever timm's fields can express it
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    spec = model.bitrain_spec
    if loaded.eval_transform is not None:
        cfg.update(loaded.eval_transform.to_timm_cfg(int(spec.get("in_chans", 3))) or {})
    if names is not None:
        cfg["label_names"] = list(names)
    model.pretrained_cfg = cfg
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


def _no_spec(user_spec: Mapping[str, Any] | None, path: Path, fmt: str) -> None:
    if user_spec is not None:
        raise ValueError(
            f"'{path}' is a {fmt} checkpoint that names its own architecture; model_name and "
            "spec are only for bare state dicts"
        )


def _no_ema(path: Path, fmt: str) -> None:
    raise CheckpointError(
        f"'{path}' ({fmt}) has no EMA weights: use_ema is for bitrain .ckpt files of runs "
        "trained with task.ema and official .pth files with 'model_ema'"
    )


def _recorded(record: Any, where: str) -> EvalPreprocessing | None:
    """A file's evaluation-preprocessing record as data (None when the file records none)."""
    return None if record is None else read_record(record, where)


def _bitrain(found: Sniffed, user_spec: Any, use_ema: bool) -> _Loaded:
    """A bitrain fine-tuning ``.ckpt`` (or a ``save_classifier`` ``bitrain`` export)."""
    obj, path = found.obj, found.path
    hparams = obj["hyper_parameters"]
    state = bitrain_state(found, use_ema)
    spec = {k: v for k, v in hparams["model"].items() if k not in ("_target_", "pretrained")}
    spec.pop("pretrained_strict", None)
    return _Loaded(
        "bitrain",
        spec,
        state,
        obj.get("label_names"),
        _recorded(hparams.get("eval_transform"), f"'{path}' hyper_parameters.eval_transform"),
        obj.get("norm_settings"),
    )


def _official(found: Sniffed, user_spec: Any, use_ema: bool) -> _Loaded:
    """An official unilm fine-tuned ``.pth`` (with or without ``args``)."""
    obj, path = found.obj, found.path
    if use_ema and not is_tensor_mapping(obj.get("model_ema")):
        _no_ema(path, "official")
    key = (
        "model_ema"
        if use_ema
        else next(k for k in ("model", "module") if is_tensor_mapping(obj.get(k)))
    )
    state = from_official(obj[key])
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    if user_spec is not None:
        spec = dict(user_spec)
    else:
        try:
            spec = classifier_spec(state, args)
        except CheckpointError as err:
            raise CheckpointError(
                f"'{path}': {err}. If this is not a BEiT, pass model_name=<timm architecture> "
                "(and its arguments) to load_classifier"
            ) from None
    return _Loaded(
        "official",
        spec,
        state,
        obj.get("label_names") or args.get("bitrain_label_names"),
        _official_preprocessing(args, path),
        args.get("bitrain_norm_settings"),
    )


def _official_preprocessing(args: Mapping[str, Any], path: Path) -> EvalPreprocessing | None:
    """The record bitrain wrote into ``args``, else what unilm's own ``args`` say, else None."""
    if args.get("bitrain_eval_transform") is not None:
        return read_record(args["bitrain_eval_transform"], f"'{path}' args.bitrain_eval_transform")
    if args.get("input_size") is None:
        return None
    return from_official_args(args, f"'{path}' args")


def _hf(found: Sniffed, user_spec: Any, use_ema: bool) -> _Loaded:
    """A Hugging Face classifier folder (``preprocessor_config.json`` gives the preprocessing)."""
    folder = found.path
    if found.kind != "classifier":
        raise CheckpointError(
            f"Hugging Face folder '{folder}' holds a head-less "
            f"{', '.join(map(str, found.obj.get('architectures') or []))}, "
            f"not a classifier: fine-tune it first with `python -m bitrain.finetune "
            f"model.pretrained={folder}`"
        )
    model = build_classifier_from_hf(folder)
    processor = folder / "preprocessor_config.json"
    node = None
    if processor.is_file():
        node = from_processor_config(read_json(processor), str(processor))
    return _Loaded("hf", None, {}, model.label_names, node, model=model)


def _timm(found: Sniffed, user_spec: Any, use_ema: bool) -> _Loaded:
    """A timm hub folder, or a bare timm state dict (which needs ``model_name``)."""
    path = found.path
    if not path.is_dir():
        state = {k.removeprefix("module."): v for k, v in tensors_of(found).items()}
        if user_spec is None:
            raise CheckpointError(
                f"'{path}' is a bare state dict, which does not say its architecture: pass "
                "model_name=<timm architecture> (and the other create_classifier arguments, e.g. "
                "img_size, patch_size, embed_dim, depth, num_heads) to load_classifier, or "
                "--model-name / --model-kwargs to scripts/convert_checkpoint.py"
            )
        return _Loaded("timm", user_spec, state)
    config = found.obj
    state = read_folder(path)[0]
    if isinstance(config.get("bitrain_spec"), Mapping):
        spec = dict(config["bitrain_spec"])
    else:
        spec = {"model_name": config["architecture"], **(config.get("model_args") or {})}
        spec["num_classes"] = config.get("num_classes", spec.get("num_classes"))
    return _Loaded(
        "timm",
        spec,
        state,
        config.get("label_names"),
        _timm_folder_preprocessing(config, path / "config.json"),
        config.get("bitrain_norm_settings"),
    )


CLASSIFIER_FORMATS: tuple[str, ...] = ("bitrain", "timm", "official", "hf")


# --- classifier export ----------------------------------------------------------------------------


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
    if format == "timm":
        return _save_timm(model, Path(path).expanduser(), spec, state, label_names, node)
    if format == "bitrain":
        hparams: dict[str, Any] = {"model": {"_target_": CLASSIFIER_TARGET, **spec}}
        if node is not None:
            hparams["eval_transform"] = node.to_record()
        obj = {
            "state_dict": {f"model.{k}": v for k, v in state.items()},
            "hyper_parameters": hparams,
            "label_names": label_names,
        }
        return atomic_save(obj, path)
    if not isinstance(model, timm.models.beit.Beit):
        raise CheckpointError(
            f"the official unilm layout holds BEiT classifiers only; this is a "
            f"{type(model).__name__}: export it as 'timm' or 'hf' instead"
        )
    obj = {
        "model": to_official(state),
        "args": classifier_args(model, spec, node),
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
    out = _plain({k: v for k, v in spec.items() if k not in ("pretrained", "pretrained_strict")})
    out["num_classes"] = int(out["num_classes"])
    out.update(classifier_norm_settings(model))  # what the modules are, also if set after build
    return out


def classifier_norm_settings(model: torch.nn.Module) -> dict[str, Any]:
    """The model's LayerNorm ``eps`` / GroupNorm ``num_groups`` when all its layers share one.

    ``create_classifier``'s ``layer_norm_eps`` / ``group_norm_groups``: a Hugging Face model may
    use other values than timm's, so every export's spec states them.
    """
    out: dict[str, Any] = {}
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    if len(eps) == 1:
        out["layer_norm_eps"] = float(eps.pop())
    groups = {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    if len(groups) == 1:
        out["group_norm_groups"] = int(groups.pop())
    return out


def _save_timm(
    model: torch.nn.Module,
    folder: Path,
    spec: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    label_names: list[str] | None,
    node: EvalPreprocessing | None,
) -> Path:
    """A timm hub folder, as ``timm.models.push_to_hf_hub`` lays it out (``save_for_hf``)."""
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
    if node is not None:
        config["bitrain_eval_transform"] = node.to_record()
    return write_folder(folder, state, config)


def _timm_model_args(model: torch.nn.Module, spec: Mapping[str, Any]) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments that rebuild the model (timm's ``model_args``)."""
    # the norm settings are create_classifier's, not timm.create_model's
    skip = ("model_name", "pretrained", "layer_norm_eps", "group_norm_groups")
    args = {k: v for k, v in spec.items() if k not in skip}
    if "img_size" in args:
        params = inspect.signature(type(model).__init__).parameters
        if "img_size" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            args.pop("img_size")  # a record only (ResNets): timm.create_model would refuse it
    return _plain(args)


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
    """A HF classifier folder with ``preprocessor_config.json``.

    ``size`` is always written as a dict, so every processor class reads it the same way.
    """
    spec = dict(getattr(model, "bitrain_spec", None) or {})
    preprocessing = _preprocessing_or_default(model, spec, node)
    processor = None
    if preprocessing is not None:
        processor = preprocessing.to_processor_config()
        family = type(model).__name__
        exact = "height" in processor["size"]
        kind = "BitImageProcessor"  # shortest-edge resize + centre crop (timm's eval transform)
        if family == "Beit" and exact:
            kind = "BeitImageProcessor"
        elif family == "VisionTransformer" and exact and not processor["do_center_crop"]:
            kind = "ViTImageProcessor"
        processor["image_processor_type"] = kind
    return save_hf_classifier(model, folder, label_names, preprocessor=processor)


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
