"""Image transforms: BEiT's two views of one random crop, and a single view for tokenizer training.

Follows BEiT §2.1 / Table 12 and the official ``beit/datasets.py`` (``DataAugmentationForBEiT``)
with ``beit/transforms.py`` (``RandomResizedCropAndInterpolationWithTwoPic``): ONE crop box and ONE
flip, then the same region resized twice, bicubic for the patch view (224 px, normalized, fed to
the encoder) and Lanczos for the token view (112 px, pixels in [0, 1], fed to the tokenizer).

Colour jitter (paper Table 12: 0.4) is applied once to the cropped region before the two resizes,
so both views see the same colours. The official code jitters the whole image before cropping;
brightness and saturation are per pixel so the order does not matter for them, and contrast uses
the mean grey level of the crop instead of the whole image (a negligible difference that avoids
jittering pixels that are thrown away).

Randomness comes from torch's global RNG (torchvision's ``get_params`` helpers), which each
DataLoader worker seeds from the loader's generator, so a seeded data module is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

__all__ = ["SingleViewTransform", "TwoViewTransform", "interpolation_mode"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}


def interpolation_mode(name: str) -> InterpolationMode:
    """Map a config name ('bicubic', 'lanczos', ...) to torchvision's ``InterpolationMode``."""
    try:
        return _INTERPOLATIONS[str(name).lower()]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {name!r}: use one of {sorted(_INTERPOLATIONS)}"
        ) from None


def _pair(value: float | Sequence[float], name: str) -> tuple[float, float]:
    """A (low, high) pair of floats from a list/tuple (YAML gives lists), checked for order."""
    if isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a pair (low, high), got the single number {value!r}")
    values = tuple(float(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {len(values)} values: {value!r}")
    if values[0] > values[1]:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {values}")
    return values  # type: ignore[return-value]


def _check_crop_args(
    scale: Sequence[float], ratio: Sequence[float], hflip: float
) -> tuple[tuple[float, float], tuple[float, float], float]:
    scale_pair = _pair(scale, "scale")
    ratio_pair = _pair(ratio, "ratio")
    if not 0.0 < scale_pair[0] <= 1.0 or scale_pair[1] > 1.0:
        raise ValueError(f"scale is a fraction of the image area in (0, 1], got {scale_pair}")
    if ratio_pair[0] <= 0.0:
        raise ValueError(f"ratio (crop aspect width/height) must be > 0, got {ratio_pair}")
    if not 0.0 <= float(hflip) <= 1.0:
        raise ValueError(f"hflip is a probability in [0, 1], got {hflip}")
    return scale_pair, ratio_pair, float(hflip)


def _check_size(size: int, name: str) -> int:
    if int(size) != size or int(size) <= 0:
        raise ValueError(f"{name} must be a positive integer number of pixels, got {size!r}")
    return int(size)


def _as_rgb(img: Image.Image, where: str) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(
            f"{where} expects a PIL.Image (sources decode to RGB PIL), got {type(img).__name__}"
        )
    return img if img.mode == "RGB" else img.convert("RGB")


class _RandomCrop:
    """Shared crop-box + flip sampling for both transforms (torch global RNG)."""

    def __init__(self, scale, ratio, hflip):
        self.scale, self.ratio, self.hflip = _check_crop_args(scale, ratio, hflip)

    def sample(self, img: Image.Image) -> tuple[Image.Image, bool]:
        """Crop one random box (RandomResizedCrop's sampling) and draw the flip decision."""
        top, left, height, width = T.RandomResizedCrop.get_params(
            img, scale=list(self.scale), ratio=list(self.ratio)
        )
        crop = img.crop((left, top, left + width, top + height))
        flip = self.hflip > 0 and bool(torch.rand(1).item() < self.hflip)
        return crop, flip


class TwoViewTransform:
    """BEiT's two views of one random crop: ``(images, tokenizer_images)``.

    Args:
        input_size: Side of the patch view fed to the encoder (BEiT: 224).
        second_input_size: Side of the token view fed to the tokenizer (BEiT: 112).
        scale: Range of the crop area as a fraction of the image (RandomResizedCrop).
        ratio: Range of the crop aspect ratio width/height (sampled log-uniformly).
        hflip: Probability of a horizontal flip (the same flip for both views).
        color_jitter: Brightness, contrast and saturation strength (0 disables).
        mean: Per-channel mean of the patch view's normalization.
        std: Per-channel std of the patch view's normalization.
        interpolation: Resampling filter of the patch view.
        second_interpolation: Resampling filter of the token view.
    """

    def __init__(
        self,
        input_size: int = 224,
        second_input_size: int = 112,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float = 0.4,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bicubic",
        second_interpolation: str = "lanczos",
    ) -> None:
        self.input_size = _check_size(input_size, "input_size")
        self.second_input_size = _check_size(second_input_size, "second_input_size")
        self._crop = _RandomCrop(scale, ratio, hflip)
        if float(color_jitter) < 0:
            raise ValueError(f"color_jitter must be >= 0 (0 disables it), got {color_jitter}")
        self.color_jitter = float(color_jitter)
        self._jitter = (
            T.ColorJitter(self.color_jitter, self.color_jitter, self.color_jitter)
            if self.color_jitter > 0
            else None
        )
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std need 3 values each with std > 0, got {mean} / {std}")
        self.interpolation = interpolation_mode(interpolation)
        self.second_interpolation = interpolation_mode(second_interpolation)

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of one crop.

        Args:
            img: An RGB ``PIL.Image`` (other modes are converted to RGB).

        Returns:
            ``images`` [3, input_size, input_size] float32, normalized with ``mean``/``std``, and
            ``tokenizer_images`` [3, second_input_size, second_input_size] float32 in [0, 1].
        """
        crop, flip = self._crop.sample(_as_rgb(img, "TwoViewTransform"))
        if self._jitter is not None:
            crop = self._jitter(crop)
        if flip:
            crop = F.hflip(crop)
        size, second = [self.input_size] * 2, [self.second_input_size] * 2
        patch_view = F.resize(crop, size, interpolation=self.interpolation)
        token_view = F.resize(crop, second, interpolation=self.second_interpolation)
        images = F.normalize(F.to_tensor(patch_view), self.mean, self.std)
        return images, F.to_tensor(token_view)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, "
            f"second_input_size={self.second_input_size}, scale={self._crop.scale}, "
            f"ratio={self._crop.ratio}, hflip={self._crop.hflip}, "
            f"color_jitter={self.color_jitter}, interpolation={self.interpolation.value}, "
            f"second_interpolation={self.second_interpolation.value})"
        )


class SingleViewTransform:
    """One random crop resized to ``size``: pixels in [0, 1] (tokenizer training, fine-tuning).

    Args:
        size: Side of the output in pixels.
        scale: Range of the crop area as a fraction of the image.
        ratio: Range of the crop aspect ratio width/height.
        hflip: Probability of a horizontal flip.
        interpolation: Resampling filter (Lanczos: the tokenizer's view in BEiT).
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        interpolation: str = "lanczos",
    ) -> None:
        self.size = _check_size(size, "size")
        self._crop = _RandomCrop(scale, ratio, hflip)
        self.interpolation = interpolation_mode(interpolation)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Return one augmented view ``[3, size, size]`` float32 in [0, 1]."""
        crop, flip = self._crop.sample(_as_rgb(img, "SingleViewTransform"))
        if flip:
            crop = F.hflip(crop)
        view = F.resize(crop, [self.size, self.size], interpolation=self.interpolation)
        return F.to_tensor(view)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self._crop.scale}, "
            f"ratio={self._crop.ratio}, hflip={self._crop.hflip}, "
            f"interpolation={self.interpolation.value})"
        )
