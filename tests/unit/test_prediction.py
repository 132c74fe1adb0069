"""bitrain.evaluation.prediction: image listing and class names."""

import pytest
import torch
from PIL import Image

from bitrain.evaluation.prediction import class_names, format_results, list_images


def test_list_images(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "x.PNG")
    Image.new("RGB", (4, 4)).save(tmp_path / "y.jpg")
    (tmp_path / "notes.txt").write_text("no")
    assert [p.name for p in list_images(tmp_path)] == ["x.PNG", "y.jpg"]
    assert list_images(tmp_path / "y.jpg") == [tmp_path / "y.jpg"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        list_images(tmp_path / "empty")


def test_class_names():
    model = torch.nn.Linear(1, 1)
    model.label_names = ["cat", "dog"]
    assert class_names(model, 2) == ["cat", "dog"]
    model.label_names = None
    names = class_names(model, 1000)  # timm's shipped ImageNet-1k class list
    assert len(names) == 1000 and names[1].startswith("goldfish")
    assert class_names(model, 3) == ["0", "1", "2"]


def test_format_results():
    text = format_results(
        [{"image": "a.jpg", "top": [{"label": "cat", "index": 0, "prob": 0.9}]},
         {"image": "b.jpg", "error": "truncated"}]
    )  # fmt: skip
    assert text.splitlines() == ["a.jpg: cat (0.900)", "b.jpg: ERROR truncated"]
