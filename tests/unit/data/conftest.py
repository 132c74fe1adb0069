"""Fixtures for the data tests: a tiny image folder with awkward and broken files, and shards."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIDE = 24


def _rgb(seed: int, side: int = SIDE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def good_files() -> dict[str, bytes]:
    """Decodable files of many modes, in two class folders (relative path -> bytes)."""
    rgba = _rgb(1).convert("RGBA")
    rgba.putalpha(0)  # fully transparent: must come out white
    pal = _rgb(2).convert("P")
    pal.info["transparency"] = 0
    i16 = Image.fromarray((np.arange(SIDE * SIDE).reshape(SIDE, SIDE) * 100).astype(np.uint16))
    return {
        "cat/rgb.jpg": _encode(_rgb(0), "JPEG"),
        "cat/upper.JPG": _encode(_rgb(3), "JPEG"),
        "cat/cmyk.jpg": _encode(_rgb(4).convert("CMYK"), "JPEG"),
        "cat/grey.png": _encode(_rgb(5).convert("L"), "PNG"),
        "cat/nested/la.png": _encode(_rgb(6).convert("LA"), "PNG"),
        "dog/rgba.png": _encode(rgba, "PNG"),
        "dog/palette.gif": _encode(pal, "GIF", transparency=0),
        "dog/i16.png": _encode(i16, "PNG"),
        "dog/bitmap.bmp": _encode(_rgb(7), "BMP"),
        "dog/pic.webp": _encode(_rgb(8), "WEBP"),
        "dog/pic.tiff": _encode(_rgb(9), "TIFF"),
    }


def bad_files() -> dict[str, bytes]:
    """Files with image extensions that cannot be decoded."""
    whole = _encode(_rgb(10, 64), "JPEG")
    return {
        "dog/truncated.jpg": whole[: len(whole) // 2],
        "dog/empty.png": b"",
        "cat/text.jpg": b"this is not an image, it is text named .jpg\n",
    }


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """``root/{cat,dog}/...``: 11 good files of many modes + 3 bad ones + ignored non-images."""
    root = tmp_path / "images"
    for rel, data in {**good_files(), **bad_files()}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "cat" / "notes.txt").write_text("not an image extension: ignored")
    return root


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset shard: one tar member per (key, extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    """Two shards of 6 samples each (keys s0..s11, label = index % 3); s5 is a bad image."""
    paths = []
    for shard in range(2):
        samples = []
        for i in range(shard * 6, shard * 6 + 6):
            img = b"garbage" if i == 5 else _encode(_rgb(100 + i), "PNG" if i % 2 else "JPEG")
            ext = "png" if i % 2 else "jpg"
            samples.append((f"s{i:02d}", {ext: img, "cls": str(i % 3).encode()}))
        paths.append(write_shard(tmp_path / "shards" / f"train-{shard:06d}.tar", samples))
    return paths


@pytest.fixture
def good_names() -> list[str]:
    """Relative paths of the decodable files of ``image_folder``."""
    return sorted(good_files())


@pytest.fixture
def bad_names() -> list[str]:
    """Relative paths of the broken files of ``image_folder``."""
    return sorted(bad_files())


@pytest.fixture(name="write_shard")
def write_shard_fixture():
    """The factory ``write_shard(path, [(key, {ext: bytes})]) -> Path``."""
    return write_shard
