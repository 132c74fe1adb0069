"""Classifier checkpoints: load any format into a timm model, export to any format.

:data:`CLASSIFIER_FORMATS` (docs/checkpoints.md has the layouts): a bitrain fine-tuning ``.ckpt``;
a timm hub folder (``config.json`` + weights in timm's own names, as
``timm.models.push_to_hf_hub`` writes it: that layout is here); a Hugging Face folder
(:mod:`.huggingface`); an official unilm ``.pth`` (:mod:`.official`); a bare timm state dict (with
``model_name``). Label names and the evaluation preprocessing (:mod:`.normalization`) travel with
the model as data, never a code path taken from the file.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_data_config

from bitrain.checkpoints.hf import label_list, label_names, read_folder, write_folder
from bitrain.checkpoints.huggingface import read_hf_classifier, save_hf_classifier
from bitrain.checkpoints.normalization import preprocessing_of
from bitrain.checkpoints.official import (
    classifier_args,
    classifier_spec,
    from_official,
    plain_args,
    to_official,
)
from bitrain.checkpoints.sniff import Sniffed, is_tensor_mapping, sniff, state_of
from bitrain.data.preprocessing import EvalPreprocessing, from_timm_cfg, read_record
from bitrain.io import CheckpointError, atomic_save
from bitrain.io import plain_tree as _plain
from bitrain.models.classifier import CLASSIFIER_TARGET, create_classifier

__all__ = ["CLASSIFIER_FORMATS", "build_classifier_from_hf", "load_classifier", "save_classifier"]

log = logging.getLogger(__name__)

CLASSIFIER_FORMATS: tuple[str, ...] = ("bitrain", "timm", "official", "hf")
# timm.create_model arguments that would read or fetch weights from a place the file chooses.
_LOADER_ARGS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path"}


def load_classifier(
    path_or_dir: str | os.PathLike | Sniffed,
    map_location: str | torch.device = "cpu",
    use_ema: bool = False,
    model_name: str | None = None,
    **spec: Any,
) -> torch.nn.Module:
    """A fine-tuned classifier of any of :data:`CLASSIFIER_FORMATS` as a timm model in eval mode.

    An official ``.pth`` without ``args`` is read from its tensor shapes; a bare state dict needs
    ``model_name`` and the other ``create_classifier`` arguments (``spec``; ``num_classes`` is read
    from the head). ``use_ema``: bitrain ``ema.module.*`` or official ``model_ema``. The model
    carries ``label_names``, ``bitrain_spec``, ``bitrain_source_format`` and
    ``bitrain_eval_transform`` (the preprocessing the file records, or None).

    Raises:
        FileNotFoundError: nothing at the path.
        CheckpointError: an unknown layout, a pretraining (MIM) checkpoint, a bare state dict
            without ``model_name``, a record that names code, or weights that do not fit.
        ValueError: ``spec`` without ``model_name``, or either for a checkpoint that names its own
            architecture.
    """
    found = path_or_dir if isinstance(path_or_dir, Sniffed) else sniff(path_or_dir)
    path, fmt, obj = found.path, found.format, found.obj
    if spec and model_name is None:
        raise ValueError(
            f"load_classifier: {sorted(spec)} given without model_name; pass model_name=<timm "
            "architecture> with the other create_classifier arguments"
        )
    if found.kind == "mim":
        raise CheckpointError(
            f"'{path}' is a pretraining (MIM) checkpoint ({fmt}), not a classifier: "
            f"fine-tune it first with `python -m bitrain.finetune model.pretrained={path}`"
        )
    if model_name is not None and (fmt != "timm" or path.is_dir()):
        raise ValueError(
            f"'{path}' is a {fmt} checkpoint that names its own architecture; model_name and "
            "spec are only for bare state dicts"
        )
    ema = fmt == "bitrain" or (fmt == "official" and is_tensor_mapping(obj.get("model_ema")))
    if use_ema and not ema:
        raise CheckpointError(
            f"'{path}' ({fmt}) has no EMA weights: use_ema is for bitrain .ckpt files of runs "
            "trained with task.ema and official .pth files with 'model_ema'"
        )
    legacy = None  # norm settings files kept apart before they were create_classifier arguments
    if fmt == "hf":
        if found.kind != "classifier":
            raise CheckpointError(
                f"Hugging Face folder '{path}' holds a head-less "
                f"{', '.join(map(str, obj.get('architectures') or []))}, not a classifier: "
                f"fine-tune it first with `python -m bitrain.finetune model.pretrained={path}`"
            )
        model_spec, state, config = read_hf_classifier(path)
        names = label_names(config)
    elif fmt == "bitrain":
        state = state_of(found, use_ema)
        model_spec = dict(obj["hyper_parameters"]["model"])
        names, legacy = obj.get("label_names"), obj.get("norm_settings")
    elif fmt == "official":
        state, args = from_official(state_of(found, use_ema)), plain_args(obj.get("args"))
        try:
            model_spec = classifier_spec(state, args)
        except CheckpointError as err:
            raise CheckpointError(
                f"'{path}': {err}. A non-BEiT model loads from its state dict alone (saved on its "
                "own) with model_name=<timm architecture>"
            ) from None
        names = obj.get("label_names") or args.get("bitrain_label_names")
        legacy = args.get("bitrain_norm_settings")
    elif path.is_dir():  # a timm hub folder
        state, model_spec = read_folder(path)[0], obj.get("bitrain_spec")
        if not isinstance(model_spec, Mapping):
            model_spec = {"model_name": obj["architecture"], **(obj.get("model_args") or {})}
            model_spec["num_classes"] = obj.get("num_classes", model_spec.get("num_classes"))
        names, legacy = obj.get("label_names"), obj.get("bitrain_norm_settings")
    elif model_name is None:
        raise CheckpointError(
            f"'{path}' is a bare state dict, which does not say its architecture: pass "
            "model_name=<timm architecture> (and the other create_classifier arguments, e.g. "
            "img_size, patch_size, embed_dim, depth, num_heads) to load_classifier, or "
            "--model-name / --model-kwargs to scripts/convert_checkpoint.py"
        )
    else:
        state, model_spec, names = state_of(found), {"model_name": model_name, **spec}, None
    model = _build({**(legacy or {}), **model_spec}, state, fmt, path)
    num_classes = int(model.bitrain_spec["num_classes"])
    model.label_names = label_list(names, f"{fmt} checkpoint '{path}'", num_classes)
    model.bitrain_source_format = fmt
    model.bitrain_eval_transform = preprocessing_of(found)
    # timm's own metadata says the same, so timm's resolve_data_config(model=...) preprocesses
    # as the checkpoint records wherever timm's fields can express it
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if model.bitrain_eval_transform is not None:
        in_chans = int(model.bitrain_spec.get("in_chans", 3))
        cfg.update(model.bitrain_eval_transform.to_timm_cfg(in_chans) or {})
    if model.label_names is not None:
        cfg["label_names"] = list(model.label_names)
    model.pretrained_cfg = cfg
    return model.to(map_location).eval()


def build_classifier_from_hf(
    folder: str | os.PathLike, num_classes: int | None = None
) -> torch.nn.Module:
    """A HF classifier folder as a timm model in eval mode, with ``label_names``.

    ``num_classes`` gives a head-less folder (``BeitModel`` ...) a fresh head; it is refused for a
    folder with a head of its own, and required without one (CheckpointError).
    """
    spec, state, config = read_hf_classifier(folder)
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
    fresh = ("head.", "fc_norm.") if headless else ()
    model = _build(
        {**spec, "num_classes": num_classes or spec["num_classes"]}, state, "hf", folder, fresh
    )
    model.label_names = None if headless else label_names(config, spec["num_classes"])
    return model.eval()


def _build(
    spec: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    fmt: str,
    path: str | os.PathLike,
    fresh: tuple[str, ...] = (),
) -> torch.nn.Module:
    """``create_classifier(**spec)``, ``state`` loaded strictly (but keys under ``fresh``).

    The spec is data that chooses no code and no file: a registered timm ``model_name`` (no
    ``hf-hub:`` name, which would fetch a config), plain values (no ``${...}`` interpolation),
    and no argument that makes timm load weights.
    """
    where = f"{fmt} checkpoint '{path}'"

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

    skip = ("_target_", "pretrained", "pretrained_strict")
    spec = {str(k): plain(v, str(k)) for k, v in spec.items() if k not in skip}
    name = spec.get("model_name")
    if not isinstance(name, str) or ":" in name or not timm.is_model(name):
        raise CheckpointError(f"{where}: model_name {name!r} is not a timm architecture")
    if loaders := sorted(_LOADER_ARGS & spec.keys()):
        raise CheckpointError(f"{where}: model arguments {loaders} would load other weights")
    if spec.get("num_classes") is None:
        spec["num_classes"] = _head_classes(state, where)
    try:
        model = create_classifier(**spec)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{where}: cannot build create_classifier({spec}): {err}") from None
    state = {
        k.removeprefix("module."): v
        for k, v in state.items()
        if not k.endswith("relative_position_index")
    }
    try:
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(fresh)]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"missing {missing[:6]}, unexpected {result.unexpected_keys[:6]}")
    except RuntimeError as err:
        hint = " Check model_name and the other arguments against the checkpoint."
        hint = hint if fmt in ("timm", "official") else ""
        raise CheckpointError(f"{where} does not fit {name}({spec}): {err}.{hint}") from None
    return model


def _head_classes(state: Mapping[str, torch.Tensor], where: str) -> int:
    for key in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight"):
        if key in state:
            return int(state[key].shape[0])
    raise CheckpointError(
        f"{where}: no classification head (head.weight / head.fc.weight) to read num_classes "
        "from; pass num_classes"
    )


# --- classifier export ----------------------------------------------------------------------------


def save_classifier(
    model: torch.nn.Module,
    path: str | os.PathLike,
    format: str = "bitrain",
    label_names: list[str] | None = None,
    eval_transform: EvalPreprocessing | Mapping[str, Any] | None = None,
) -> Path:
    """Write a timm classifier in one of :data:`CLASSIFIER_FORMATS`; returns the path written.

    The layouts are :func:`load_classifier`'s (docs/checkpoints.md); ``official`` holds BEiT only,
    ``hf`` BEiT / ViT / BiT. ``label_names`` default to ``model.label_names``, ``eval_transform`` (a
    spec or its record) to ``model.bitrain_eval_transform``, else timm's data config of the model.

    Raises:
        ValueError: an unknown format, or label names of the wrong length.
        CheckpointError: a model the format cannot hold, or one without ``bitrain_spec`` (but hf).
    """
    if format not in CLASSIFIER_FORMATS:
        raise ValueError(
            f"unknown classifier format {format!r}; choose one of {CLASSIFIER_FORMATS}"
        )
    if label_names is None:
        label_names = getattr(model, "label_names", None)
    label_names = list(label_names) if label_names else None
    num_classes = getattr(model, "num_classes", 0) or _head_classes(model.state_dict(), "model")
    if label_names is not None and len(label_names) != int(num_classes):
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
        hparams = {"model": {"_target_": CLASSIFIER_TARGET, **spec}}
        if node is not None:
            hparams["eval_transform"] = node.to_record()
        state = {f"model.{k}": v for k, v in state.items()}
        obj = {"state_dict": state, "hyper_parameters": hparams, "label_names": label_names}
        return atomic_save(obj, path)
    if not isinstance(model, timm.models.beit.Beit):
        raise CheckpointError(
            f"the official unilm layout holds BEiT classifiers only; this is a "
            f"{type(model).__name__}: export it as 'timm' or 'hf' instead"
        )
    args = classifier_args(model, spec, node)
    return atomic_save(
        {"model": to_official(state), "args": args, "label_names": label_names}, path
    )


def _spec_of(model: torch.nn.Module) -> dict[str, Any]:
    """The model's ``bitrain_spec`` as plain data, with the norm settings its modules have."""
    spec = getattr(model, "bitrain_spec", None)
    if not isinstance(spec, Mapping) or "model_name" not in spec:
        raise CheckpointError(
            f"save_classifier: the {type(model).__name__} has no bitrain_spec (the "
            "create_classifier arguments that rebuild it); build it with create_classifier or "
            "load_classifier"
        )
    out = _plain({k: v for k, v in spec.items() if k not in ("pretrained", "pretrained_strict")})
    out["num_classes"] = int(out["num_classes"])
    # create_classifier's layer_norm_eps / group_norm_groups when all layers share one value (a
    # Hugging Face model may use other values than timm's), also if set after the build
    for key, kind, attr, cast in (
        ("layer_norm_eps", torch.nn.LayerNorm, "eps", float),
        ("group_norm_groups", torch.nn.GroupNorm, "num_groups", int),
    ):
        values = {getattr(m, attr) for m in model.modules() if isinstance(m, kind)}
        if len(values) == 1:
            out[key] = cast(values.pop())
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
    base = dict(getattr(model, "pretrained_cfg", None) or {})
    pretrained_cfg = {
        k: base[k]
        for k in ("first_conv", "classifier", "fixed_input_size", "pool_size")
        if base.get(k) is not None
    }
    if preprocessing is not None:
        pretrained_cfg.update(preprocessing.to_timm_cfg(int(spec.get("in_chans", 3))) or {})
    pretrained_cfg.update(num_classes=int(spec["num_classes"]), custom_load=False)
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
    # timm.create_model's arguments (the norm settings are create_classifier's); img_size only
    # where the constructor takes it (a record only for ResNets: timm would refuse it)
    args = {
        k: v
        for k, v in spec.items()
        if k not in ("model_name", "layer_norm_eps", "group_norm_groups")
    }
    params = inspect.signature(type(model).__init__).parameters
    if "img_size" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        args.pop("img_size", None)
    config.update(model_args=_plain(args), pretrained_cfg=pretrained_cfg, bitrain_spec=dict(spec))
    if node is not None:
        config["bitrain_eval_transform"] = node.to_record()
    return write_folder(folder, state, config)


def _save_hf(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    label_names: list[str] | None,
    node: EvalPreprocessing | None,
) -> Path:
    """A HF classifier folder with ``preprocessor_config.json`` (``size`` always a dict)."""
    spec = dict(getattr(model, "bitrain_spec", None) or {})
    preprocessing = _preprocessing_or_default(model, spec, node)
    processor = None
    if preprocessing is not None:
        processor = preprocessing.to_processor_config()
        family = type(model).__name__
        exact = "height" in processor.get("size", {})
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
    """``node``, else timm's default evaluation transform (None, warned, if it cannot be one)."""
    if node is not None:
        return node
    args: dict[str, Any] = {}
    if spec.get("img_size"):
        size = spec["img_size"]
        size = size if isinstance(size, list | tuple) else (size, size)
        args["input_size"] = (int(spec.get("in_chans", 3)), *map(int, size))
    data = resolve_data_config(args, model=model)
    try:
        return from_timm_cfg(data, "timm data config")
    except CheckpointError as err:
        log.warning("no preprocessing written for the export: %s", err)
        return None
