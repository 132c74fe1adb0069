"""Data sources: datasets that yield RGB ``PIL.Image`` s (optionally ``(image, label)``).

* :class:`ImageFolderSource` - a directory tree of image files (ImageNet's ``train/`` layout or any
  flat folder), map-style;
* :class:`WebDatasetSource` - ``.tar`` shards (``bitrain.data.shards``), iterable;
* :class:`DemoSource` - the embedded demo's real digit images (``bitrain.data.demo``), map-style;
* :class:`SyntheticSource` - random tensors already shaped like transformed samples (benchmarks and
  smoke tests: no decoding, no transform), map-style.

Sources decode and nothing else: augmentation lives in ``bitrain.data.transforms`` and batching in
``bitrain.data.datamodule``. Bad files are skipped, never fatal: ``__getitem__`` returns ``None``,
counts them in ``num_bad`` (shared with DataLoader workers) and logs a warning naming the file once
(see ``bitrain.data.decode`` for the decoding rules). This mirrors torchvision's ``ImageFolder``
(BEiT's ``datasets.build_beit_pretraining_dataset``) without its crash on the first bad file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from bitrain.data.decode import (
    BadImageError,
    EncodedImage,
    SharedCounter,
    decode_image,
    warn_bad_once,
)
from bitrain.data.demo import DemoSource
from bitrain.data.shards import WebDatasetSource

__all__ = [
    "DemoSource",
    "IMAGE_EXTENSIONS",
    "ImageFolderSource",
    "SyntheticSource",
    "WebDatasetSource",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)  # fmt: skip


def _normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = [extensions]
    exts = tuple(sorted({e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}))
    if not exts:
        raise ValueError("extensions is empty: give at least one, e.g. ['.jpg', '.png']")
    return exts


class ImageFolderSource(Dataset):
    """All image files under ``root`` (recursive, sorted), decoded to RGB ``PIL.Image``.

    Args:
        root: Directory to scan; symlinked directories are followed.
        extensions: File suffixes to take (case-insensitive: ``.JPG`` counts as ``.jpg``).
        with_labels: Return ``(image, class_index)``; the class is the first-level sub-folder
            (``root/<class>/.../file.jpg``), ``classes`` is their sorted list. Files directly in
            ``root`` are then an error.

    Items are ``PIL.Image`` / ``(PIL.Image, int)``, or ``None`` for a bad file (counted in
    ``num_bad``, warned once; ``collate_drop_none`` and the data modules drop it).

    ``deferred_decode`` (set by ``PretrainDataModule`` when its transform takes encoded images):
    items are :class:`~bitrain.data.decode.EncodedImage` s, header read and checked, pixels decoded
    by the transform at the scale the crop needs; a file that fails then is counted by the data
    module in this source's ``num_bad``.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a directory.
        ValueError: no file with one of ``extensions`` is found under ``root``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        with_labels: bool = False,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            what = "is a file, not a directory" if self.root.exists() else "does not exist"
            raise FileNotFoundError(
                f"ImageFolderSource root '{self.root}' {what}: point data.source.root at a folder "
                "of images (docs/data.md)"
            )
        self.extensions = _normalise_extensions(extensions)
        self.with_labels = bool(with_labels)
        self.files = self._scan()
        if not self.files:
            raise ValueError(
                f"no images found under {self.root} (looked for {', '.join(self.extensions)})"
            )
        self.classes: list[str] = []
        self.targets: list[int] = []
        if self.with_labels:
            self._assign_labels()
        self.num_bad_counter = SharedCounter()
        self.deferred_decode = False

    def _scan(self) -> list[str]:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames.sort()
            for name in filenames:
                if os.path.splitext(name)[1].lower() in self.extensions:
                    found.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return sorted(found)

    def _assign_labels(self) -> None:
        top = [Path(f).parts for f in self.files]
        loose = [os.path.join(*p) for p in top if len(p) == 1]
        if loose:
            raise ValueError(
                f"with_labels=True takes the class from the first sub-folder of {self.root}, but "
                f"{len(loose)} image(s) lie directly in it (e.g. '{loose[0]}'): move them into "
                "class folders or set with_labels=False"
            )
        self.classes = sorted({p[0] for p in top})
        index = {c: i for i, c in enumerate(self.classes)}
        self.targets = [index[p[0]] for p in top]

    @property
    def label_names(self) -> list[str] | None:
        """Class names in label order (the sorted class folders, e.g. ImageNet wnids)."""
        return list(self.classes) if self.with_labels else None

    @property
    def num_bad(self) -> int:
        """Bad files skipped so far, counted across DataLoader workers."""
        return self.num_bad_counter.value

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Image.Image | tuple[Image.Image, int] | None:
        path = self.root / self.files[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
            if self.deferred_decode:
                image = EncodedImage(data, name=str(path))
            else:
                image = decode_image(data, name=str(path))
        except (BadImageError, OSError) as err:
            self.num_bad_counter.increment()
            warn_bad_once(str(path), str(err))
            return None
        return (image, self.targets[index]) if self.with_labels else image

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource(root='{self.root}', files={len(self.files)}, "
            f"with_labels={self.with_labels})"
        )


class SyntheticSource(Dataset):
    """Random tensors shaped like transformed samples: no files, no decoding, no transform.

    Sample ``i`` is a dict ``{"images": [3, input_size, input_size]`` standard normal,
    ``"tokenizer_images": [3, second_input_size, second_input_size]`` uniform in [0, 1]``}``
    (+ ``"labels"`` in ``[0, num_classes)`` when ``num_classes > 0``), drawn from a generator
    seeded with ``(seed, i)`` so it is the same every time. The data modules skip the transform for
    dict samples and still draw the mask. For data-loading-free throughput benchmarks.

    Args:
        length: Number of samples.
        input_size: Side of ``images``.
        second_input_size: Side of ``tokenizer_images``.
        num_classes: Add integer ``labels`` when > 0.
        seed: Base seed.
    """

    num_bad = 0

    def __init__(
        self,
        length: int = 1024,
        input_size: int = 224,
        second_input_size: int = 112,
        num_classes: int = 0,
        seed: int = 0,
    ) -> None:
        for name, value in (("length", length), ("input_size", input_size)):
            if int(value) != value or int(value) <= 0:
                raise ValueError(f"SyntheticSource {name} must be a positive integer, got {value}")
        if int(second_input_size) <= 0 or int(num_classes) < 0:
            raise ValueError(
                "SyntheticSource needs second_input_size > 0 and num_classes >= 0, got "
                f"{second_input_size} and {num_classes}"
            )
        self.length, self.input_size = int(length), int(input_size)
        self.second_input_size, self.num_classes = int(second_input_size), int(num_classes)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"SyntheticSource index {index} out of range {self.length}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        s, t = self.input_size, self.second_input_size
        sample = {
            "images": torch.randn(3, s, s, generator=g),
            "tokenizer_images": torch.rand(3, t, t, generator=g),
        }
        if self.num_classes:
            sample["labels"] = torch.randint(0, self.num_classes, (), generator=g)
        return sample

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(length={self.length}, input_size={self.input_size}, "
            f"second_input_size={self.second_input_size}, num_classes={self.num_classes})"
        )
