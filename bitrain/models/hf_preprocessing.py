"""Evaluation transforms <-> Hugging Face image-processor configs (``preprocessor_config.json``).

An exported classifier carries its evaluation preprocessing: :func:`processor_config_from_transform`
turns the torchvision transform a fine-tuning run evaluated with into image-processor settings,
:func:`transform_from_processor_config` rebuilds the torchvision transform from a Hugging Face
folder's config, and :func:`processor_transform_node` wraps it as the Hydra node that
``python -m bitrain.predict`` and ``bitrain.evaluate`` instantiate (docs/checkpoints.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from bitrain.io import CheckpointError


def plain_tree(value: Any) -> Any:
    """Plain dicts / lists of a (possibly OmegaConf) tree, for ``weights_only`` files and JSON.

    Unlike :func:`bitrain.tasks.common.plain` (an OmegaConf node -> containers, for
    hyper-parameters), it also walks plain mappings holding config nodes, turns tuples into lists
    and keys into strings.
    """
    if isinstance(value, Mapping):
        return {str(k): plain_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "ListConfig":
        return [plain_tree(v) for v in value]
    return value


# PIL resampling filters (HF's "resample") <-> torchvision interpolation names.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def processor_config_from_transform(transform: Any) -> dict[str, Any]:
    """HF image-processor settings equal to a torchvision evaluation transform.

    Understands ``Compose([Resize, CenterCrop, ToTensor, Normalize])`` in that order (each
    optional but the tensor conversion), which is what ``timm.data.create_transform(...,
    is_training=False)`` builds for the ``center`` and ``squash`` crop modes.

    Returns:
        ``do_resize``, ``size`` (``{"shortest_edge": n}`` or ``{"height", "width"}``),
        ``resample`` (PIL filter number), ``do_center_crop``, ``crop_size``, ``do_rescale``,
        ``rescale_factor``, ``do_normalize``, ``image_mean``, ``image_std``,
        ``do_convert_rgb``.

    Raises:
        ValueError: a step an image processor cannot express (e.g. ``ResizeKeepRatio``).
    """
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", [transform]))
    out: dict[str, Any] = {
        "do_resize": False,
        "size": {},
        "resample": 3,
        "do_center_crop": False,
        "crop_size": {},
        "do_rescale": False,
        "rescale_factor": 1 / 255,
        "do_normalize": False,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
        "do_convert_rgb": True,
    }
    order = {"resize": 0, "crop": 1, "tensor": 2, "normalize": 3}
    last = -1
    for step in steps:
        if isinstance(step, T.Resize):
            kind = "resize"
            if step.max_size is not None:
                raise ValueError("Resize with max_size has no image-processor equivalent")
            size = step.size
            if isinstance(size, int) or len(size) == 1:
                out["size"] = {"shortest_edge": int(size if isinstance(size, int) else size[0])}
            else:
                out["size"] = {"height": int(size[0]), "width": int(size[1])}
            names = {v: k for k, v in RESAMPLE_NAMES.items()}
            mode = getattr(step.interpolation, "value", str(step.interpolation))
            if mode not in names:
                raise ValueError(f"interpolation {mode!r} has no PIL resampling filter")
            out.update(do_resize=True, resample=names[mode])
        elif isinstance(step, T.CenterCrop):
            kind = "crop"
            h, w = (step.size, step.size) if isinstance(step.size, int) else step.size
            out.update(do_center_crop=True, crop_size={"height": int(h), "width": int(w)})
        elif isinstance(step, T.ToTensor) or type(step).__name__ in ("MaybeToTensor", "ToTensor"):
            kind = "tensor"
            out.update(do_rescale=True, rescale_factor=1 / 255)
        elif isinstance(step, T.Normalize):
            kind = "normalize"
            mean, std = _floats(step.mean), _floats(step.std)
            out.update(do_normalize=True, image_mean=mean, image_std=std)
        else:
            raise ValueError(
                f"the evaluation transform has a {type(step).__name__} step, which a Hugging "
                "Face image processor cannot express"
            )
        if order[kind] <= last:
            raise ValueError(f"the evaluation transform has {type(step).__name__} out of order")
        last = order[kind]
    if not out["do_rescale"]:
        raise ValueError("the evaluation transform does not convert the image to a tensor")
    return out


def _floats(values: Any) -> list[float]:
    if isinstance(values, torch.Tensor):
        return [float(v) for v in values.flatten().tolist()]
    if isinstance(values, int | float):
        return [float(values)] * 3
    return [float(v) for v in values]


# Defaults of the HF image processors for keys a config leaves out.
_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "BeitImageProcessor": {
        "do_resize": True,
        "size": {"height": 256, "width": 256},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    },
    "ViTImageProcessor": {
        "do_resize": True,
        "size": {"height": 224, "width": 224},
        "resample": 2,
        "do_center_crop": False,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    },
    "BitImageProcessor": {
        "do_resize": True,
        "size": {"shortest_edge": 224},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    },
}


def transform_from_processor_config(config: Mapping[str, Any]) -> Any:
    """A torchvision transform equal to a HF image processor's ``preprocessor_config.json``.

    ``Resize`` (shortest edge, or height x width) with the PIL filter of ``resample``,
    ``CenterCrop``, ``ToTensor`` and ``Normalize`` (a ``rescale_factor`` other than 1/255 is
    folded into the normalisation). Keys the config leaves out take the defaults of its
    ``image_processor_type`` (BEiT, ViT, BiT; else BiT's).

    Raises:
        CheckpointError: a resize an image processor config can say but this cannot rebuild
            (``longest_edge`` only).
    """
    from torchvision import transforms as T

    config = plain_tree(config)
    kind = str(config.get("image_processor_type", "")).removesuffix("Fast")
    if kind.endswith("ImageProcessorFast"):
        kind = kind.removesuffix("Fast")
    cfg = {
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        **_PROCESSOR_DEFAULTS.get(kind, _PROCESSOR_DEFAULTS["BitImageProcessor"]),
        **config,
    }
    steps: list[Any] = []
    if cfg.get("do_resize"):
        size = cfg["size"]
        mode = T.InterpolationMode(RESAMPLE_NAMES.get(int(cfg.get("resample", 3)), "bicubic"))
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if "shortest_edge" in size:
            steps.append(T.Resize(int(size["shortest_edge"]), interpolation=mode))
        elif "height" in size and "width" in size:
            steps.append(T.Resize((int(size["height"]), int(size["width"])), interpolation=mode))
        else:
            raise CheckpointError(
                f"preprocessor_config.json size={size}: only shortest_edge or height/width "
                "resizes are supported"
            )
    if cfg.get("do_center_crop"):
        crop = cfg.get("crop_size") or {}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        steps.append(T.CenterCrop((int(crop["height"]), int(crop["width"]))))
    steps.append(T.ToTensor())
    scale = float(cfg["rescale_factor"]) * 255 if cfg.get("do_rescale") else 1.0
    if cfg.get("do_normalize"):
        mean, std = _floats(cfg["image_mean"]), _floats(cfg["image_std"])
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    if cfg.get("do_normalize") or scale != 1.0:
        steps.append(T.Normalize([m / scale for m in mean], [s / scale for s in std]))
    return T.Compose(steps)


def processor_transform_node(config: Mapping[str, Any]) -> dict[str, Any]:
    """The Hydra node of :func:`transform_from_processor_config` for ``config``."""
    return {
        "_target_": f"{__name__}.transform_from_processor_config",
        "_convert_": "all",
        "config": plain_tree(config),
    }
