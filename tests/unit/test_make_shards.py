"""scripts/make_shards.py: an image folder -> webdataset shards that WebDatasetSource reads back."""

import importlib.util
import io
from pathlib import Path

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
