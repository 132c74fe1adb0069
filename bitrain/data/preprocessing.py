"""A classifier's evaluation preprocessing as data: a small validated spec, one known builder.

Checkpoints come from strangers, so the record of how their images were preprocessed is never
code (no Hydra ``_target_``, import path or pickle from a file reaches ``instantiate`` or
``importlib``) but an :class:`EvalPreprocessing`: resize (none, shortest edge, exact), PIL filter,
centre crop (offset rounded as torchvision's ``CenterCrop``, or floored as transformers'
``center_crop``), mean/std. :meth:`EvalPreprocessing.build` is the only way it becomes a
transform (torchvision's ``Resize -> CenterCrop -> ToTensor -> Normalize``: timm's evaluation
``create_transform`` for its ``center`` / ``squash`` modes, and a Hugging Face image processor).

Readers, each with the semantics of the library that wrote the record: :func:`from_timm_args`
(``timm/data/transforms_factory.py:transforms_imagenet_eval``), :func:`from_processor_config`
(transformers' ``get_size_dict`` and each processor's defaults), :func:`from_official_args`
(unilm ``beit/datasets.py:build_transform``, commit 03380c8), :func:`from_transform` (a transform
of the user's own, trusted config) and :func:`read_record` (bitrain's record, or an older
bitrain's Hydra node read as data when it names one of the two builders bitrain wrote).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bitrain.io import CheckpointError

__all__ = [
    "EvalPreprocessing",
    "INTERPOLATIONS",
    "RECORD_FORMAT",
    "channels",
    "from_official_args",
    "from_processor_config",
    "from_timm_args",
    "from_timm_cfg",
    "from_transform",
    "read_record",
]

RECORD_FORMAT = "bitrain.eval_preprocessing"
RECORD_VERSION = 1
# PIL resampling filters (Hugging Face's "resample" numbers) <-> torchvision interpolation names.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
INTERPOLATIONS = tuple(RESAMPLE_NAMES.values())
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
_MAX_SIDE = 16384
# The Hydra targets older bitrain versions wrote into checkpoints; read as data, never called.
_LEGACY_TIMM = ("timm.data.create_transform", "timm.data.transforms_factory.create_transform")
_LEGACY_PROCESSOR = (
    "bitrain.models.hf_preprocessing.transform_from_processor_config",
    "bitrain.models.classifier_io.transform_from_processor_config",
)


@dataclass(frozen=True)
class EvalPreprocessing:
    """Resize -> centre crop -> to tensor in [0, 1] -> normalise.

    Attributes:
        resize: ``None``, ``("shortest_edge", n)`` or ``("exact", height, width)``.
        interpolation: the resampling filter of the resize (:data:`INTERPOLATIONS`).
        crop: ``None`` or the centre crop ``(height, width)``.
        mean: per-channel mean subtracted from the [0, 1] tensor.
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
        where = "evaluation preprocessing"
        if self.resize is not None:
            kind, *sizes = self.resize
            if len(sizes) != {"shortest_edge": 1, "exact": 2}.get(str(kind)):
                raise CheckpointError(f"{where}: resize {self.resize!r} is not understood")
            for s in sizes:
                _side(s, f"{where}: resize")
        if self.interpolation not in INTERPOLATIONS:
            raise CheckpointError(
                f"{where}: interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}"
            )
        if self.crop is not None:
            if len(self.crop) != 2:
                raise CheckpointError(f"{where}: crop {self.crop!r} is not (height, width)")
            for s in self.crop:
                _side(s, f"{where}: crop")
        if self.crop_offset not in ("round", "floor"):
            raise CheckpointError(f"{where}: crop_offset {self.crop_offset!r} is not round | floor")
        channels(self.mean, f"{where}: mean")
        channels(self.std, f"{where}: std", positive=True)
        if len(self.mean) != len(self.std):
            raise CheckpointError(f"{where}: {len(self.mean)} means but {len(self.std)} stds")

    def build(self) -> Any:
        """The torchvision transform (PIL image -> normalised float tensor ``[C, H, W]``)."""
        from torchvision import transforms as T

        steps: list[Any] = []
        if self.resize is not None:
            size = self.resize[1] if self.resize[0] == "shortest_edge" else tuple(self.resize[1:])
            steps.append(T.Resize(size, interpolation=T.InterpolationMode(self.interpolation)))
        if self.crop is not None:
            crop = T.CenterCrop if self.crop_offset == "round" else FloorCenterCrop
            steps.append(crop(tuple(self.crop)))
        return T.Compose([*steps, T.ToTensor(), T.Normalize(list(self.mean), list(self.std))])

    def to_record(self) -> dict[str, Any]:
        """The plain-JSON record a checkpoint stores (read back by :func:`read_record`)."""
        resize = None
        if self.resize is not None:
            resize = (
                {"shortest_edge": int(self.resize[1])}
                if self.resize[0] == "shortest_edge"
                else {"height": int(self.resize[1]), "width": int(self.resize[2])}
            )
        return {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "resize": resize,
            "interpolation": self.interpolation,
            "crop": None if self.crop is None else {"height": self.crop[0], "width": self.crop[1]},
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_offset": self.crop_offset,
        }

    def to_processor_config(self) -> dict[str, Any]:
        """Hugging Face image-processor settings that preprocess the same way.

        ``size`` is a dict, which every processor reads literally; a step that is off has no size
        (transformers refuses an empty one). transformers floors the centre-crop offset: with
        ``crop_offset="round"`` and an odd margin its crop sits one pixel away from ours.
        """
        record = self.to_record()
        config = {
            "do_resize": record["resize"] is not None,
            "size": record["resize"],
            "resample": {v: k for k, v in RESAMPLE_NAMES.items()}[self.interpolation],
            "do_center_crop": self.crop is not None,
            "crop_size": record["crop"],
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }
        return {k: v for k, v in config.items() if v is not None}

    def to_timm_cfg(self, in_chans: int = 3) -> dict[str, Any] | None:
        """The ``pretrained_cfg`` data fields timm reads the same way; None when it has none.

        timm's evaluation resize is ``floor(crop / crop_pct)``: a centre crop after a shortest-edge
        resize is ``crop_mode="center"``, an exact resize (then a crop or none) ``"squash"``.
        """
        if self.resize is None or (self.crop is not None and self.crop_offset != "round"):
            return None
        height, width = self.crop if self.crop is not None else tuple(self.resize[1:3])
        if self.resize[0] == "shortest_edge":
            if self.crop is None or height != width:
                return None
            mode, pct = "center", _crop_pct(height, int(self.resize[1]))
        else:
            mode, pct = "squash", _crop_pct(height, int(self.resize[1]))
            if math.floor(width / pct) != int(self.resize[2]):
                return None
        return {
            "input_size": [int(in_chans), int(height), int(width)],
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


def _crop_pct(crop: int, resize: int) -> float:
    """A ``crop_pct`` with ``floor(crop / crop_pct) == resize`` (timm's evaluation resize rule)."""
    pct = crop / resize
    for _ in range(8):
        if math.floor(crop / pct) >= resize:
            break
        pct = math.nextafter(pct, 0.0)
    return pct


def _side(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_SIDE:
        raise CheckpointError(f"{where}: {value!r} is not an image side in pixels (1..{_MAX_SIDE})")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CheckpointError(f"{where}: {value!r} is not a finite number")
    return float(value)


def channels(values: Any, where: str, positive: bool = False) -> tuple[float, ...]:
    """1 or 3 finite numbers (a number: the same for 3 channels), or a CheckpointError."""
    if isinstance(values, int | float) and not isinstance(values, bool):
        values = [values] * 3
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) not in (1, 3):
        raise CheckpointError(f"{where}: {values!r} is not 1 or 3 numbers")
    out = tuple(_number(v, where) for v in values)
    if positive and min(out) <= 0:
        raise CheckpointError(f"{where}: {values!r} must be positive")
    return out


def _tensor_values(values: Any) -> Any:
    """Plain floats from a tensor (torchvision / timm keep mean and std as tensors).

    A float32 value is read back as the shortest decimal that float32 rounds to it, so the 0.485
    a config said is recorded as 0.485, not 0.48500001430511475.
    """
    if not hasattr(values, "tolist"):
        return values
    import numpy as np

    flat = values.detach().cpu().flatten()
    if str(flat.dtype) == "torch.float32":
        return [float(str(np.float32(v))) for v in flat.tolist()]
    return [float(v) for v in flat.tolist()]


def _size_pair(value: Any, where: str) -> tuple[int, int]:
    """``n`` or ``[n]`` -> (n, n); ``[h, w]`` or ``[c, h, w]`` -> (h, w)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _side(value, where), value
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) in (1, 2, 3):
        sides = [_side(v, where) for v in (value if len(value) != 3 else value[1:])]
        return (sides[0], sides[-1])
    raise CheckpointError(f"{where}: {value!r} is not a size (n, [h, w] or [c, h, w])")


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
    if args.get("input_size") is None:
        raise CheckpointError(f"{where}: no input_size")
    height, width = _size_pair(args["input_size"], f"{where}: input_size")
    pct = 0.875 if args.get("crop_pct") is None else _number(args["crop_pct"], f"{where}: crop_pct")
    if not 0.05 <= pct <= 4.0:
        raise CheckpointError(f"{where}: crop_pct {pct} is outside 0.05..4")
    mode = args.get("crop_mode") or "center"
    interpolation = args.get("interpolation") or "bilinear"
    if interpolation not in INTERPOLATIONS:
        raise CheckpointError(
            f"{where}: interpolation {interpolation!r} is not one of {INTERPOLATIONS}"
        )
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
    return EvalPreprocessing(
        resize=resize,
        interpolation=str(interpolation),
        crop=(height, width),
        mean=channels(_tensor_values(args.get("mean", IMAGENET_MEAN)), f"{where}: mean"),
        std=channels(_tensor_values(args.get("std", IMAGENET_STD)), f"{where}: std", True),
    )


def from_timm_cfg(cfg: Mapping[str, Any], where: str = "timm pretrained_cfg") -> EvalPreprocessing:
    """:func:`from_timm_args` of a timm ``pretrained_cfg`` or data config (other keys ignored)."""
    return from_timm_args({k: cfg[k] for k in _TIMM_KEYS if cfg.get(k) is not None}, where)


# --- Hugging Face image processors ----------------------------------------------------------------

_CLIP = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
_HALF, _IMAGENET = (INCEPTION_MEAN, INCEPTION_STD), (IMAGENET_MEAN, IMAGENET_STD)
# transformers' defaults per processor class for the keys a config may leave out: whether an
# integer ``size`` is a square (``get_size_dict(size, default_to_square=...)``), size, resample,
# a 224 x 224 centre crop or none, mean, std.
_PROCESSORS: dict[str, tuple[Any, ...]] = {
    "BeitImageProcessor": (True, {"height": 256, "width": 256}, 3, True, *_HALF),
    "ViTImageProcessor": (True, {"height": 224, "width": 224}, 2, False, *_HALF),
    "DeiTImageProcessor": (True, {"height": 256, "width": 256}, 3, True, *_IMAGENET),
    "BitImageProcessor": (False, {"shortest_edge": 224}, 3, True, *_CLIP),
    "CLIPImageProcessor": (False, {"shortest_edge": 224}, 3, True, *_CLIP),
}
_PROCESSOR_KEYS = {
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_convert_rgb", "image_processor_type",
    "feature_extractor_type", "processor_class", "do_reduce_labels", "reduce_labels",
    "do_pad", "pad_size", "input_data_format", "data_format", "default_to_square",
}  # fmt: skip


def processor_class(config: Mapping[str, Any]) -> str:
    """The image-processor class a config names (old ``*FeatureExtractor`` names mapped)."""
    name = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
    name = name.removesuffix("Fast")
    if name.endswith("FeatureExtractor"):
        name = name.removesuffix("FeatureExtractor") + "ImageProcessor"
    return name


def _processor_size(value: Any, square: bool, where: str) -> tuple[Any, ...]:
    """Read ``size`` as transformers' ``get_size_dict`` does (an int: square or shortest edge)."""
    if isinstance(value, int) and not isinstance(value, bool):
        side = _side(value, where)
        return ("exact", side, side) if square else ("shortest_edge", side)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return ("exact", _side(value[0], where), _side(value[1], where))
    if isinstance(value, Mapping):
        if "height" in value and "width" in value:
            return ("exact", _side(value["height"], where), _side(value["width"], where))
        if "shortest_edge" in value and "longest_edge" not in value:
            return ("shortest_edge", _side(value["shortest_edge"], where))
    raise CheckpointError(
        f"{where}: {value!r} is not a size bitrain can rebuild (an int, [h, w], "
        "{'height', 'width'} or {'shortest_edge'})"
    )


def from_processor_config(
    config: Mapping[str, Any], where: str = "preprocessor_config.json"
) -> EvalPreprocessing:
    """What a Hugging Face image processor with this config does to an RGB image.

    Keys the config leaves out take its processor class's defaults (BEiT, ViT, DeiT, BiT, CLIP; an
    unknown class: BiT's); a ``rescale_factor`` other than 1/255 folds into the normalisation. A
    ``longest_edge`` resize is a CheckpointError.
    """
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where} holds a {type(config).__name__}, not a JSON object")
    square, size, resample, crop, mean, std = _PROCESSORS.get(
        processor_class(config), _PROCESSORS["BitImageProcessor"]
    )
    cfg: dict[str, Any] = {"do_resize": True, "size": size, "resample": resample}
    cfg.update(do_center_crop=crop, do_rescale=True, rescale_factor=1 / 255, do_normalize=True)
    cfg.update(
        image_mean=mean, image_std=std, crop_size={"height": 224, "width": 224} if crop else None
    )
    cfg.update({k: v for k, v in config.items() if k in _PROCESSOR_KEYS})
    resize = None
    if cfg.get("do_resize"):
        resize = _processor_size(cfg.get("size"), square, f"{where}: size")
    crop_box = None
    if cfg.get("do_center_crop"):
        kind, *sides = _processor_size(cfg.get("crop_size"), True, f"{where}: crop_size")
        if kind != "exact":
            raise CheckpointError(f"{where}: crop_size {cfg.get('crop_size')!r} is not a box")
        crop_box = (sides[0], sides[1])
    resample = cfg.get("resample", 3)
    if isinstance(resample, bool) or resample not in RESAMPLE_NAMES:
        raise CheckpointError(f"{where}: resample {resample!r} is not a PIL filter 0..5")
    scale = 1.0
    if cfg.get("do_rescale"):
        scale = _number(cfg["rescale_factor"], f"{where}: rescale_factor") * 255
    if scale <= 0:
        raise CheckpointError(f"{where}: rescale_factor must be positive")
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if cfg.get("do_normalize"):
        mean = channels(cfg.get("image_mean"), f"{where}: image_mean")
        std = channels(cfg.get("image_std"), f"{where}: image_std", positive=True)
    return EvalPreprocessing(
        resize=resize,
        interpolation=RESAMPLE_NAMES[resample],
        crop=crop_box,
        mean=tuple(m / scale for m in mean),
        std=tuple(s / scale for s in std),
        crop_offset="floor",
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
    size = args.get("input_size")
    if size is None:
        raise CheckpointError(f"{where}: no input_size")
    side = _side(size, f"{where}: input_size")
    mean, std = official_normalization(args)
    if side <= 32:
        return EvalPreprocessing(None, "bicubic", None, mean, std)
    pct = args.get("crop_pct")
    pct = (224 / 256 if side < 384 else 1.0) if pct is None else _number(pct, f"{where}: crop_pct")
    if not 0.05 <= pct <= 4.0:
        raise CheckpointError(f"{where}: crop_pct {pct} is outside 0.05..4")
    return EvalPreprocessing(("shortest_edge", int(side / pct)), "bicubic", (side, side), mean, std)


# --- a torchvision transform of the user's own config ---------------------------------------------


def from_transform(transform: Any) -> EvalPreprocessing:
    """The spec of a user's own (trusted) ``Compose([Resize, CenterCrop, ToTensor, Normalize])``.

    What timm's evaluation ``create_transform`` builds for the ``center`` and ``squash`` modes. A
    step this spec cannot express (e.g. ``ColorJitter``), steps out of order or no ``ToTensor`` are
    a ValueError.
    """
    from torchvision import transforms as T

    resize: tuple[Any, ...] | None = None
    crop: tuple[int, int] | None = None
    interpolation, offset = "bicubic", "round"
    mean: Any = (0.0, 0.0, 0.0)
    std: Any = (1.0, 1.0, 1.0)
    order = ("resize", "crop", "tensor", "normalize")
    seen: list[str] = []
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, T.Resize):
            kind = "resize"
            if step.max_size is not None:
                raise ValueError("Resize with max_size is not supported for evaluation")
            size = [step.size] if isinstance(step.size, int) else list(step.size)
            resize = ("shortest_edge" if len(size) == 1 else "exact", *map(int, size))
            interpolation = str(getattr(step.interpolation, "value", step.interpolation))
            if interpolation not in INTERPOLATIONS:
                raise ValueError(f"interpolation {interpolation!r} has no PIL resampling filter")
        elif isinstance(step, T.CenterCrop | FloorCenterCrop):
            kind = "crop"
            h, w = (step.size, step.size) if isinstance(step.size, int) else step.size
            crop = (int(h), int(w))
            offset = "floor" if isinstance(step, FloorCenterCrop) else "round"
        elif isinstance(step, T.ToTensor) or type(step).__name__ in ("MaybeToTensor", "ToTensor"):
            kind = "tensor"
        elif isinstance(step, T.Normalize):
            kind = "normalize"
            mean, std = _tensor_values(step.mean), _tensor_values(step.std)
        else:
            raise ValueError(
                f"the evaluation transform has a {type(step).__name__} step, which bitrain's "
                "evaluation preprocessing (resize, centre crop, normalise) cannot express"
            )
        if seen and order.index(kind) <= order.index(seen[-1]):
            raise ValueError(f"the evaluation transform has {type(step).__name__} out of order")
        seen.append(kind)
    if "tensor" not in seen:
        raise ValueError("the evaluation transform does not convert the image to a tensor")
    try:
        mean, std = channels(mean, "Normalize mean"), channels(std, "Normalize std", True)
        return EvalPreprocessing(resize, interpolation, crop, mean, std, offset)
    except CheckpointError as err:
        raise ValueError(str(err)) from None


# --- records in files -----------------------------------------------------------------------------


def read_record(record: Any, where: str) -> EvalPreprocessing:
    """The spec a file records: bitrain's record, or an older bitrain's Hydra node read as data.

    Nothing in it is imported, called or interpolated: an older node is accepted only when its
    ``_target_`` is one of the builders bitrain itself wrote (timm's ``create_transform``, the
    processor-config reader) with plain-value arguments.

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
    if record.get("format") != RECORD_FORMAT:
        raise CheckpointError(
            f"{where}: the evaluation preprocessing has format {record.get('format')!r}, "
            f"expected {RECORD_FORMAT!r}"
        )
    if record.get("version") != RECORD_VERSION:
        raise CheckpointError(
            f"{where}: evaluation preprocessing version {record.get('version')!r} is not "
            f"supported (this bitrain reads version {RECORD_VERSION}); upgrade bitrain"
        )
    _only(record, {*EvalPreprocessing.__dataclass_fields__, "format", "version"}, where)
    resize, crop = record.get("resize"), record.get("crop")
    keys = set(resize) if isinstance(resize, Mapping) else None
    if keys == {"shortest_edge"}:
        resize = ("shortest_edge", resize["shortest_edge"])
    elif keys == {"height", "width"}:
        resize = ("exact", resize["height"], resize["width"])
    elif resize is not None:
        raise CheckpointError(f"{where}: resize {resize!r} is not understood")
    if crop is not None:
        if not isinstance(crop, Mapping) or set(crop) != {"height", "width"}:
            raise CheckpointError(f"{where}: crop {crop!r} is not {{height, width}}")
        crop = (crop["height"], crop["width"])
    try:
        return EvalPreprocessing(
            resize=resize,
            interpolation=record.get("interpolation"),
            crop=crop,
            mean=channels(record.get("mean"), f"{where}: mean"),
            std=channels(record.get("std"), f"{where}: std", positive=True),
            crop_offset=record.get("crop_offset", "round"),
        )
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from None


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
