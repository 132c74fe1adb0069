"""A classifier's evaluation preprocessing as data: a small validated spec, one known builder.

Checkpoints come from strangers, so their preprocessing is never code (nothing from a file reaches
``instantiate`` or ``importlib``) but an :class:`EvalPreprocessing`, checked when built and built
only into torchvision's ``Resize -> CenterCrop -> ToTensor -> Normalize``. Each reader follows the
library that wrote the record: timm (``timm/data/transforms_factory.py:transforms_imagenet_eval``),
transformers' image processors (``get_size_dict``, each class's defaults), unilm
(``beit/datasets.py:build_transform``, commit 03380c8), a user's own ``Compose``, bitrain's record
(or an older bitrain's Hydra node, read as data).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from bitrain.io import CheckpointError

RECORD_FORMAT, RECORD_VERSION = "bitrain.eval_preprocessing", 1
# torchvision's interpolation names, indexed by PIL's filter number (Hugging Face's "resample").
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
    """Resize -> centre crop -> to tensor in [0, 1] -> normalise; checked when built."""

    resize: tuple[Any, ...] | None  # ("shortest_edge", n) or ("exact", height, width)
    interpolation: str  # of the resize, one of INTERPOLATIONS
    crop: tuple[int, int] | None  # the centre crop (height, width); any box _size reads
    mean: tuple[float, ...]  # per channel, of the [0, 1] tensor
    std: tuple[float, ...]
    # An odd margin's offset: rounded half to even (torchvision's CenterCrop) or floored
    # (transformers' center_crop).
    crop_offset: str = "round"

    def __post_init__(self) -> None:
        where, store = "evaluation preprocessing", partial(object.__setattr__, self)
        if self.resize is not None:
            kind, *sides = self.resize if _is_seq(self.resize) else [None]
            if len(sides) != len(_SIZE_KEYS.get(str(kind), "?")):
                raise CheckpointError(f"{where}: resize {self.resize!r} is not understood")
            store("resize", (kind, *(_side(s, f"{where}: resize") for s in sides)))
        if self.crop is not None:
            store("crop", _size(self.crop, f"{where}: crop", box=True)[1:])
        for name, known in (("interpolation", INTERPOLATIONS), ("crop_offset", ("round", "floor"))):
            if (value := getattr(self, name)) not in known:
                raise CheckpointError(f"{where}: {name} {value!r} is not one of {known}")
        store("mean", channels(self.mean, f"{where}: mean"))
        store("std", channels(self.std, f"{where}: std", positive=True))
        if len(self.mean) != len(self.std):
            raise CheckpointError(f"{where}: {len(self.mean)} means but {len(self.std)} stds")

    def build(self) -> Any:
        """The torchvision transform: PIL image -> normalised float tensor ``[C, H, W]``."""
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
        """The plain-JSON record a checkpoint stores; :func:`read_record` reads it back."""
        record = {"format": RECORD_FORMAT, "version": RECORD_VERSION, **asdict(self)}
        for name, size in (("resize", self.resize), ("crop", self.crop and ("exact", *self.crop))):
            record[name] = size and dict(zip(_SIZE_KEYS[size[0]], size[1:], strict=True))
        return {**record, "mean": list(self.mean), "std": list(self.std)}

    def to_processor_config(self) -> dict[str, Any]:
        """Hugging Face image-processor settings that preprocess the same way.

        Sizes are dicts, read literally by every processor; a step that is off has none
        (transformers refuses an empty one). transformers floors an odd crop margin's offset.
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
        """The ``pretrained_cfg`` data fields timm reads the same way, or None where there are none.

        timm resizes to ``floor(crop / crop_pct)``, the shortest edge (``crop_mode="center"``,
        square crops) or exactly (``"squash"``), and rounds the crop offset.
        """
        if self.resize is None or (self.crop is not None and self.crop_offset != "round"):
            return None
        kind, *resize = self.resize
        if kind == "shortest_edge" and (self.crop is None or self.crop[0] != self.crop[1]):
            return None
        height, width = self.crop or resize
        pct = height / resize[0]
        while math.floor(height / pct) < resize[0]:  # the quotient rounded below: an ulp lower
            pct = math.nextafter(pct, 0.0)
        if kind == "exact" and math.floor(width / pct) != resize[1]:
            return None
        return {
            "input_size": [int(in_chans), height, width],
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": pct,
            "crop_mode": "center" if kind == "shortest_edge" else "squash",
        }


@dataclass(frozen=True)
class FloorCenterCrop:
    """Centre crop ``(height, width)``, offset floored (zero padded): transformers' way."""

    size: tuple[int, int]

    def __call__(self, img: Any) -> Any:
        from torchvision.transforms import functional as F

        width, height = F.get_image_size(img)
        top, left = (height - self.size[0]) // 2, (width - self.size[1]) // 2
        return F.crop(img, top, left, *self.size)


def _spec(where: str, *fields: Any, error: type[Exception] = CheckpointError) -> EvalPreprocessing:
    """``EvalPreprocessing(*fields)``, whose error (as an ``error``) names ``where``."""
    try:
        return EvalPreprocessing(*fields)
    except CheckpointError as err:
        raise error(f"{where}: {err}") from None


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
    """A tensor mean/std (torchvision's, timm's) as floats, a float32 as its shortest decimal."""
    if not hasattr(values, "tolist"):
        return values
    import numpy as np

    f32 = str(values.dtype) == "torch.float32"  # 0.485, not 0.48500001430511475
    return [float(str(np.float32(v)) if f32 else v) for v in values.detach().flatten().tolist()]


def _size(value: Any, where: str, square: bool = True, box: bool = False) -> tuple[Any, ...]:
    """A size as transformers' ``get_size_dict`` reads it: ``("exact", h, w)`` or ``(kind, n)``.

    An int is a square (``default_to_square``) or else a shortest edge, a pair is (height, width),
    a dict gives ``height`` and ``width`` or (not for a ``box``) a ``shortest_edge`` alone.
    """
    size = value
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size} if square else {"shortest_edge": size}
    elif _is_seq(size) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    keys = set(size) if isinstance(size, Mapping) else set()
    if {"height", "width"} <= keys:
        return ("exact", _side(size["height"], where), _side(size["width"], where))
    if "shortest_edge" in keys and "longest_edge" not in keys and not box:
        return ("shortest_edge", _side(size["shortest_edge"], where))
    forms = "an int, [h, w], {height, width}" + ("" if box else " or {shortest_edge}")
    raise CheckpointError(f"{where}: {value!r} is not a {'box' if box else 'size'} ({forms})")


def _only(mapping: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        raise CheckpointError(f"{where}: unknown field(s) {unknown}; known: {sorted(allowed)}")


# --- timm: transforms_factory.py ------------------------------------------------------------------
_TIMM_KEYS = {"input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std"}


def from_timm_args(args: Mapping[str, Any], where: str = "timm data config") -> EvalPreprocessing:
    """The evaluation transform timm's ``create_transform(is_training=False, **args)`` builds.

    ``transforms_imagenet_eval``: ``scale = floor(size / crop_pct)`` (default 0.875), then
    ``center`` (default; square sizes) resizes the shortest edge to it, ``squash`` to exactly it,
    and centre-crops ``size``; bilinear, ImageNet's mean/std. ``border`` (it pads) is refused.
    """
    _only(args, _TIMM_KEYS, where)
    size = args.get("input_size")
    if not isinstance(size, int) and not (_is_seq(size) and len(size) in (1, 2, 3)):
        raise CheckpointError(f"{where}: input_size {size!r} is not n, [h, w] or [c, h, w]")
    if _is_seq(size) and len(size) != 2:  # timm's (channels, height, width); [n] is a square
        size = size[1:] if len(size) == 3 else [size[0]] * 2
    _, height, width = _size(size, f"{where}: input_size")
    pct = 0.875 if args.get("crop_pct") is None else args["crop_pct"]
    pct = _number(pct, f"{where}: crop_pct", 0.05, 4.0)
    mode = args.get("crop_mode") or "center"
    if mode != "squash" and (mode != "center" or height != width):
        raise CheckpointError(
            f"{where}: crop_mode={mode!r} with input_size {height}x{width} is not supported "
            "(supported: 'center' with a square size, 'squash')"
        )
    scale = (math.floor(height / pct), math.floor(width / pct))
    resize = ("exact", *scale) if mode == "squash" else ("shortest_edge", scale[0])
    mean, std = args.get("mean", IMAGENET_MEAN), args.get("std", IMAGENET_STD)
    interpolation = args.get("interpolation") or "bilinear"
    return _spec(where, resize, interpolation, (height, width), *map(_tensor_values, (mean, std)))


def from_timm_cfg(cfg: Mapping[str, Any], where: str = "timm pretrained_cfg") -> EvalPreprocessing:
    """:func:`from_timm_args` of a timm ``pretrained_cfg`` or data config (other keys ignored)."""
    return from_timm_args({k: cfg[k] for k in _TIMM_KEYS if cfg.get(k) is not None}, where)


# --- transformers: image processors ---------------------------------------------------------------
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_HALF, _IMAGENET = (INCEPTION_MEAN, INCEPTION_STD), (IMAGENET_MEAN, IMAGENET_STD)
# transformers' defaults per processor class for the keys a config may leave out: whether an
# integer ``size`` is a square (``get_size_dict(default_to_square=...)``), the size, resample,
# whether it centre-crops (224 x 224), (mean, std). As 4.x's ``__init__`` sets them
# (models/{beit,deit}/image_processing_*.py at commit 06053b8); 5.x's agree but for BEiT's, which
# are 4.x's BeitImageProcessorFast's (image_processing_beit_fast.py at 049e3d5). Another *Fast
# class takes its slow class's; any other class BiT's.
_PROCESSORS: dict[str, tuple[Any, ...]] = {
    "BeitImageProcessor": (True, 256, 3, True, _HALF),
    "BeitImageProcessorFast": (True, 224, 3, False, _HALF),
    "ViTImageProcessor": (True, 224, 2, False, _HALF),
    "DeiTImageProcessor": (True, 256, 3, True, _HALF),
    "BitImageProcessor": (False, 224, 3, True, _CLIP),
    "CLIPImageProcessor": (False, 224, 3, True, _CLIP),
}


def from_processor_config(
    config: Mapping[str, Any], where: str = "preprocessor_config.json"
) -> EvalPreprocessing:
    """What a Hugging Face image processor with this config does to an RGB image.

    Keys left out take the class's defaults (:data:`_PROCESSORS`); a ``rescale_factor`` other than
    1/255 folds into mean/std; a ``longest_edge`` is refused.
    """
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where} holds a {type(config).__name__}, not a JSON object")
    name = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
    name = name.replace("FeatureExtractor", "ImageProcessor")
    name = name if name in _PROCESSORS else name.removesuffix("Fast")
    defaults = _PROCESSORS.get(name, _PROCESSORS["BitImageProcessor"])
    square, size, resample, crop, (mean, std) = defaults
    cfg = {
        "do_resize": True,
        "size": size,
        "resample": resample,
        "do_center_crop": crop,
        "crop_size": 224 if crop else None,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        **config,
    }
    resample = cfg["resample"]
    if isinstance(resample, bool) or resample not in range(len(INTERPOLATIONS)):  # a list too
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
    resize = _size(cfg["size"], f"{where}: size", square) if cfg["do_resize"] else None
    crop = cfg["do_center_crop"] and _size(cfg["crop_size"], f"{where}: crop_size", box=True)[1:]
    mean, std = (tuple(v / scale for v in values) for values in (mean, std))
    return _spec(where, resize, INTERPOLATIONS[int(resample)], crop or None, mean, std, "floor")


# --- unilm BEiT, and a user's own transform -------------------------------------------------------
def official_normalization(args: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """An official run's mean/std: ImageNet's if ``--imagenet_default_mean_and_std``, else 0.5."""
    return _IMAGENET if args.get("imagenet_default_mean_and_std") else _HALF


def from_official_args(args: Mapping[str, Any], where: str = "official args") -> EvalPreprocessing:
    """The evaluation transform ``run_class_finetuning.py`` built from these ``args``.

    ``beit/datasets.py:build_transform(is_train=False)``: above 32 pixels ``Resize(int(input_size
    / crop_pct), interpolation=3)`` (bicubic, shortest edge; ``crop_pct`` 224/256 below 384, else
    1, unless set), ``CenterCrop(input_size)``; then ``ToTensor``, :func:`official_normalization`.
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


def from_transform(transform: Any) -> EvalPreprocessing:
    """The spec of a user's own (trusted) ``Compose([Resize, CenterCrop, ToTensor, Normalize])``.

    As timm's evaluation ``create_transform`` builds them; any other step, order, or no
    ``ToTensor`` is a ValueError.
    """
    from torchvision import transforms as T

    resize, crop, interpolation, offset = None, None, "bicubic", "round"
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    seen: list[int] = []  # the steps' places in resize -> crop -> to tensor -> normalise
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, T.Resize):
            place, size = 0, [step.size] if isinstance(step.size, int) else list(step.size)
            if step.max_size is not None:
                raise ValueError("Resize with max_size is not supported for evaluation")
            resize = ("shortest_edge" if len(size) == 1 else "exact", *map(int, size))
            interpolation = str(getattr(step.interpolation, "value", step.interpolation))
        elif isinstance(step, T.CenterCrop | FloorCenterCrop):
            place, crop = 1, step.size
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
    """The spec a file records (errors name ``where``): bitrain's record, or an older node.

    Nothing in it is imported, called or interpolated: an older bitrain's Hydra node is read only
    when its ``_target_`` is one of the builders bitrain wrote (timm's ``create_transform``, the
    processor-config reader), with plain values. Sizes must be the dicts ``to_record`` writes.
    """
    if not isinstance(record, Mapping):
        kind = type(record).__name__
        raise CheckpointError(f"{where}: the evaluation preprocessing is a {kind}, not a record")
    target = record.get("_target_")
    if target in _LEGACY_TIMM:
        _only(record, {"_target_", "_convert_", "is_training", *_TIMM_KEYS}, where)
        if record.get("is_training", False) is not False:
            raise CheckpointError(f"{where}: a training transform is not an evaluation transform")
        return from_timm_args({k: v for k, v in record.items() if k in _TIMM_KEYS}, where)
    if target in _LEGACY_PROCESSOR:
        _only(record, {"_target_", "_convert_", "config"}, where)
        return from_processor_config(record.get("config"), where)
    if "_target_" in record:
        raise CheckpointError(
            f"{where}: the evaluation preprocessing names code to run ({target!r}); bitrain never "
            "runs code a file names, so it refused this file (not bitrain's, or tampered with)"
        )
    found = (record.get("format"), record.get("version"))
    if found != (RECORD_FORMAT, RECORD_VERSION):
        raise CheckpointError(
            f"{where}: evaluation preprocessing {found[0]!r} version {found[1]!r} is not "
            f"{RECORD_FORMAT!r} version {RECORD_VERSION} (for a newer version, upgrade bitrain)"
        )
    _only(record, {*EvalPreprocessing.__dataclass_fields__, "format", "version"}, where)
    fields = {k: record.get(k) for k in ("resize", "interpolation", "crop", "mean", "std")}
    if fields["resize"] is not None:  # the spec reads a crop's dict itself, not a resize's
        fields["resize"] = _size(fields["resize"], f"{where}: resize")
    spec = _spec(where, *fields.values(), record.get("crop_offset", "round"))
    written = spec.to_record()
    for name in ("resize", "crop"):  # the one inverse: a size is the dict to_record writes
        if written[name] != record.get(name):
            raise CheckpointError(f"{where}: {name} {record.get(name)!r} should be {written[name]}")
    return spec
