"""Robust image decoding shared by every source: any file -> RGB ``PIL.Image`` or "bad sample".

Rules (``docs/data.md``):

* the file is fully decoded (``img.load()``) so truncation is caught here, not in a worker later;
* EXIF orientation is applied (``ImageOps.exif_transpose``);
* every mode becomes RGB. Modes with transparency (RGBA, LA, PA, P with a ``transparency`` entry)
  are composited over WHITE, the usual look of a transparent web image; 16/32-bit grey
  (I;16, I) is scaled to 8 bits by its true range of the format (not clipped); CMYK, YCbCr, L, 1,
  F and the rest go through ``convert("RGB")``;
* PIL's decompression-bomb check is an error (images above ``Image.MAX_IMAGE_PIXELS`` are bad).

A bad sample (truncated, zero bytes, not an image, a bomb) raises :class:`BadImageError`; sources
catch it, count it in a :class:`SharedCounter` (visible from the main process even when workers
decode) and warn once per file and process.

Deferred decoding (:class:`EncodedImage`): pretraining crops a random box and resizes it to 224 px,
so a big JPEG need not be decoded at full size. An ``EncodedImage`` reads only the header (size,
EXIF orientation, the bomb check) and decodes on request at a JPEG DCT scale of 1/2, 1/4 or 1/8
(libjpeg's scaled IDCT through PIL's ``draft``), under the same rules as :func:`decode_image`.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import multiprocessing.context
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "BadImageError",
    "EncodedImage",
    "SharedCounter",
    "decode_image",
    "to_rgb",
    "warn_bad_once",
]

log = logging.getLogger("bitrain.data")


class BadImageError(ValueError):
    """A sample could not be decoded into an image (it will be skipped)."""


class SharedCounter:
    """An integer counter shared with DataLoader workers (fork or spawn) through shared memory.

    Pickled while a worker process is being started it stays shared; pickled anywhere else
    (``copy.deepcopy``, saving) it becomes an independent counter that starts at the current value.
    """

    def __init__(self, value: int = 0) -> None:
        self._value = multiprocessing.Value("q", int(value))

    def increment(self, n: int = 1) -> None:
        with self._value.get_lock():
            self._value.value += n

    @property
    def value(self) -> int:
        return int(self._value.value)

    def __getstate__(self) -> dict[str, Any]:
        if multiprocessing.context.get_spawning_popen() is not None:
            return {"shared": self._value}
        return {"value": self.value}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "shared" in state:
            self._value = state["shared"]
        else:
            self._value = multiprocessing.Value("q", int(state["value"]))

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"SharedCounter({self.value})"


_warned: set[str] = set()


def warn_bad_once(name: str, reason: str) -> None:
    """Log a warning naming a bad file, once per file and process."""
    if name not in _warned:
        _warned.add(name)
        log.warning("skipping bad image %s: %s", name, reason)


def _high_bit_grey_to_l(img: Image.Image) -> Image.Image:
    """I;16 / I (32-bit int) / F grey -> 8-bit L, scaled by the format's range."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        scaled = arr.astype(np.float64) / 65535.0
    elif img.mode == "I":
        hi = 65535.0 if arr.size and arr.max() <= 65535 and arr.min() >= 0 else 2**31 - 1
        scaled = arr.astype(np.float64) / hi
    else:  # F: assume [0, 1] floats when they fit, else min-max
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
        scaled = arr if (lo >= 0 and hi <= 1) else (arr - lo) / max(hi - lo, 1e-12)
    return Image.fromarray(np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited over white, high-bit grey rescaled, else convert."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_bit_grey_to_l(img).convert("RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _open(data: bytes | Any, name: str) -> Image.Image:
    """``Image.open`` (header only) with the bomb check; errors become :class:`BadImageError`."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise BadImageError(f"{name}: empty (0 bytes)")
        data = io.BytesIO(data)
    with _as_bad_image(name):
        return Image.open(data)


def _finish(img: Image.Image, name: str) -> Image.Image:
    """Decode an opened image now (truncation fails here), apply EXIF orientation, make it RGB."""
    with _as_bad_image(name):
        img.load()  # decode now: a truncated file fails here, not later in the transform
        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
        return to_rgb(img)


class _as_bad_image:
    """Context: PIL's decoding errors (and the bomb warning) -> :class:`BadImageError`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._warnings = warnings.catch_warnings()

    def __enter__(self) -> None:
        self._warnings.__enter__()
        # A DecompressionBombWarning (between 1x and 2x the limit) is a bad sample too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)

    def __exit__(self, kind, err, tb) -> bool:
        self._warnings.__exit__(kind, err, tb)
        if err is None or isinstance(err, BadImageError):
            return False
        name = self.name
        if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            raise BadImageError(
                f"{name}: too many pixels (decompression bomb guard): {err}"
            ) from None
        if isinstance(err, (OSError, SyntaxError, ValueError, EOFError)):
            # PIL.UnidentifiedImageError is an OSError; truncated files raise OSError on load().
            raise BadImageError(f"{name}: {type(err).__name__}: {err}") from None
        return False


def decode_image(data: bytes | Any, name: str = "<bytes>") -> Image.Image:
    """Decode a file path, file object or bytes into an RGB ``PIL.Image``.

    Raises:
        BadImageError: the data is empty, truncated, not an image, or a decompression bomb.
    """
    return _finish(_open(data, name), name)


# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


class EncodedImage:
    """An encoded image whose pixels are decoded only when asked, possibly at a reduced scale.

    Opening reads the header: ``size`` is the (width, height) AFTER the EXIF orientation, the size
    :func:`decode_image` would return. :meth:`decode` then decodes under the same rules (full
    decode, orientation, RGB, bad data -> :class:`BadImageError`), for a JPEG at DCT scale
    ``1 / reduce`` (``reduce`` in 1, 2, 4, 8): every side becomes ``ceil(side / reduce)`` and a
    point ``x`` of the full image lies at ``x / reduce`` in the reduced one.

    Args:
        data: The file's bytes.
        name: The file's name for error messages.

    Raises:
        BadImageError: the data is empty, not an image, or a decompression bomb.
    """

    def __init__(self, data: bytes, name: str = "<bytes>") -> None:
        self.name = name
        self._data = data
        self._image: Image.Image | None = _open(data, name)
        width, height = self._image.size
        with _as_bad_image(name):
            orientation = self._image.getexif().get(0x0112, 1)
        self.size = (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)
        self.format: str | None = self._image.format  # "JPEG", "PNG", ... as PIL identified it

    def decode(self, reduce: int = 1) -> tuple[Image.Image, int]:
        """Decode to RGB at ``1 / reduce`` of the size when the format allows it (JPEG).

        Returns:
            The RGB image and the factor actually applied (1 for formats other than JPEG).
        """
        if reduce not in (1, 2, 4, 8):
            raise ValueError(f"reduce is a JPEG DCT scale 1, 2, 4 or 8, got {reduce!r}")
        # The opened header serves the first decode; a later one opens the bytes again.
        img = self._image if self._image is not None else _open(self._data, self.name)
        self._image, factor = None, 1
        if reduce > 1 and img.format == "JPEG":
            w, h = img.size  # stored (not oriented) size: draft works before the EXIF transpose
            drafted = img.draft(img.mode, (w // reduce, h // reduce))
            if drafted is not None:
                factor = round(w / drafted[1][2])
        return _finish(img, self.name), factor

    def __repr__(self) -> str:
        return f"EncodedImage({self.name!r}, size={self.size}, format={self.format})"
