"""Fine-tuning training transforms that timm's ``create_transform`` does not build.

BiT-HyperRule's training pipeline (big_transfer ``bit_pytorch/train.py``, ``mktrainval``): squash
the whole image to ``resize_size x resize_size`` (no aspect ratio kept), take a random
``input_size x input_size`` window of it, flip, normalise. Unlike an Inception crop
(``RandomResizedCrop``, down to 8% of the area) it never crops below the
``input_size / resize_size`` window (480 of 512 px: 88% of the area). The matching evaluation
transform is a plain squash to ``input_size`` (timm ``create_transform`` with ``crop_mode:
squash`` and ``crop_pct: 1.0``), kept in the config so it is recorded like every other one.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = ["squash_random_crop"]


def squash_random_crop(
    input_size: int,
    resize_size: int,
    hflip: float = 0.5,
    interpolation: str = "bilinear",
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> T.Compose:
    """``Resize((resize, resize))`` -> ``RandomCrop(input_size)`` -> flip -> tensor -> normalise.

    Args:
        input_size: side of the training crop in pixels (BiT: 480, or 128 for small images).
        resize_size: side the image is squashed to first (BiT: 512, or 160).
        hflip: probability of a horizontal flip (BiT: torchvision's default 0.5).
        interpolation: resize interpolation (BiT: torchvision's default, bilinear).
        mean: per-channel normalisation mean (BiT: 0.5).
        std: per-channel normalisation std (BiT: 0.5).

    Returns:
        A torchvision ``Compose`` taking an RGB PIL image to a ``[3, input_size, input_size]``
        float tensor.

    Raises:
        ValueError: the crop is larger than the resized image, or a size is not positive.
    """
    input_size, resize_size = int(input_size), int(resize_size)
    if input_size < 1 or resize_size < 1:
        raise ValueError(
            f"squash_random_crop: input_size ({input_size}) and resize_size ({resize_size}) must "
            "be positive"
        )
    if input_size > resize_size:
        raise ValueError(
            f"squash_random_crop: input_size={input_size} is larger than resize_size="
            f"{resize_size}; the crop is taken inside the resized image (BiT: 480 of 512)"
        )
    if not 0.0 <= float(hflip) <= 1.0:
        raise ValueError(f"squash_random_crop: hflip is a probability in [0, 1], got {hflip}")
    try:
        mode = InterpolationMode(interpolation)
    except ValueError as err:
        choices = [m.value for m in InterpolationMode]
        raise ValueError(
            f"squash_random_crop: interpolation={interpolation!r} is not one of {choices}"
        ) from err
    return T.Compose(
        [
            T.Resize((resize_size, resize_size), interpolation=mode),
            T.RandomCrop(input_size),
            T.RandomHorizontalFlip(float(hflip)),
            T.ToTensor(),
            T.Normalize([float(m) for m in mean], [float(s) for s in std]),
        ]
    )
