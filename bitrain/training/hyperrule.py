"""BiT-HyperRule (Kolesnikov et al. 2020, section 3.3; big_transfer ``bit_hyperrule.py``).

Transfer settings chosen from the downstream training set alone:

* schedule: < 20k images: 500 steps; < 500k: 10k steps; else 20k steps. The first 100 / 500 / 500
  steps warm up linearly; the lr is multiplied by 0.1 at the next three anchors
  (200, 300, 400 of 500; 3k, 6k, 9k of 10k; 6k, 12k, 18k of 20k);
* resolution: images smaller than 96 x 96 pixels are resized to 160 and cropped to 128, larger
  ones resized to 512 and cropped to 480 (``bit_hyperrule.get_resolution``). The resize is a
  squash to a square (``Resize((512, 512))``), the training crop a random window of it, and
  evaluation squashes the whole image to the crop size with no centre crop (``Resize((480, 480))``,
  big_transfer ``bit_pytorch/train.py`` ``mktrainval``);
* Mixup with alpha 0.1 from 20k images on, none below.

:func:`apply_hyperrule` writes these into a composed fine-tuning config (``trainer.max_steps``,
``optim.warmup_steps`` / ``milestones`` / ``schedule``, ``model.img_size``, the transforms'
``input_size`` and the training transform's ``resize_size``, ``mixup.mixup_alpha``) when the
config says ``hyperrule: true``, and logs the derivation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import hydra
from omegaconf import DictConfig, open_dict

__all__ = ["HyperRule", "apply_hyperrule", "hyperrule"]

log = logging.getLogger(__name__)

_BIT_TRANSFORM = "bitrain.data.cls_transforms.squash_random_crop"
_ANCHORS = {
    "small": (100, 200, 300, 400, 500),
    "medium": (500, 3000, 6000, 9000, 10_000),
    "large": (500, 6000, 12_000, 18_000, 20_000),
}


@dataclass(frozen=True)
class HyperRule:
    """The settings BiT-HyperRule picks for a dataset."""

    num_examples: int
    steps: int
    warmup_steps: int
    decay_steps: tuple[int, ...]
    resize: int
    crop: int
    mixup_alpha: float

    def __str__(self) -> str:
        return (
            f"BiT-HyperRule for {self.num_examples} images: {self.steps} steps (warmup "
            f"{self.warmup_steps}, lr x0.1 at {', '.join(map(str, self.decay_steps))}), resize "
            f"{self.resize} / crop {self.crop}, mixup alpha {self.mixup_alpha}"
        )


def hyperrule(num_examples: int, image_size: tuple[int, int]) -> HyperRule:
    """BiT-HyperRule settings for ``num_examples`` training images of ``image_size`` (w, h)."""
    if num_examples < 1:
        raise ValueError(f"BiT-HyperRule needs a non-empty training set, got {num_examples}")
    size = "small" if num_examples < 20_000 else "medium" if num_examples < 500_000 else "large"
    warmup, *decays, steps = _ANCHORS[size]
    small_images = image_size[0] * image_size[1] < 96 * 96
    resize, crop = (160, 128) if small_images else (512, 480)
    return HyperRule(
        num_examples=int(num_examples),
        steps=steps,
        warmup_steps=warmup,
        decay_steps=tuple(decays),
        resize=resize,
        crop=crop,
        mixup_alpha=0.0 if num_examples < 20_000 else 0.1,
    )


def apply_hyperrule(cfg: DictConfig) -> HyperRule | None:
    """Set the run's schedule, resolution and Mixup from its training set (``hyperrule: true``).

    The training source is built once to count it and to read the size of its first image.

    Raises:
        ValueError: the source has no length (a webdataset stream): give a map-style source.
    """
    if not cfg.get("hyperrule"):
        return None
    source = hydra.utils.instantiate(cfg.data.source)
    if not hasattr(source, "__len__"):
        raise ValueError(
            "hyperrule: true needs a training source with a length (an image folder); "
            f"{type(source).__name__} is a stream"
        )
    first = source[0]
    image = first[0] if isinstance(first, tuple) else first
    rule = hyperrule(len(source), image.size)
    target = (cfg.data.get("transform") or {}).get("_target_")
    if target != _BIT_TRANSFORM:
        log.warning(
            "hyperrule: the training transform is %s, not BiT's squash + random crop (%s); "
            "use data=cls/imagenet1k_bit (data.root=... data.num_classes=... for other folders) "
            "for the official BiT-HyperRule pipeline",
            target,
            _BIT_TRANSFORM,
        )
    with open_dict(cfg):
        cfg.trainer.max_steps = rule.steps
        cfg.trainer.max_epochs = None
        cfg.optim.warmup_steps = rule.warmup_steps
        cfg.optim.warmup_epochs = None
        cfg.optim.schedule = "step"
        cfg.optim.milestones = [d / rule.steps for d in rule.decay_steps]
        cfg.model.img_size = rule.crop
        for key in ("transform", "val_transform"):
            if cfg.data.get(key) is not None:
                cfg.data[key].input_size = rule.crop
        if cfg.data.get("transform") is not None and "resize_size" in cfg.data.transform:
            cfg.data.transform.resize_size = rule.resize
        if cfg.get("mixup") is not None:
            cfg.mixup.mixup_alpha = rule.mixup_alpha
    log.info("%s", rule)
    return rule
