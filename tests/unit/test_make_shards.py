"""scripts/make_shards.py: an image folder -> webdataset shards that WebDatasetSource reads back."""

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitrain.data.shards import WebDatasetSource

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_shards.py"


def _load():
    spec = importlib.util.spec_from_file_location("make_shards", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_round_trip(tmp_path, capsys):
    src = tmp_path / "src"
    colours = {"cat": (200, 10, 10), "dog": (10, 200, 10), "eel": (10, 10, 200)}
    for name, colour in colours.items():
        (src / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20 + i, 16), colour).save(src / name / f"{i}.png")
    (src / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    rc = _load().main([str(src), str(tmp_path / "out"), "--shard-size", "4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "9 samples of 3 classes in 3 shards (1 unreadable files skipped)" in out
    assert (tmp_path / "out" / "classes.txt").read_text().split() == ["cat", "dog", "eel"]
    pattern = str(tmp_path / "out" / "shard-{000000..000002}.tar")
    source = WebDatasetSource(pattern, shuffle=0, with_labels=True)
    assert source.label_names == ["cat", "dog", "eel"]
    items = [x for x in source if x is not None]
    assert len(items) == 9
    for image, label in items:  # the original pixels and the right class
        assert image.getpixel((0, 0)) == colours[source.label_names[label]]
    assert sorted(label for _, label in items) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert not list((tmp_path / "out").glob("*.tmp"))
    # Original bytes, not re-encoded.
    png = io.BytesIO()
    Image.new("RGB", (20, 16), colours["cat"]).save(png, format="PNG")
    import tarfile

    members = {}
    for shard in sorted((tmp_path / "out").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    assert png.getvalue() in members.values()


def _folder(root: Path, n_per_class: int, size=(20, 16)) -> Path:
    for c, colour in enumerate([(200, 10, 10), (10, 200, 10)]):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.new("RGB", size, colour).save(root / f"class{c}" / f"{i}.jpg")
    return root


def test_an_old_shard_set_is_refused_or_replaced_never_mixed(tmp_path, capsys):
    """Issue 13: shards written into a folder that holds shards must not mix with them."""
    out = tmp_path / "out"
    big = _folder(tmp_path / "big", 4)
    assert _load().main([str(big), str(out), "--shard-size", "2"]) == 0  # 4 shards
    old = sorted(p.name for p in out.glob("*.tar"))
    assert len(old) == 4
    small = _folder(tmp_path / "small", 1)
    with pytest.raises(SystemExit, match="already holds 4 shard file.*--overwrite"):
        _load().main([str(small), str(out), "--shard-size", "2"])
    assert sorted(p.name for p in out.glob("*.tar")) == old  # untouched
    capsys.readouterr()
    assert _load().main([str(small), str(out), "--shard-size", "2", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]  # no stale shards
    assert "removed 4 old shard file(s)" in capsys.readouterr().out
    items = list(WebDatasetSource(str(out / "shard-000000.tar"), shuffle=0))
    assert len(items) == 2
    # Another prefix is another set: allowed beside it.
    assert _load().main([str(small), str(out), "--prefix", "val"]) == 0
    # --overwrite deletes PREFIX-*.tar: a prefix with a wildcard or a path is refused.
    for prefix in ("*", "a/b", ""):
        with pytest.raises(SystemExit):
            _load().main([str(small), str(out), "--prefix", prefix, "--overwrite"])
    assert (out / "shard-000000.tar").is_file() and (out / "val-000000.tar").is_file()


def test_hints_name_the_scripts_own_options(tmp_path, capsys):
    """Issue 13: a missing or flat SRC gets a hint naming options make_shards really has."""
    with pytest.raises(SystemExit) as err:
        _load().main([str(tmp_path / "nowhere"), str(tmp_path / "out")])
    message = str(err.value)
    assert "does not exist" in message and "data.source" not in message
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(flat / f"{i}.png")
    with pytest.raises(SystemExit) as err:
        _load().main([str(flat), str(tmp_path / "out")])
    message = str(err.value)
    assert "--no-labels" in message and "with_labels" not in message
    # The option the hint names exists and works: unlabelled shards, no classes.txt.
    assert _load().main([str(flat), str(tmp_path / "out"), "--no-labels"]) == 0
    assert "3 samples of no labels in 1 shards" in capsys.readouterr().out
    assert not (tmp_path / "out" / "classes.txt").exists()
    items = list(WebDatasetSource(str(tmp_path / "out" / "shard-000000.tar"), shuffle=0))
    assert len(items) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no images found"):
        _load().main([str(empty), str(tmp_path / "out2")])


def test_max_side_and_short_side_re_encode_only_large_images(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    x = np.linspace(0, 255, 300)[None, :].repeat(200, 0)
    big = Image.fromarray(np.stack([x, x[:, ::-1], np.full_like(x, 90)], -1).astype(np.uint8))
    big.save(src / "a" / "big.png")  # 300x200: above both bounds
    Image.new("RGB", (60, 40), (5, 6, 7)).save(src / "a" / "small.jpg")  # within: bytes kept
    small_bytes = (src / "a" / "small.jpg").read_bytes()
    for option, expected in (("--max-side", (150, 100)), ("--short-side", (225, 150))):
        bound = "150"
        out = tmp_path / option.strip("-")
        assert _load().main([str(src), str(out), option, bound, "--quality", "95"]) == 0
        assert f"1 re-encoded to {option} {bound}" in capsys.readouterr().out
        import tarfile

        with tarfile.open(out / "shard-000000.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        assert small_bytes in members.values()
        jpgs = [Image.open(io.BytesIO(v)) for k, v in members.items() if k.endswith(".jpg")]
        sizes = sorted(im.size for im in jpgs)
        assert sizes == sorted([(60, 40), expected])
        resized = next(im for im in jpgs if im.size == expected).convert("RGB")
        reference = big.resize(expected, Image.Resampling.LANCZOS)
        diff = np.abs(np.asarray(resized, float) - np.asarray(reference, float)).mean()
        assert diff < 2.0  # the same picture, to JPEG precision
    with pytest.raises(SystemExit):
        _load().main([str(src), str(tmp_path / "x"), "--max-side", "10", "--short-side", "10"])


def test_shards_are_plain_ustar_without_a_pax_header_per_file(tmp_path, capsys):
    """Files dated to the whole second: Python's tarfile wrote a PAX header for webdataset's
    fractional ``time.time()`` before every file, and every reader parsed it (~40% of
    webdataset's time per sample)."""
    import tarfile

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(src / f"{i}.png")
    out = tmp_path / "out"
    assert _load().main([str(src), str(out), "--no-labels", "--shard-size", "10"]) == 0
    (shard,) = sorted(out.glob("*.tar"))
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    assert len(members) == 3
    assert all(m.isreg() and m.pax_headers == {} and m.mtime == int(m.mtime) for m in members)
    assert [s.size for s in WebDatasetSource(str(shard), shuffle=0)] == [(8, 8)] * 3
