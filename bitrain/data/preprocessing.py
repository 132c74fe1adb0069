"""A classifier's evaluation preprocessing as data: a small validated spec, one known builder.

Checkpoints come from strangers, so how their images were preprocessed is never code (no Hydra
``_target_``, import path or pickle from a file reaches ``instantiate`` or ``importlib``) but an
:class:`EvalPreprocessing` (resize, PIL filter, centre crop, mean/std), checked once when built;
:meth:`~EvalPreprocessing.build` makes it torchvision's ``Resize -> CenterCrop -> ToTensor ->
Normalize``. Readers, each with the semantics of the library that wrote the record: timm's
evaluation ``create_transform`` (``timm/data/transforms_factory.py:transforms_imagenet_eval``),
transformers' image processors (``get_size_dict`` and each class's defaults), unilm's
``beit/datasets.py:build_transform`` (commit 03380c8), a user's own torchvision ``Compose``, and
bitrain's record (or an older bitrain's Hydra node, read as data). One size reader,
:func:`_size`, serves them all; :meth:`~EvalPreprocessing.to_record` writes its inverse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from bitrain.io import CheckpointError

__all__ = [
    "EvalPreprocessing", "INTERPOLATIONS", "RECORD_FORMAT", "channels", "from_official_args",
    "from_processor_config", "from_timm_args", "from_timm_cfg", "from_transform", "read_record",
]  # fmt: skip

RECORD_FORMAT = "bitrain.eval_preprocessing"
RECORD_VERSION = 1
# PIL resampling filters (Hugging Face's "resample" numbers, the index) <-> torchvision's names.
INTERPOLATIONS = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
_MAX_SIDE = 16384
# A resize kind and the keys of its dict in transformers' configs and bitrain's record.
_SIZE_KEYS = {"exact": ("height", "width"), "shortest_edge": ("shortest_edge",)}
# The Hydra targets older bitrain versions wrote into checkpoints; read as data, never called.
_LEGACY_TIMM = ("timm.data.create_transform", "timm.data.transforms_factory.create_transform")
_LEGACY_PROCESSOR = (
    "bitrain.models.hf_preprocessing.transform_from_processor_config",
    "bitrain.models.classifier_io.transform_from_processor_config",
)


@dataclass(frozen=True)
class EvalPreprocessing:
    """Resize -> centre crop -> to tensor in [0, 1] -> normalise; checked when built.

    Attributes:
        resize: ``None``, ``("shortest_edge", n)`` or ``("exact", height, width)``.
        interpolation: the resampling filter of the resize (:data:`INTERPOLATIONS`).
        crop: ``None`` or the centre crop ``(height, width)``.
        mean: per-channel mean subtracted from the [0, 1] tensor (stored as a tuple of floats).
        std: per-channel divisor.
        crop_offset: ``"round"`` (torchvision's ``CenterCrop``: the offset of an odd margin is
            rounded, half to even) or ``"floor"`` (transformers' ``center_crop``: ``margin // 2``).
    """

    resize: tuple[Any, ...] | None
    interpolation: str
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_offset: str = "round"

    def __post_init__(self) -> None:
        where, store = "evaluation preprocessing", partial(object.__setattr__, self)
        if self.resize is not None:
            kind, *sides = self.resize if _is_seq(self.resize) else [None]
            if len(sides) != len(_SIZE_KEYS.get(str(kind), "?")):
                raise CheckpointError(f"{where}: resize {self.resize!r} is not understood")
            store("resize", (kind, *(_side(s, f"{where}: resize") for s in sides)))
        if self.crop is not None:
            if not _is_seq(self.crop) or len(self.crop) != 2:
                raise CheckpointError(f"{where}: crop {self.crop!r} is not (height, width)")
            store("crop", tuple(_side(s, f"{where}: crop") for s in self.crop))
        if self.interpolation not in INTERPOLATIONS:
            raise CheckpointError(
                f"{where}: interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}"
            )
        if self.crop_offset not in ("round", "floor"):
            raise CheckpointError(f"{where}: crop_offset {self.crop_offset!r} is not round | floor")
        store("mean", channels(self.mean, f"{where}: mean"))
        store("std", channels(self.std, f"{where}: std", positive=True))
        if len(self.mean) != len(self.std):
            raise CheckpointError(f"{where}: {len(self.mean)} means but {len(self.std)} stds")

    def build(self) -> Any:
        """The torchvision transform (PIL image -> normalised float tensor ``[C, H, W]``)."""
        from torchvision import transforms as T

        steps: list[Any] = []
        if self.resize is not None:
            size = self.resize[1] if self.resize[0] == "shortest_edge" else self.resize[1:]
            steps.append(T.Resize(size, interpolation=T.InterpolationMode(self.interpolation)))
        if self.crop is not None:
            crop = T.CenterCrop if self.crop_offset == "round" else FloorCenterCrop
            steps.append(crop(self.crop))
        return T.Compose([*steps, T.ToTensor(), T.Normalize(list(self.mean), list(self.std))])

    def to_record(self) -> dict[str, Any]:
        """The plain-JSON record a checkpoint stores (read back by :func:`read_record`)."""
        record = {"format": RECORD_FORMAT, "version": RECORD_VERSION, **asdict(self)}
        for name, size in (("resize", self.resize), ("crop", self.crop and ("exact", *self.crop))):
            record[name] = size and dict(zip(_SIZE_KEYS[size[0]], size[1:], strict=True))
        return {**record, "mean": list(self.mean), "std": list(self.std)}

    def to_processor_config(self) -> dict[str, Any]:
        """Hugging Face image-processor settings that preprocess the same way.

        ``size`` is a dict, which every processor reads literally; a step that is off has no size
        (transformers refuses an empty one). transformers floors the centre-crop offset: with
        ``crop_offset="round"`` and an odd margin its crop sits one pixel away from ours.
        """
        record = self.to_record()
        config = {
            "do_resize": self.resize is not None,
            "size": record["resize"],
            "resample": INTERPOLATIONS.index(self.interpolation),
            "do_center_crop": self.crop is not None,
            "crop_size": record["crop"],
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": record["mean"],
            "image_std": record["std"],
            "do_convert_rgb": True,
        }
        return {k: v for k, v in config.items() if v is not None}

    def to_timm_cfg(self, in_chans: int = 3) -> dict[str, Any] | None:
        """The ``pretrained_cfg`` data fields timm reads the same way; None when it has none.

        timm's evaluation resize is ``floor(crop / crop_pct)``: a square centre crop after a
        shortest-edge resize is ``crop_mode="center"``, an exact resize (then a crop or none)
        ``"squash"``. A floored crop offset, or a shortest edge with no crop, is not timm's.
        """
        if self.resize is None or (self.crop is not None and self.crop_offset != "round"):
            return None
        kind, *resize = self.resize
        if kind == "shortest_edge" and (self.crop is None or self.crop[0] != self.crop[1]):
            return None
        height, width = self.crop or resize
        pct = _crop_pct(height, resize[0])
        if kind == "exact" and math.floor(width / pct) != resize[1]:
            return None
        mode = "center" if kind == "shortest_edge" else "squash"
        return {
            "input_size": [int(in_chans), height, width],
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_mode": mode,
            "crop_pct": pct,
        }


class FloorCenterCrop:
    """Centre crop with the offset floored (zero padded), as transformers' ``center_crop``."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, img: Any) -> Any:
        from torchvision.transforms import functional as F

        width, height = F.get_image_size(img)
        top, left = (height - self.size[0]) // 2, (width - self.size[1]) // 2
        return F.crop(img, top, left, *self.size)

    def __repr__(self) -> str:
        return f"FloorCenterCrop(size={self.size})"


def _spec(where: str, *fields: Any, error: type[Exception] = CheckpointError) -> EvalPreprocessing:
    """``EvalPreprocessing(*fields)``, whose error (as an ``error``) names ``where``."""
    try:
        return EvalPreprocessing(*fields)
    except CheckpointError as err:
        raise error(f"{where}: {err}") from None


def _crop_pct(crop: int, resize: int) -> float:
    """A ``crop_pct`` with ``floor(crop / crop_pct) == resize`` (timm's evaluation resize rule)."""
    pct = crop / resize
    for _ in range(8):
        if math.floor(crop / pct) >= resize:
            break
        pct = math.nextafter(pct, 0.0)
    return pct


def _is_seq(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _side(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_SIDE:
        raise CheckpointError(f"{where}: {value!r} is not an image side in pixels (1..{_MAX_SIDE})")
    return value


def _number(value: Any, where: str, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CheckpointError(f"{where}: {value!r} is not a finite number")
    if not low <= value <= high:
        raise CheckpointError(f"{where} {value} is outside {low:g}..{high:g}")
    return float(value)


def channels(values: Any, where: str, positive: bool = False) -> tuple[float, ...]:
    """1 or 3 finite numbers (a number: the same for 3 channels), or a CheckpointError."""
    if isinstance(values, int | float) and not isinstance(values, bool):
        values = [values] * 3
    if not _is_seq(values) or len(values) not in (1, 3):
        raise CheckpointError(f"{where}: {values!r} is not 1 or 3 numbers")
    out = tuple(_number(v, where) for v in values)
    if positive and min(out) <= 0:
        raise CheckpointError(f"{where}: {values!r} must be positive")
    return out


def _tensor_values(values: Any) -> Any:
    """A tensor's floats (torchvision, timm); float32 as the shortest decimal, 0.485 not 0.48500001."""
    if not hasattr(values, "tolist"):
        return values
    import numpy as np

    flat = values.detach().cpu().flatten()
    if str(flat.dtype) == "torch.float32":
        return [float(str(np.float32(v))) for v in flat.tolist()]
    return [float(v) for v in flat.tolist()]


def _size(value: Any, where: str, square: bool = True) -> tuple[Any, ...]:
    """A size as transformers' ``get_size_dict`` reads it -> ``("exact", h, w)`` / ``(kind, n)``.

    An int is a square (``default_to_square``) or else a shortest edge, a pair is (height, width),
    a dict gives ``height`` and ``width`` or a ``shortest_edge`` (with no ``longest_edge``).
    """
    size = value
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size} if square else {"shortest_edge": size}
    elif _is_seq(size) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if isinstance(size, Mapping) and "height" in size and "width" in size:
        return ("exact", _side(size["height"], where), _side(size["width"], where))
    if isinstance(size, Mapping) and "shortest_edge" in size and "longest_edge" not in size:
        return ("shortest_edge", _side(size["shortest_edge"], where))
    raise CheckpointError(
        f"{where}: {value!r} is not a size bitrain can rebuild (an int, [h, w], "
        "{'height', 'width'} or {'shortest_edge'})"
    )


def _box(value: Any, where: str) -> tuple[int, int]:
    """A crop ``(height, width)`` read by :func:`_size` (an int is a square)."""
    kind, *sides = _size(value, where)
    if kind != "exact":
        raise CheckpointError(f"{where}: {value!r} is not a box (height, width)")
    return sides[0], sides[1]


def _only(mapping: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        raise CheckpointError(f"{where}: unknown field(s) {unknown}; known: {sorted(allowed)}")


# --- timm -----------------------------------------------------------------------------------------

_TIMM_KEYS = {"input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std"}


def from_timm_args(args: Mapping[str, Any], where: str = "timm data config") -> EvalPreprocessing:
    """The evaluation transform timm builds from these data-config values.

    ``create_transform(is_training=False, ...)`` (``transforms_imagenet_eval``): ``scale =
    floor(size / crop_pct)`` (crop_pct 0.875 by default); ``center`` (default) resizes the shortest
    edge to ``scale`` then centre-crops ``size``, ``squash`` resizes to exactly ``scale`` then
    centre-crops. Interpolation defaults to bilinear, mean/std to ImageNet's. A ``border`` mode
    (which pads) or ``center`` with a non-square size is a CheckpointError.
    """
    _only(args, _TIMM_KEYS, where)
    size = args.get("input_size")
    if size is None or isinstance(size, Mapping):
        raise CheckpointError(f"{where}: input_size {size!r} is not n, [h, w] or [c, h, w]")
    if _is_seq(size) and len(size) in (1, 3):  # timm's (channels, height, width); [n] a square
        size = size[1:] if len(size) == 3 else [size[0]] * 2
    _, height, width = _size(size, f"{where}: input_size")
    pct = 0.875 if args.get("crop_pct") is None else args["crop_pct"]
    pct = _number(pct, f"{where}: crop_pct", 0.05, 4.0)
    mode = args.get("crop_mode") or "center"
    scale = (math.floor(height / pct), math.floor(width / pct))
    if mode == "squash":
        resize: tuple[Any, ...] = ("exact", *scale)
    elif mode == "center" and height == width:
        resize = ("shortest_edge", scale[0])
    else:
        raise CheckpointError(
            f"{where}: crop_mode={mode!r} with input_size {height}x{width} is not supported "
            "(supported: 'center' with a square size, 'squash')"
        )
    mean, std = args.get("mean", IMAGENET_MEAN), args.get("std", IMAGENET_STD)
    interpolation = args.get("interpolation") or "bilinear"
    return _spec(where, resize, interpolation, (height, width), *map(_tensor_values, (mean, std)))


def from_timm_cfg(cfg: Mapping[str, Any], where: str = "timm pretrained_cfg") -> EvalPreprocessing:
    """:func:`from_timm_args` of a timm ``pretrained_cfg`` or data config (other keys ignored)."""
    return from_timm_args({k: cfg[k] for k in _TIMM_KEYS if cfg.get(k) is not None}, where)


# --- Hugging Face image processors ----------------------------------------------------------------

_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_HALF, _IMAGENET = (INCEPTION_MEAN, INCEPTION_STD), (IMAGENET_MEAN, IMAGENET_STD)
# transformers' defaults per processor class for the keys a config may leave out: whether an
# integer ``size`` is a square (``get_size_dict(size, default_to_square=...)``), the size,
# resample, whether it centre-crops (224 x 224), (mean, std). Any other class: BiT's.
_PROCESSORS: dict[str, tuple[Any, ...]] = {
    "BeitImageProcessor": (True, 256, 3, True, _HALF),
    "ViTImageProcessor": (True, 224, 2, False, _HALF),
    "DeiTImageProcessor": (True, 256, 3, True, _IMAGENET),
    "BitImageProcessor": (False, 224, 3, True, _CLIP),
    "CLIPImageProcessor": (False, 224, 3, True, _CLIP),
}


def processor_class(config: Mapping[str, Any]) -> str:
    """The image-processor class a config names (old ``*FeatureExtractor`` names mapped)."""
    name = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
    name = name.removesuffix("Fast")
    if name.endswith("FeatureExtractor"):
        name = name.removesuffix("FeatureExtractor") + "ImageProcessor"
    return name


def from_processor_config(
    config: Mapping[str, Any], where: str = "preprocessor_config.json"
) -> EvalPreprocessing:
    """What a Hugging Face image processor with this config does to an RGB image.

    Keys the config leaves out take its processor class's defaults (:data:`_PROCESSORS`); a
    ``rescale_factor`` other than 1/255 folds into the normalisation. A ``longest_edge`` resize is
    a CheckpointError.
    """
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where} holds a {type(config).__name__}, not a JSON object")
    square, size, resample, crop, (mean, std) = _PROCESSORS.get(
        processor_class(config), _PROCESSORS["BitImageProcessor"]
    )
    cfg = {
        "do_resize": True, "size": size, "resample": resample, "do_center_crop": crop,
        "crop_size": 224 if crop else None, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": mean, "image_std": std, **config,
    }  # fmt: skip
    resample = cfg["resample"]
    if isinstance(resample, bool) or resample not in range(len(INTERPOLATIONS)):
        raise CheckpointError(f"{where}: resample {resample!r} is not a PIL filter 0..5")
    scale = 1.0
    if cfg["do_rescale"]:
        scale = _number(cfg["rescale_factor"], f"{where}: rescale_factor") * 255
    if scale <= 0:
        raise CheckpointError(f"{where}: rescale_factor must be positive")
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if cfg["do_normalize"]:
        mean = channels(cfg["image_mean"], f"{where}: image_mean")
        std = channels(cfg["image_std"], f"{where}: image_std", positive=True)
    return _spec(
        where,
        _size(cfg["size"], f"{where}: size", square) if cfg["do_resize"] else None,
        INTERPOLATIONS[int(resample)],
        _box(cfg["crop_size"], f"{where}: crop_size") if cfg["do_center_crop"] else None,
        tuple(m / scale for m in mean),
        tuple(s / scale for s in std),
        "floor",
    )


# --- official unilm args --------------------------------------------------------------------------


def official_normalization(args: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of an official BEiT run (``beit/datasets.py``, unilm commit 03380c8).

    ImageNet's with ``--imagenet_default_mean_and_std``, else the "inception" 0.5 / 0.5.
    """
    if args.get("imagenet_default_mean_and_std"):
        return IMAGENET_MEAN, IMAGENET_STD
    return INCEPTION_MEAN, INCEPTION_STD


def from_official_args(args: Mapping[str, Any], where: str = "official args") -> EvalPreprocessing:
    """The evaluation transform ``run_class_finetuning.py`` built from these ``args``.

    ``beit/datasets.py:build_transform(is_train=False)``: for ``input_size > 32``,
    ``Resize(int(input_size / crop_pct), interpolation=3)`` (bicubic, shortest edge) then
    ``CenterCrop(input_size)``, ``crop_pct`` 224/256 below 384 and 1.0 from 384 unless set; then
    ``ToTensor`` and ``Normalize`` (:func:`official_normalization`). No ``input_size`` is a
    CheckpointError.
    """
    if args.get("input_size") is None:
        raise CheckpointError(f"{where}: no input_size")
    side = _side(args["input_size"], f"{where}: input_size")
    mean, std = official_normalization(args)
    if side <= 32:
        return _spec(where, None, "bicubic", None, mean, std)
    pct = (224 / 256 if side < 384 else 1.0) if args.get("crop_pct") is None else args["crop_pct"]
    pct = _number(pct, f"{where}: crop_pct", 0.05, 4.0)
    return _spec(where, ("shortest_edge", int(side / pct)), "bicubic", (side, side), mean, std)


# --- a torchvision transform of the user's own config ---------------------------------------------


def from_transform(transform: Any) -> EvalPreprocessing:
    """The spec of a user's own (trusted) ``Compose([Resize, CenterCrop, ToTensor, Normalize])``.

    What timm's evaluation ``create_transform`` builds for the ``center`` and ``squash`` modes. A
    step this spec cannot express (e.g. ``ColorJitter``), steps out of order or no ``ToTensor`` are
    a ValueError.
    """
    from torchvision import transforms as T

    resize, crop, interpolation, offset = None, None, "bicubic", "round"
    mean: Any = (0.0, 0.0, 0.0)
    std: Any = (1.0, 1.0, 1.0)
    seen: list[int] = []  # the steps' places in resize -> crop -> to tensor -> normalise
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, T.Resize):
            place, size = 0, [step.size] if isinstance(step.size, int) else list(step.size)
            if step.max_size is not None:
                raise ValueError("Resize with max_size is not supported for evaluation")
            resize = ("shortest_edge" if len(size) == 1 else "exact", *map(int, size))
            interpolation = str(getattr(step.interpolation, "value", step.interpolation))
        elif isinstance(step, T.CenterCrop | FloorCenterCrop):
            place, crop = 1, tuple(step.size) if _is_seq(step.size) else (step.size, step.size)
            offset = "floor" if isinstance(step, FloorCenterCrop) else "round"
        elif isinstance(step, T.ToTensor) or type(step).__name__ in ("MaybeToTensor", "ToTensor"):
            place = 2
        elif isinstance(step, T.Normalize):
            place, mean, std = 3, _tensor_values(step.mean), _tensor_values(step.std)
        else:
            raise ValueError(
                f"the evaluation transform has a {type(step).__name__} step, which bitrain's "
                "evaluation preprocessing (resize, centre crop, normalise) cannot express"
            )
        if seen and place <= seen[-1]:
            raise ValueError(f"the evaluation transform has {type(step).__name__} out of order")
        seen.append(place)
    if 2 not in seen:
        raise ValueError("the evaluation transform does not convert the image to a tensor")
    fields = (resize, interpolation, crop, mean, std, offset)
    return _spec("the evaluation transform", *fields, error=ValueError)


# --- records in files -----------------------------------------------------------------------------


def read_record(record: Any, where: str) -> EvalPreprocessing:
    """The spec a file records: bitrain's record, or an older bitrain's Hydra node read as data.

    Nothing in it is imported, called or interpolated: an older node is accepted only when its
    ``_target_`` is one of the builders bitrain itself wrote (timm's ``create_transform``, the
    processor-config reader) with plain-value arguments. A record's sizes must be the dicts
    :meth:`EvalPreprocessing.to_record` writes.

    Raises:
        CheckpointError: not a record, a target that would run other code, unknown fields, or
            values of the wrong type or range; the message names ``where``.
    """
    if not isinstance(record, Mapping):
        raise CheckpointError(
            f"{where}: the evaluation preprocessing is a {type(record).__name__}, not a record"
        )
    if "_target_" in record:
        return _legacy_node(record, where)
    if (record.get("format"), record.get("version")) != (RECORD_FORMAT, RECORD_VERSION):
        raise CheckpointError(
            f"{where}: the evaluation preprocessing is format {record.get('format')!r} version "
            f"{record.get('version')!r}; this bitrain reads {RECORD_FORMAT!r} version "
            f"{RECORD_VERSION} (upgrade bitrain for a newer version)"
        )
    _only(record, {*EvalPreprocessing.__dataclass_fields__, "format", "version"}, where)
    resize, crop = record.get("resize"), record.get("crop")
    spec = _spec(
        where,
        None if resize is None else _size(resize, f"{where}: resize"),
        record.get("interpolation"),
        None if crop is None else _box(crop, f"{where}: crop"),
        record.get("mean"),
        record.get("std"),
        record.get("crop_offset", "round"),
    )
    written = spec.to_record()
    for name in ("resize", "crop"):  # the one inverse: an int or a list is not a record's size
        if written[name] != record.get(name):
            raise CheckpointError(f"{where}: {name} {record.get(name)!r} is not written as such")
    return spec


def _legacy_node(node: Mapping[str, Any], where: str) -> EvalPreprocessing:
    target = node.get("_target_")
    if target in _LEGACY_TIMM:
        _only(node, {"_target_", "_convert_", "is_training", *_TIMM_KEYS}, where)
        if node.get("is_training", False) is not False:
            raise CheckpointError(f"{where}: a training transform is not an evaluation transform")
        return from_timm_args({k: v for k, v in node.items() if k in _TIMM_KEYS}, where)
    if target in _LEGACY_PROCESSOR:
        _only(node, {"_target_", "_convert_", "config"}, where)
        return from_processor_config(node.get("config"), where)
    raise CheckpointError(
        f"{where}: the evaluation preprocessing names code to run ({target!r}). bitrain reads "
        "preprocessing records as data and never runs code a file names, so this file was "
        "refused; it was not written by bitrain, or it was tampered with"
    )
