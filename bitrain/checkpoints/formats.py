"""Models in and out of every checkpoint format: one reader, and one writer per kind.

A checkpoint holds a BEiT pretraining model (:class:`~bitrain.models.beit.BeitMIM`, in
:data:`FORMATS`) or a timm classifier (:data:`CLASSIFIER_FORMATS`). :func:`read` turns any of them
into :class:`Contents`, reading each file as the library that wrote it does: bitrain's
``hyper_parameters``; unilm's ``args`` (bitrain's exact ``bitrain_*`` records first, else the
tensor shapes, :mod:`.official`); a Hugging Face ``config.json`` (:mod:`.hf`) and
``preprocessor_config.json``; a timm hub ``config.json`` (``pretrained_cfg``), or a bare state dict
whose architecture the caller names. Nothing read picks code: arguments are plain values for a
class bitrain chooses and a registered timm name (:func:`_build`); records are data.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_input_data_config
from timm.models._hub import save_config_for_hf

from bitrain.checkpoints import hf, official
from bitrain.checkpoints.sniff import BEIT_MIM_TARGET, Sniffed, is_tensor_mapping, sniff, state_of
from bitrain.data import preprocessing as prep
from bitrain.data.preprocessing import EvalPreprocessing
from bitrain.io import CheckpointError, atomic_save, plain_tree
from bitrain.models.beit import BeitMIM
from bitrain.models.classifier import CLASSIFIER_TARGET, create_classifier

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("bitrain", "official", "hf")
CLASSIFIER_FORMATS: tuple[str, ...] = ("bitrain", "timm", "official", "hf")
Normalization = tuple[tuple[float, ...], tuple[float, ...]]
# timm.create_model arguments that would read or fetch weights from a place the file chooses.
_LOADER_ARGS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path"}
_FINETUNE = "fine-tune it first with `python -m bitrain.finetune model.pretrained={}`"


@dataclass
class Contents:
    """What :func:`read` found: the model's arguments and weights (our names), and the records."""

    format: str
    kind: str  # "mim" | "classifier"
    spec: dict[str, Any]  # BeitMIM kwargs | create_classifier arguments
    state: dict[str, torch.Tensor]
    label_names: Any = None
    eval_transform: EvalPreprocessing | None = None
    normalization: Normalization | None = None


def read(
    found: Sniffed, use_ema: bool = False, model_name: str | None = None, **spec: Any
) -> Contents:
    """The contents of a sniffed checkpoint.

    ``use_ema``: bitrain ``ema.module.*`` or official ``model_ema``; ``model_name`` and ``spec``:
    the ``create_classifier`` arguments of a bare classifier state dict.
    """
    path, fmt, obj = found.path, found.format, found.obj
    kind = "mim" if found.kind == "mim" else "classifier"
    records, where = _records(found)
    ema = fmt == "bitrain" or (fmt == "official" and is_tensor_mapping(obj.get("model_ema")))
    if use_ema and not ema:
        raise CheckpointError(
            f"'{path}' ({fmt}) has no EMA weights: use_ema is for bitrain .ckpt files of runs "
            "trained with task.ema and official .pth files with 'model_ema'"
        )
    names = legacy = None  # legacy: norm settings files kept apart before they were arguments
    if fmt == "hf":
        state, args, config = read_hf(path)
        names = None if kind == "mim" else hf.label_names(config)
    elif fmt == "bitrain":
        state, args = state_of(found, use_ema), dict(records["model"])
        names, legacy = obj.get("label_names"), obj.get("norm_settings")
    elif fmt == "timm" and path.is_dir():
        state, args = hf.read_folder(path)[0], obj.get("bitrain_spec")
        if not isinstance(args, Mapping):
            args = {"model_name": obj["architecture"], **(obj.get("model_args") or {})}
            args["num_classes"] = obj.get("num_classes", args.get("num_classes"))
        names, legacy = obj.get("label_names"), obj.get("bitrain_norm_settings")
    elif fmt == "timm" and kind == "classifier":
        if model_name is None:
            raise CheckpointError(
                f"'{path}' is a bare state dict, which does not say its architecture: pass "
                "model_name=<timm architecture> (and the other create_classifier arguments, e.g. "
                "img_size, patch_size, embed_dim, depth, num_heads) to load_classifier, or "
                "--model-name / --model-kwargs to scripts/convert_checkpoint.py"
            )
        state, args = state_of(found), {"model_name": model_name, **spec}
    else:  # the official layout, or a bare pretraining state dict (official without args)
        state = official.from_official(state_of(found, use_ema))
        if kind == "mim" and "mask_token" not in state:
            raise CheckpointError(
                f"'{path}' is not a BEiT masked-image-modeling model (no mask_token); found keys "
                f"{official.some_keys(state)}"
            )
        try:
            infer = official.mim_kwargs if kind == "mim" else official.classifier_spec
            args = infer(state, records)
        except CheckpointError as err:
            raise CheckpointError(
                f"'{path}': {err}. A non-BEiT model loads from its state dict alone (saved on its "
                "own) with model_name=<timm architecture>"
            ) from None
        names = obj.get("label_names") or records.get("bitrain_label_names")
        legacy = records.get("bitrain_norm_settings")
    args = {k: v for k, v in {**(legacy or {}), **args}.items() if k != "_target_"}
    return Contents(fmt, kind, args, state, names, *_pixels(found, records, where))


def read_hf(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(our state dict, our arguments, config)`` of a Hugging Face folder."""
    state, config, weights = hf.read_folder(folder)
    try:
        return (*hf.from_hf(state, config), config)
    except CheckpointError as err:
        raise CheckpointError(f"'{weights}': {err}") from None


def _records(found: Sniffed) -> tuple[Mapping[str, Any], str]:
    """The mapping a file keeps its records in, and its name for errors."""
    path = found.path
    if found.format == "bitrain":
        return found.obj["hyper_parameters"], f"'{path}' hyper_parameters"
    if found.format == "official":
        return official.plain_args(found.obj.get("args")), f"'{path}' args"
    if found.format == "timm" and path.is_dir():
        return found.obj, f"'{path / 'config.json'}'"
    return {}, f"'{path}'"


def _pixels(
    found: Sniffed, records: Mapping[str, Any], where: str
) -> tuple[EvalPreprocessing | None, Normalization | None]:
    """The evaluation preprocessing and the pixel normalisation a file records (None: none).

    bitrain's own records first; else unilm's ``input_size`` / ``crop_pct`` /
    ``imagenet_default_mean_and_std``, timm's ``pretrained_cfg``, a HF ``preprocessor_config.json``.
    """
    if found.format == "hf":
        file = found.path / "preprocessor_config.json"
        spec = prep.from_processor_config(hf.read_json(file), str(file)) if file.is_file() else None
        return spec, None if spec is None else (spec.mean, spec.std)
    own = "" if found.format == "bitrain" else "bitrain_"
    key, spec, cfg = f"{own}eval_transform", None, records.get("pretrained_cfg") or {}
    if records.get(key) is not None:
        spec = prep.read_record(records[key], f"{where}.{key}")
    elif found.format == "official" and records.get("input_size") is not None:
        spec = prep.from_official_args(records, where)
    elif found.format == "timm" and records:
        if not isinstance(cfg, Mapping):
            raise CheckpointError(f"{where}: pretrained_cfg is a {type(cfg).__name__}, not a dict")
        if cfg.get("input_size"):
            spec = prep.from_timm_cfg(cfg, f"{where} pretrained_cfg")
    if records.get(f"{own}normalization") is not None:
        norm = read_normalization(records[f"{own}normalization"], f"{where}.{own}normalization")
    elif found.format == "bitrain" or records.get(key) is not None:
        norm = None if spec is None else (spec.mean, spec.std)
    elif found.format == "official" and "imagenet_default_mean_and_std" in records:
        norm = prep.official_normalization(records)
    elif found.format == "timm" and cfg.get("mean") is not None and cfg.get("std") is not None:
        norm = read_normalization({k: cfg[k] for k in ("mean", "std")}, f"{where} pretrained_cfg")
    else:
        norm = None
    return spec, norm


def normalization_record(mean: Any, std: Any) -> dict[str, list[float]]:
    """``{"mean": [...], "std": [...]}``, validated."""
    mean_, std_ = read_normalization({"mean": mean, "std": std}, "normalization")
    return {"mean": list(mean_), "std": list(std_)}


def read_normalization(record: Any, where: str) -> Normalization:
    """A ``{"mean", "std"}`` record (1 or 3 finite numbers each, std > 0) as data."""
    if not isinstance(record, Mapping) or set(record) != {"mean", "std"}:
        raise CheckpointError(f"{where}: {record!r} is not a {{mean, std}} record")
    mean = prep.channels(record["mean"], f"{where}: mean")
    std = prep.channels(record["std"], f"{where}: std", positive=True)
    if max(map(abs, mean + std)) > 1e6:
        raise CheckpointError(f"{where}: {record!r} holds values beyond 1e6")
    return mean, std


def recorded_normalization(path: str | os.PathLike) -> Normalization | None:
    """``(mean, std)`` the checkpoint at ``path`` records (read memory-mapped), or None.

    Fine-tuning normalises with it; the released official ``.pth`` files record nothing.
    """
    found = sniff(path, mmap=True)
    return _pixels(found, *_records(found))[1]


def _build(got: Contents, where: str) -> torch.nn.Module:
    """``BeitMIM(**spec)`` or ``create_classifier(**spec)``, with the weights loaded strictly.

    A spec is data that chooses no code and no file: plain values (no ``${...}`` interpolation);
    a classifier's names a registered timm architecture (no ``hf-hub:`` name, which would fetch a
    config) and no argument that makes timm load weights.
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

    skip = ("_target_", "pretrained", "pretrained_strict")
    spec = {str(k): plain(v, str(k)) for k, v in got.spec.items() if k not in skip}
    build: Any = BeitMIM
    if got.kind == "classifier":
        build, name = create_classifier, spec.get("model_name")
        if not isinstance(name, str) or ":" in name or not timm.is_model(name):
            raise CheckpointError(f"{where}: model_name {name!r} is not a timm architecture")
        if loaders := sorted(_LOADER_ARGS & spec.keys()):
            raise CheckpointError(f"{where}: model arguments {loaders} would load other weights")
        if spec.get("num_classes") is None:
            spec["num_classes"] = _head_classes(got.state, where)
    what = f"{build.__name__}({spec})"
    try:
        model = build(**spec)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{where}: cannot build {what}: {err}") from None
    state = {k.removeprefix("module."): v for k, v in got.state.items()}
    try:
        model.load_state_dict(
            {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
        )
    except RuntimeError as err:
        hint = " Check model_name and the other arguments against the checkpoint."
        hint = hint if got.format in ("timm", "official") and got.kind == "classifier" else ""
        raise CheckpointError(f"{where} does not fit {what}: {err}{hint}") from None
    return model


def _head_classes(state: Mapping[str, torch.Tensor], where: str) -> int:
    for key in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight"):
        if key in state:
            return int(state[key].shape[0])
    raise CheckpointError(
        f"{where}: no classification head (head.weight / head.fc.weight) to read num_classes "
        "from; pass num_classes"
    )


# --- pretraining (MIM) models ---------------------------------------------------------------------


def load_mim_model(
    path_or_dir: str | os.PathLike | Sniffed, map_location: str | torch.device = "cpu"
) -> BeitMIM:
    """A :class:`BeitMIM` from a bitrain ``.ckpt``, an official ``.pth`` or a HF folder (strict).

    It carries ``bitrain_source_format`` and ``bitrain_normalization`` (the recorded
    ``(mean, std)``, else None).

    Raises:
        FileNotFoundError: nothing at ``path_or_dir``.
        CheckpointError: unknown format, unsafe file, wrong model, or mismatched weights.
    """
    found = path_or_dir if isinstance(path_or_dir, Sniffed) else sniff(path_or_dir, map_location)
    if found.kind != "mim":
        keys = found.obj.get("architectures") if found.format == "hf" else None
        raise CheckpointError(
            f"'{found.path}' is not a BEiT masked-image-modeling model (a {found.format} "
            f"{found.kind} checkpoint: no lm_head.weight); found "
            f"{keys or official.some_keys(state_of(found))}"
        )
    got = read(found)
    model = _build(got, f"{got.format} checkpoint '{found.path}'")
    model.bitrain_source_format, model.bitrain_normalization = got.format, got.normalization
    return model.to(map_location)


def save_mim_model(
    model: BeitMIM,
    path: str | os.PathLike,
    format: str = "bitrain",
    normalization: Normalization | None = None,
) -> Path:
    """Save ``model`` as ``format`` (one of :data:`FORMATS`); returns the path.

    ``normalization`` (default: ``model.bitrain_normalization``) is recorded in every format:
    ``hyper_parameters["normalization"]``, the official ``args``, a HF ``preprocessor_config.json``
    (a ``BeitImageProcessor`` resizing to the model's size, as the Hub's BEiT pretraining folders).
    """
    if normalization is None:
        normalization = getattr(model, "bitrain_normalization", None)
    record = None if normalization is None else normalization_record(*normalization)
    if format == "hf":
        state, config = hf.to_hf(model)
        if record is None:
            return hf.write_folder(path, state, config)
        size = int(model.model_kwargs["img_size"])
        spec = EvalPreprocessing(("exact", size, size), "bicubic", None, *record.values())
        processor = {"image_processor_type": "BeitImageProcessor", **spec.to_processor_config()}
        return hf.write_folder(path, state, config, preprocessor_config=processor)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if format == "bitrain":
        obj = _bitrain_file({"_target_": BEIT_MIM_TARGET, **model.model_kwargs}, state, record)
    elif format == "official":
        obj = {"model": official.to_official(state), "args": official.mim_args(model, record)}
    else:
        raise ValueError(f"unknown checkpoint format {format!r}; choose one of {FORMATS}")
    return atomic_save(obj, path)


def _bitrain_file(
    model: dict[str, Any], state: Mapping, normalization: Any = None, eval_transform: Any = None
) -> dict[str, Any]:
    """A bitrain ``.ckpt`` holding the model only (the layout the training runs write)."""
    records = {"normalization": normalization, "eval_transform": eval_transform}
    hparams = {"model": model, **{k: v for k, v in records.items() if v is not None}}
    return {"state_dict": {f"model.{k}": v for k, v in state.items()}, "hyper_parameters": hparams}


# --- classifiers ----------------------------------------------------------------------------------


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
    ``bitrain_eval_transform`` (the recorded preprocessing, or None), which its timm
    ``pretrained_cfg`` also says wherever timm's fields can.

    Raises:
        FileNotFoundError: nothing at the path.
        CheckpointError: an unknown layout, a pretraining or head-less checkpoint, a bare state
            dict without ``model_name``, a record that names code, or weights that do not fit.
        ValueError: ``spec`` without ``model_name``, or either for a checkpoint that names its own
            architecture.
    """
    found = path_or_dir if isinstance(path_or_dir, Sniffed) else sniff(path_or_dir)
    path, fmt = found.path, found.format
    if spec and model_name is None:
        raise ValueError(
            f"load_classifier: {sorted(spec)} given without model_name; pass model_name=<timm "
            "architecture> with the other create_classifier arguments"
        )
    if found.kind == "mim":
        raise CheckpointError(
            f"'{path}' is a pretraining (MIM) checkpoint ({fmt}), not a classifier: "
            + _FINETUNE.format(path)
        )
    if found.kind == "backbone":
        raise CheckpointError(
            f"Hugging Face folder '{path}' holds a head-less "
            f"{', '.join(map(str, found.obj.get('architectures') or []))}, not a classifier: "
            + _FINETUNE.format(path)
        )
    if model_name is not None and (fmt != "timm" or path.is_dir()):
        raise ValueError(
            f"'{path}' is a {fmt} checkpoint that names its own architecture; model_name and "
            "spec are only for bare state dicts"
        )
    got = read(found, use_ema, model_name, **spec)
    where = f"{fmt} checkpoint '{path}'"
    model = _build(got, where)
    model.label_names = hf.label_list(got.label_names, where, model.bitrain_spec["num_classes"])
    model.bitrain_source_format, model.bitrain_eval_transform = fmt, got.eval_transform
    # timm's own metadata says the same, so resolve_input_data_config(model) agrees where it can
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if got.eval_transform is not None:
        cfg.update(got.eval_transform.to_timm_cfg(model.bitrain_spec.get("in_chans", 3)) or {})
    if model.label_names is not None:
        cfg["label_names"] = list(model.label_names)
    model.pretrained_cfg = cfg
    return model.to(map_location).eval()


def save_classifier(
    model: torch.nn.Module,
    path: str | os.PathLike,
    format: str = "bitrain",
    label_names: list[str] | None = None,
    eval_transform: EvalPreprocessing | Mapping[str, Any] | None = None,
) -> Path:
    """Write a timm classifier in one of :data:`CLASSIFIER_FORMATS`; returns the path written.

    ``official`` holds BEiT only, ``hf`` BEiT / ViT / BiT. ``label_names`` default to
    ``model.label_names``, ``eval_transform`` (a spec or its record) to
    ``model.bitrain_eval_transform``; a timm or HF folder without one gets timm's data config.

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
        eval_transform = prep.read_record(eval_transform, "save_classifier(eval_transform=...)")
    node: EvalPreprocessing | None = eval_transform
    if format == "hf":
        return _save_hf(model, path, label_names, node)
    spec = getattr(model, "bitrain_spec", None)
    if not isinstance(spec, Mapping) or "model_name" not in spec:
        raise CheckpointError(
            f"save_classifier: the {type(model).__name__} has no bitrain_spec (the "
            "create_classifier arguments that rebuild it); build it with create_classifier or "
            "load_classifier"
        )
    spec = plain_tree(
        {k: v for k, v in spec.items() if k not in ("pretrained", "pretrained_strict")}
    )
    spec["num_classes"] = int(spec["num_classes"])
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    record = None if node is None else node.to_record()
    if format == "timm":
        return _save_timm(model, path, spec, state, label_names, node)
    if format == "bitrain":
        obj = _bitrain_file({"_target_": CLASSIFIER_TARGET, **spec}, state, eval_transform=record)
        return atomic_save({**obj, "label_names": label_names}, path)
    if not isinstance(model, timm.models.beit.Beit):
        raise CheckpointError(
            f"the official unilm layout holds BEiT classifiers only; this is a "
            f"{type(model).__name__}: export it as 'timm' or 'hf' instead"
        )
    args = official.classifier_args(model, spec, node)
    return atomic_save(
        {"model": official.to_official(state), "args": args, "label_names": label_names}, path
    )


def _save_timm(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    spec: dict[str, Any],
    state: Mapping[str, torch.Tensor],
    label_names: list[str] | None,
    node: EvalPreprocessing | None,
) -> Path:
    """A timm hub folder, ``config.json`` by timm's ``save_config_for_hf`` (+ bitrain's records)."""
    records = {"label_names": label_names, "bitrain_spec": spec}
    if node is not None:
        records["bitrain_eval_transform"] = node.to_record()
    data = None if node is None else node.to_timm_cfg(int(spec.get("in_chans", 3)))
    with tempfile.TemporaryDirectory() as tmp:
        model_config = {k: v for k, v in records.items() if v is not None}
        save_config_for_hf(model, f"{tmp}/config.json", model_config, data_config=data)
        config = hf.read_json(Path(tmp) / "config.json")
    for key in ("tag", "license"):  # of timm's published weights for the name, not these
        config["pretrained_cfg"].pop(key, None)
    return hf.write_folder(folder, state, config)


def _save_hf(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    label_names: list[str] | None,
    node: EvalPreprocessing | None,
) -> Path:
    """A HF classifier folder with ``preprocessor_config.json`` (``size`` always a dict)."""
    state, config = hf.to_hf(model, label_names)
    if node is None:  # timm's evaluation transform for the model as it is now
        try:
            node = prep.from_timm_cfg(resolve_input_data_config(model), "timm data config")
        except CheckpointError as err:
            log.warning("no preprocessing written for the export: %s", err)
            return hf.write_folder(folder, state, config)
    processor = node.to_processor_config()
    family = type(model).__name__
    exact = "height" in processor.get("size", {})
    kind = "BitImageProcessor"  # shortest-edge resize + centre crop (timm's eval transform)
    if family == "Beit" and exact:
        kind = "BeitImageProcessor"
    elif family == "VisionTransformer" and exact and not processor["do_center_crop"]:
        kind = "ViTImageProcessor"
    processor["image_processor_type"] = kind
    return hf.write_folder(folder, state, config, preprocessor_config=processor)
