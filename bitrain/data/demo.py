"""The embedded demo set: scikit-learn's 1,797 real handwritten digits, no download needed.

``sklearn.datasets.load_digits`` ships inside the scikit-learn wheel (the UCI "Optical
Recognition of Handwritten Digits" test set: 8x8 images, 16 grey levels, 10 classes, about 180
per class). :class:`DemoSource` turns them into RGB ``PIL.Image`` s of ``image_size`` pixels:

* intensity ``v`` in 0..16 -> ``round(v * 255 / 16)`` in 0..255: a WHITE digit on a BLACK
  background, as in the original data (ink = high value);
* the 8x8 grey image is upsampled to ``image_size`` with PIL's bicubic filter, then converted to
  RGB (three equal channels), so the rest of the pipeline sees ordinary RGB images.

Splits are fixed, stratified by class and seeded (``SPLIT_SEED``): "pretrain" = 1,297 images
(their labels are not used by MIM pretraining), "test" = the other 500 (held out for fine-tuning
evaluation), "train" = the same 1,297 images as "pretrain" with labels (fine-tuning), "all" = 1,797.
Why digits and not photo crops: see ``docs/data.md``.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["DemoSource", "demo_split_indices", "SPLIT_SEED", "NUM_TEST"]

SPLIT_SEED = 0
NUM_TEST = 500
_SPLITS = ("pretrain", "train", "test", "all")


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, 8, 8] float in 0..16, labels [1797] int)`` from scikit-learn's wheel."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float64), digits.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def demo_split_indices() -> dict[str, np.ndarray]:
    """Sorted indices into ``load_digits()`` of each split (stratified, seed ``SPLIT_SEED``)."""
    from sklearn.model_selection import train_test_split

    _, labels = _load_digits()
    all_idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        all_idx, test_size=NUM_TEST, stratify=labels, random_state=SPLIT_SEED, shuffle=True
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return {"pretrain": train_idx, "train": train_idx, "test": test_idx, "all": all_idx}


@functools.lru_cache(maxsize=4)
def _rendered(image_size: int) -> np.ndarray:
    """All 1,797 digits as uint8 grey images ``[1797, image_size, image_size]`` (bicubic)."""
    images, _ = _load_digits()
    grey = np.clip(np.rint(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    out = np.empty((len(grey), image_size, image_size), dtype=np.uint8)
    for i, small in enumerate(grey):
        big = Image.fromarray(small, mode="L").resize(
            (image_size, image_size), resample=Image.Resampling.BICUBIC
        )
        out[i] = np.asarray(big)
    out.setflags(write=False)
    return out


def _per_class_subset(indices: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` indices of each class in a fixed permutation (seed ``SPLIT_SEED + 1``)."""
    if k < 1:
        raise ValueError(f"DemoSource labels_per_class must be >= 1, got {k}")
    order = np.random.default_rng(SPLIT_SEED + 1).permutation(indices)
    chosen = []
    for cls in np.unique(labels[indices]):
        of_class = order[labels[order] == cls]
        if len(of_class) < k:
            raise ValueError(
                f"DemoSource labels_per_class={k}: digit {cls} has only {len(of_class)} images "
                "in this split"
            )
        chosen.append(of_class[:k])
    return np.sort(np.concatenate(chosen))


class DemoSource(Dataset):
    """The demo's real digit images as RGB ``PIL.Image`` s (optionally with their class).

    Args:
        split: "pretrain" (1,297), "train" (the same 1,297, labelled), "test" (500) or "all".
        image_size: Side of the returned images in pixels (8x8 digits upsampled bicubically).
        with_labels: Return ``(image, label)`` pairs; ``None`` means yes for "train" and "test"
            and no for "pretrain" and "all".
        labels_per_class: Keep only this many images of each digit (a fixed, seeded, stratified
            subset of the split: the same on every run), e.g. 13 for the demo's low-label
            fine-tuning (130 labelled images); ``None`` keeps the whole split.

    Items are ``PIL.Image`` (RGB, ``image_size`` square) or ``(PIL.Image, int)``.
    """

    classes = [str(d) for d in range(10)]
    label_names = classes

    def __init__(
        self,
        split: str = "pretrain",
        image_size: int = 32,
        with_labels: bool | None = None,
        labels_per_class: int | None = None,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"DemoSource split must be one of {_SPLITS}, got {split!r}")
        if int(image_size) != image_size or int(image_size) < 8:
            raise ValueError(f"DemoSource image_size must be an integer >= 8, got {image_size!r}")
        self.split = split
        self.image_size = int(image_size)
        self.with_labels = split in ("train", "test") if with_labels is None else bool(with_labels)
        self.indices = demo_split_indices()[split]
        self.num_bad = 0  # the embedded set has no bad samples; kept for the source interface
        _, labels = _load_digits()
        self.labels_per_class = None if labels_per_class is None else int(labels_per_class)
        if self.labels_per_class is not None:
            self.indices = _per_class_subset(self.indices, labels, self.labels_per_class)
        self.targets = labels[self.indices].tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Image.Image | tuple[Image.Image, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"DemoSource({self.split!r}) index {index} out of range {len(self)}")
        grey = _rendered(self.image_size)[self.indices[index]]
        img = Image.fromarray(grey, mode="L").convert("RGB")
        return (img, self.targets[index]) if self.with_labels else img

    def __repr__(self) -> str:
        return (
            f"DemoSource(split={self.split!r}, image_size={self.image_size}, "
            f"with_labels={self.with_labels}, labels_per_class={self.labels_per_class}, "
            f"len={len(self)})"
        )
