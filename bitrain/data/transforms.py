"""Image transforms: BEiT's two views of one random crop, and a single view for tokenizer training.

Follows BEiT §2.1 / Table 12 and the official ``beit/datasets.py`` (``DataAugmentationForBEiT``)
with ``beit/transforms.py`` (``RandomResizedCropAndInterpolationWithTwoPic``): ONE crop box and ONE
flip, then the same region resized twice, bicubic for the patch view (224 px, fed to the encoder
after normalisation) and Lanczos for the token view (112 px, fed to the tokenizer), and colour
jitter 0.4 (brightness, contrast, saturation in a random order, as torchvision's ``ColorJitter``)
seen identically by both views.

How :class:`TwoViewTransform` does it fast (docs/data.md, "Fast two views"; the statistics are
tested against the official pipeline in ``tests/unit/data/test_pipeline_statistics.py``):

1. the crop box is drawn from the image's SIZE (torchvision's ``RandomResizedCrop.get_params``),
   before any pixel is decoded; an :class:`~bitrain.data.decode.EncodedImage` is then decoded at
   the smallest JPEG DCT scale (1, 1/2, 1/4, 1/8) at which the crop still has at least
   ``input_size`` pixels on each side, so no view is made from fewer pixels than the full decode
   would give it;
2. the patch view is the crop resized with torch's antialiased bicubic on uint8 (the filter of
   PIL's bicubic, equal to it up to rounding), the token view PIL's Lanczos on the same box
   (a box 3x the view's size or more box-reduced first, PIL's ``reducing_gap`` 1.5);
3. flip and colour jitter run once on the two small views as tensor arithmetic (the jitter's
   factors, order and contrast mean shared by both views), instead of on the whole image
   (official) or the crop;
4. both views leave as uint8 ``[3, H, W]`` (``output_dtype="uint8"``, the default): a quarter of
   the bytes of float32 through the DataLoader's shared memory and the host-to-device copy. The
   jittered views are rounded to 8 bits once (torchvision's ``ColorJitter`` on a PIL image, as
   the official pipeline runs it, rounds after every operation); scaling to [0, 1] and the patch
   view's normalisation with ``mean``/``std`` run on the device, in
   :class:`bitrain.tasks.mim.MaskedImageModeling` (``task.normalization``).
   ``output_dtype="float32"`` returns the float views of before (patch view normalised, token
   view in [0, 1]) for callers that feed them to a model directly.

Jitter after the resize instead of before it differs only where a value is clipped at 0 or 255
(resizing and the three jitter operations are otherwise linear), and contrast uses the mean grey
of the patch view rather than of the whole image.

Randomness comes from torch's global RNG (torchvision's ``get_params`` helpers), which the data
module seeds per sample, so a seeded data module is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from bitrain.data.decode import EncodedImage

__all__ = [
    "OUTPUT_DTYPES",
    "SingleViewTransform",
    "TwoViewTransform",
    "dct_reduction",
    "interpolation_mode",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What TwoViewTransform hands the DataLoader: uint8 pixels (normalised on the device) or floats.
OUTPUT_DTYPES = ("uint8", "float32")

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


# ITU-R 601-2 luma, the grey of PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# Resamplings that torch can do with antialiasing on uint8 (the filters of PIL's resamplings).
_TORCH_MODES = {InterpolationMode.BICUBIC: "bicubic", InterpolationMode.BILINEAR: "bilinear"}


# Lanczos views use PIL's ``reducing_gap``: a box at least 2 x 1.5 = 3 times the output size
# (per axis) is first reduced by the integer factor floor(box / (1.5 x size)) (PIL's ``reduce``,
# a box average), then Lanczos-resampled by the remaining factor of 1.5 or more. ~25% less time
# for the 112-px token view of 500x375 JPEGs; 0.18 grey levels from PIL's exact Lanczos on
# average (docs/data.md, "Fast two views"; tests/unit/data/test_transforms.py).
LANCZOS_REDUCING_GAP = 1.5


def dct_reduction(crop_width: int, crop_height: int, size: int) -> int:
    """Largest JPEG DCT scale 1/r (r in 8, 4, 2, 1) leaving ``size`` pixels across the crop.

    A crop reduced by ``r`` has ``crop / r`` pixels per side; keeping that >= the output ``size``
    on both sides means every view is still made by downsampling, from at least as many pixels as
    it has.
    """
    for r in (8, 4, 2):
        if crop_width >= r * size and crop_height >= r * size:
            return r
    return 1


def _rgbx(img: Image.Image) -> torch.Tensor:
    """An RGB image's pixels as uint8 ``[h, w, 4]``: R, G, B and a padding byte.

    PIL keeps an RGB pixel in 4 bytes; its ``RGBX`` raw mode copies them as they lie, where
    ``np.array(img)`` first packs them to 3 (17 against 10 us on average for BEiT crops of
    256x192 images here), and torch's uint8 resampling runs on 4 channels anyway (the same
    R, G, B out, tested).
    """
    buffer = bytearray(img.tobytes("raw", "RGBX"))  # writable, as torch.frombuffer wants
    return torch.frombuffer(buffer, dtype=torch.uint8).view(img.height, img.width, 4)


def _resized(
    img: Image.Image, box: tuple[float, float, float, float], size: int, mode: InterpolationMode
) -> torch.Tensor:
    """The ``box`` of ``img`` resized to ``size`` x ``size``: uint8 ``[3, size, size]``.

    Bicubic and bilinear run through torch's antialiased uint8 kernels (PIL's filters, ~2x faster
    than PIL here) on the box rounded to whole pixels (it is whole unless the image was decoded at
    a reduced DCT scale); other filters through PIL's ``resize`` with the exact box, Lanczos with
    ``reducing_gap=LANCZOS_REDUCING_GAP``.
    """
    torch_mode = _TORCH_MODES.get(mode)
    if torch_mode is None:
        gap = LANCZOS_REDUCING_GAP if mode == InterpolationMode.LANCZOS else None
        out = img.resize((size, size), F.pil_modes_mapping[mode], box=box, reducing_gap=gap)
        return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)
    left, top = min(round(box[0]), img.width - 1), min(round(box[1]), img.height - 1)
    right = min(max(round(box[2]), left + 1), img.width)
    bottom = min(max(round(box[3]), top + 1), img.height)
    region = _rgbx(img.crop((left, top, right, bottom)))[None].permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(  # channels_last [1, 4, h, w] in and out
        region, size=(size, size), mode=torch_mode, antialias=True, align_corners=False
    )
    return out[0, :3]


def _jitter_(views: list[torch.Tensor], params: tuple, grey: torch.Tensor) -> None:
    """Colour jitter as torchvision's, in place, on float views in [0, 255]: the same for all views.

    ``params`` is ``ColorJitter.get_params``'s ``(order, brightness, contrast, saturation, hue)``.
    Each operation blends with black (brightness), the mean grey of the first view (contrast) or
    the pixel's grey (saturation), then clips to [0, 255], in the drawn order. A blend with a
    factor f <= 1 mixes two values in [0, 255] (f x + (1 - f) y), so only f > 1 can leave the
    range and clip: the clip is skipped otherwise (the same values, one pass less), and the blends
    run as one ``lerp_`` each.
    """
    order, brightness, contrast, saturation, _ = params
    for fn in order.tolist():
        if fn == 0 and brightness is not None:
            for v in views:
                v.mul_(float(brightness))
            factor = brightness
        elif fn == 1 and contrast is not None:
            mean = torch.dot(views[0].mean(dim=(1, 2)), grey)
            for v in views:
                v.lerp_(mean, 1.0 - float(contrast))
            factor = contrast
        elif fn == 2 and saturation is not None:
            for v in views:
                luma = torch.tensordot(grey, v, dims=1)  # [H, W]
                v.lerp_(luma, 1.0 - float(saturation))
            factor = saturation
        else:
            continue
        if factor > 1.0:
            for v in views:
                v.clamp_(0.0, 255.0)


def _round_to_uint8(view: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 255] (up to float rounding) -> uint8, rounded half to even.

    NumPy's ``rint`` and cast: torch's float-to-uint8 conversion took 4x as long here (50 against
    12 us for a 224-px view, torch 2.14 on one core of the reference machine).
    """
    pixels = view.numpy()
    np.rint(pixels, out=pixels)
    return torch.from_numpy(pixels.astype(np.uint8))


class _RandomCrop:
    """Shared crop-box + flip sampling for both transforms (torch global RNG)."""

    def __init__(self, scale, ratio, hflip):
        self.scale, self.ratio, self.hflip = _check_crop_args(scale, ratio, hflip)

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of a random box in an image of that size.

        torchvision's ``RandomResizedCrop.get_params`` on a zero-strided stand-in tensor of the
        image's size: the same sampling and random draws, without pixels.
        """
        stand_in = torch.empty(()).expand(1, int(height), int(width))
        return T.RandomResizedCrop.get_params(stand_in, list(self.scale), list(self.ratio))

    def flip(self) -> bool:
        """Draw the horizontal flip decision."""
        return self.hflip > 0 and bool(torch.rand(1).item() < self.hflip)

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
        output_dtype: ``"uint8"`` (default): both views as uint8 pixels, normalised on the device
            by the task; ``"float32"``: the patch view normalised, the token view in [0, 1].
    """

    # Takes EncodedImage: PretrainDataModule then lets its sources defer decoding to it.
    decodes_encoded_images = True
    # Draws only from torch's global RNG: the data module seeds (and restores) only that one.
    random_sources = frozenset({"torch"})

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
        output_dtype: str = "uint8",
    ) -> None:
        if output_dtype not in OUTPUT_DTYPES:
            raise ValueError(
                f"TwoViewTransform output_dtype must be one of {OUTPUT_DTYPES}, got "
                f"{output_dtype!r} (uint8: normalised on the device by the task)"
            )
        self.output_dtype = output_dtype
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
        # Pixels in [0, 255] -> (x / 255 - mean) / std as one multiply-add per channel.
        std, mean = torch.tensor(self.std), torch.tensor(self.mean)
        self._scale = (1.0 / (255.0 * std)).view(3, 1, 1)
        self._shift = (-mean / std).view(3, 1, 1)
        self._grey = torch.tensor(_LUMA)

    def __call__(self, img: Image.Image | EncodedImage) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of one crop.

        Args:
            img: An RGB ``PIL.Image`` (other modes are converted to RGB), or an
                :class:`~bitrain.data.decode.EncodedImage`, decoded here at the smallest JPEG
                DCT scale that keeps the larger view's size in pixels across the crop.

        Returns:
            ``images`` [3, input_size, input_size] and ``tokenizer_images``
            [3, second_input_size, second_input_size]: uint8 pixels (``output_dtype="uint8"``),
            or float32, ``images`` normalised with ``mean``/``std`` and ``tokenizer_images`` in
            [0, 1] (``output_dtype="float32"``).

        Raises:
            BadImageError: an ``EncodedImage`` cannot be decoded (the data modules skip it).
        """
        if isinstance(img, EncodedImage):
            top, left, height, width = self._crop.box(*img.size)
            largest = max(self.input_size, self.second_input_size)
            pixels, factor = img.decode(dct_reduction(width, height, largest))
        else:
            pixels, factor = _as_rgb(img, "TwoViewTransform"), 1
            top, left, height, width = self._crop.box(*pixels.size)
        flip = self._crop.flip()
        jitter = (
            T.ColorJitter.get_params(
                self._jitter.brightness, self._jitter.contrast, self._jitter.saturation, None
            )
            if self._jitter is not None
            else None
        )
        box = (left / factor, top / factor, (left + width) / factor, (top + height) / factor)
        views = [
            _resized(pixels, box, self.input_size, self.interpolation),
            _resized(pixels, box, self.second_input_size, self.second_interpolation),
        ]
        if jitter is None and self.output_dtype == "uint8":
            views = [v.contiguous() for v in views]
        else:
            views = [v.to(torch.float32, memory_format=torch.contiguous_format) for v in views]
            if jitter is not None:
                _jitter_(views, jitter, self._grey)
            if self.output_dtype == "uint8":
                # One rounding to 8 bits of the jittered views (in [0, 255] up to float rounding).
                views = [_round_to_uint8(v) for v in views]
            else:
                if jitter is not None:  # float rounding of the unclipped blends: ~1e-5 outside
                    for v in views:
                        v.clamp_(0.0, 255.0)
                views = [views[0].mul_(self._scale).add_(self._shift), views[1].mul_(1.0 / 255.0)]
        if flip:
            # Last, on contiguous views: the jitter and normalisation act per pixel (and the
            # contrast mean is the same mirrored), so the order does not matter; torch's flip of
            # the resized views' channels-last strides took 120 us a 224-px view, 3 us here.
            views = [v.flip(-1) for v in views]
        return tuple(views)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, "
            f"second_input_size={self.second_input_size}, scale={self._crop.scale}, "
            f"ratio={self._crop.ratio}, hflip={self._crop.hflip}, "
            f"color_jitter={self.color_jitter}, interpolation={self.interpolation.value}, "
            f"second_interpolation={self.second_interpolation.value}, "
            f"output_dtype={self.output_dtype!r})"
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

    random_sources = frozenset({"torch"})  # as TwoViewTransform

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
