"""Evaluation preprocessing as data: the spec, its records, and its readers against the libraries.

Each reader is checked against the library whose semantics it follows, on real photos of several
shapes (scikit-image's sample photos): timm's ``create_transform`` and transformers' image
processors (PIL backend: equal to the last bit; default backend: within one intensity level).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bitrain.data.preprocessing import (
    RECORD_FORMAT,
    EvalPreprocessing,
    from_processor_config,
    from_timm_args,
    from_transform,
    read_record,
)
from bitrain.io import CheckpointError


def _photos() -> list[Image.Image]:
    import skimage.data

    coffee = skimage.data.coffee()  # 400 x 600, landscape
    return [
        Image.fromarray(skimage.data.astronaut()),  # 512 x 512
        Image.fromarray(coffee),
        Image.fromarray(np.ascontiguousarray(np.rot90(skimage.data.chelsea()))),  # portrait
        Image.fromarray(skimage.data.rocket()),  # 427 x 640
    ]


PHOTOS = _photos()

# The preprocessor_config.json files of the three reference model cards (Hugging Face hub:
# microsoft/beit-base-patch16-224, google/vit-base-patch32-224-in21k, google/bit-50).
_CARDS_FILE = Path(__file__).resolve().parents[2] / "data" / "model_card_processors.json"
CARDS = {k: v for k, v in json.loads(_CARDS_FILE.read_text()).items() if not k.startswith("_")}


@pytest.mark.parametrize("card", sorted(CARDS))
def test_model_card_configs_preprocess_as_transformers_does(tmp_path, card):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(CARDS[card]))
    ours = from_processor_config(CARDS[card]).build()
    pil = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    default = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    for img in PHOTOS:
        mine = ours(img)
        theirs = pil(img, return_tensors="pt")["pixel_values"][0]
        assert mine.shape == theirs.shape == (3, 224, 224), img.size
        assert torch.equal(mine, theirs), img.size
        fast = default(img, return_tensors="pt")["pixel_values"][0]
        # transformers' default backend resizes with torchvision's tensor kernels: within a few
        # intensity levels of PIL (normalised by std 0.229: 0.02 is about one level)
        assert float((mine - fast).abs().max()) < 0.02, img.size


# Processor classes whose defaults are the same in transformers 4.x (``__init__`` arguments) and
# 5.x (class attributes). BeitImageProcessor's are not: 4.x resizes to 256 and crops 224, 5.x (and
# 4.x's BeitImageProcessorFast) resizes to 224.
@pytest.mark.parametrize(
    "processor",
    [
        "ViTImageProcessor", "DeiTImageProcessor", "BitImageProcessor", "CLIPImageProcessor",
        "BeitImageProcessorFast", "DeiTImageProcessorFast",
    ],
)  # fmt: skip
def test_keys_a_config_leaves_out_take_the_processor_defaults(tmp_path, processor):
    transformers = pytest.importorskip("transformers")
    config = {"image_processor_type": processor}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    ours = from_processor_config(config).build()
    for img in PHOTOS[:2]:
        assert torch.equal(ours(img), theirs(img, return_tensors="pt")["pixel_values"][0])


def test_integer_size_means_a_square_for_beit_and_vit_and_an_edge_for_bit():
    beit = from_processor_config(CARDS["beit"])
    assert beit.resize == ("exact", 224, 224) and beit.crop is None
    assert from_processor_config(CARDS["vit"]).resize == ("exact", 224, 224)
    bit = from_processor_config({**CARDS["bit"], "size": 256})
    assert bit.resize == ("shortest_edge", 256) and bit.crop == (224, 224)


TIMM_CASES = [
    {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic"},
    {"input_size": 224, "crop_pct": 0.9, "interpolation": "bilinear", "mean": (0.5,) * 3},
    {"input_size": (3, 480, 480), "crop_pct": 1.0, "crop_mode": "squash"},
    {"input_size": (3, 384, 384), "crop_pct": 1.0, "crop_mode": "squash", "std": (0.5,) * 3},
    {"input_size": (3, 200, 240), "crop_pct": 0.95, "crop_mode": "squash"},
]


@pytest.mark.parametrize("args", TIMM_CASES, ids=lambda a: f"{a.get('crop_mode', 'center')}")
def test_timm_args_preprocess_as_timm_does(args):
    import timm.data

    spec = from_timm_args(args)
    theirs = timm.data.create_transform(is_training=False, **args)
    for img in PHOTOS:
        assert torch.equal(spec.build()(img), theirs(img)), img.size
    assert read_record(json.loads(json.dumps(spec.to_record())), "test") == spec


@pytest.mark.parametrize("args", TIMM_CASES[:4], ids=lambda a: f"{a.get('crop_mode', 'center')}")
def test_timm_cfg_written_for_a_spec_rebuilds_it(args):
    spec = from_timm_args(args)
    assert from_timm_args(spec.to_timm_cfg()) == spec


def test_timm_cfg_is_none_for_what_timm_cannot_build():
    """timm always crops after a shortest-edge resize, and rounds the crop offset."""
    edge_only = EvalPreprocessing(("shortest_edge", 36), "bicubic", None, (0.5,) * 3, (0.5,) * 3)
    assert edge_only.to_timm_cfg() is None
    floored = EvalPreprocessing(("shortest_edge", 36), "bicubic", (32, 32), (0.5,), (0.5,), "floor")
    assert floored.to_timm_cfg() is None


def test_processor_config_written_for_a_spec_rebuilds_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = from_timm_args({"input_size": 224, "crop_pct": 0.875, "interpolation": "bicubic"})
    config = {**spec.to_processor_config(), "image_processor_type": "BitImageProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    for img in PHOTOS[:2]:
        theirs = processor(img, return_tensors="pt")["pixel_values"][0]
        assert float((spec.build()(img) - theirs).abs().max()) <= 1e-5


@pytest.mark.parametrize(
    ("processor", "spec"),
    [
        (
            "BeitImageProcessor",
            EvalPreprocessing(("exact", 224, 224), "bicubic", None, *[(0.5,) * 3] * 2),
        ),
        (
            "ViTImageProcessor",
            EvalPreprocessing(("exact", 224, 224), "bilinear", None, *[(0.5,) * 3] * 2),
        ),
        ("BitImageProcessor", EvalPreprocessing(None, "bicubic", None, *[(0.5,) * 3] * 2)),
    ],
    ids=["beit_no_crop", "vit_no_crop", "bit_no_resize"],
)
def test_processor_config_of_a_spec_without_crop_or_resize_loads_in_transformers(
    tmp_path, processor, spec
):
    """A step that is off is written without a size: transformers refuses an empty one."""
    transformers = pytest.importorskip("transformers")
    config = {**spec.to_processor_config(), "image_processor_type": processor}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    loaded = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert from_processor_config(config) == EvalPreprocessing(
        **{**vars(spec), "crop_offset": "floor"}
    )
    for img in PHOTOS[:2]:
        theirs = loaded(img, return_tensors="pt")["pixel_values"][0]
        assert float((spec.build()(img) - theirs).abs().max()) <= 1e-5


def test_border_mode_is_refused_clearly():
    with pytest.raises(CheckpointError, match="crop_mode='border'"):
        from_timm_args({"input_size": 224, "crop_mode": "border"})


def test_a_transform_of_the_users_config_is_described_step_by_step():
    import timm.data
    from torchvision import transforms as T

    theirs = timm.data.create_transform(224, crop_pct=0.9, interpolation="bicubic")
    spec = from_transform(theirs)
    assert spec == from_timm_args({"input_size": 224, "crop_pct": 0.9, "interpolation": "bicubic"})
    with pytest.raises(ValueError, match="ColorJitter"):
        from_transform(T.Compose([T.ColorJitter(0.4), T.ToTensor()]))
    with pytest.raises(ValueError, match="tensor"):
        from_transform(T.Compose([T.Resize(10)]))


# --- records from files: data, never code --------------------------------------------------------

RECORD = from_timm_args({"input_size": 32, "crop_pct": 0.875}).to_record()


@pytest.mark.parametrize(
    "node",
    [
        {"_target_": "shutil.copyfile", "src": "/etc/hostname", "dst": "/tmp/x"},
        {"_target_": "bitrain.io.atomic_write_bytes", "path": "/tmp/x.pth", "data": "x"},
        {"_target_": "builtins.exec", "_args_": ["import os"]},
        # a known builder whose argument would itself be a node
        {"_target_": "timm.data.create_transform", "input_size": {"_target_": "os.getcwd"}},
        {"_target_": "timm.data.create_transform", "input_size": 32, "_recursive_": True},
        {"_target_": "timm.data.create_transform", "input_size": 32, "is_training": True},
    ],
    ids=["copyfile", "atomic_write", "exec", "nested", "extra_key", "training"],
)
def test_records_that_name_code_are_refused(node):
    with pytest.raises(CheckpointError) as err:
        read_record(node, "planted.ckpt")
    assert "planted.ckpt" in str(err.value)
    assert "weights_only=False" not in str(err.value)


@pytest.mark.parametrize(
    "change",
    [
        {"format": "something.else"},
        {"version": 2},
        {"resize": {"shortest_edge": -3}},
        {"resize": {"longest_edge": 32}},
        {"crop": {"height": 32}},
        {"crop": {"height": True, "width": 32}},
        {"interpolation": "os.system"},
        {"mean": [0.5, 0.5]},
        {"std": [0.0, 1.0, 1.0]},
        {"std": [float("nan")] * 3},
        {"mean": "${oc.env:HOME}"},
        {"extra": 1},
    ],
    ids=lambda c: next(iter(c)) + "=" + str(next(iter(c.values())))[:16],
)
def test_damaged_records_are_refused(change):
    with pytest.raises(CheckpointError, match="bad.ckpt") as err:
        read_record({**RECORD, **change}, "bad.ckpt")
    assert str(err.value).count("bad.ckpt") == 1


@pytest.mark.parametrize(
    "change",
    [{"size": {"longest_edge": 32}}, {"crop_size": {"shortest_edge": 32}}, {"resample": [3]}],
    ids=["longest_edge", "edge_crop", "resample_list"],
)
def test_damaged_processor_configs_are_refused(change):
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        from_processor_config({**CARDS["bit"], **change})


def test_older_bitrain_nodes_are_read_as_data():
    timm_node = {
        "_target_": "timm.data.create_transform",
        "_convert_": "all",
        "input_size": 32,
        "is_training": False,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    assert read_record(timm_node, "old.ckpt") == from_timm_args(
        {k: v for k, v in timm_node.items() if k[0] != "_" and k != "is_training"}
    )
    config = {"do_resize": True, "size": {"shortest_edge": 36}, "resample": 3}
    for target in (
        "bitrain.models.hf_preprocessing.transform_from_processor_config",
        "bitrain.models.classifier_io.transform_from_processor_config",
    ):
        node = {"_target_": target, "_convert_": "all", "config": config}
        assert read_record(node, "old.ckpt") == from_processor_config(config)


def test_spec_validates_itself():
    with pytest.raises(CheckpointError, match="interpolation"):
        EvalPreprocessing(None, "cubic", None, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(CheckpointError, match="crop"):
        EvalPreprocessing(None, "bicubic", {"shortest_edge": 32}, (0.5,) * 3, (0.5,) * 3)
    assert RECORD["format"] == RECORD_FORMAT
    # lists and a single number are kept as the tuples a spec compares and hashes by
    spec = EvalPreprocessing(["exact", 32, 32], "bicubic", [30, 30], [0.5] * 3, 0.5)
    assert spec == EvalPreprocessing(("exact", 32, 32), "bicubic", (30, 30), (0.5,) * 3, (0.5,) * 3)
    assert hash(spec) == hash(read_record(spec.to_record(), "test"))


@pytest.mark.parametrize(
    "args",
    [
        {"input_size": 224, "imagenet_default_mean_and_std": True},
        {"input_size": 224, "imagenet_default_mean_and_std": False, "crop_pct": 0.875},
        {"input_size": 384},
        {"input_size": 32},
    ],
    ids=["224_imagenet", "224_inception", "384", "32"],
)
def test_official_args_preprocess_as_unilm_build_transform(args):
    from torchvision import transforms as T

    from bitrain.data.preprocessing import from_official_args

    # unilm beit/datasets.py build_transform(is_train=False, args), commit 03380c8, re-stated
    size = args["input_size"]
    imagenet = args.get("imagenet_default_mean_and_std")
    mean = (0.485, 0.456, 0.406) if imagenet else (0.5, 0.5, 0.5)
    std = (0.229, 0.224, 0.225) if imagenet else (0.5, 0.5, 0.5)
    steps = []
    if size > 32:
        pct = args.get("crop_pct") or (224 / 256 if size < 384 else 1.0)
        steps += [T.Resize(int(size / pct), interpolation=3), T.CenterCrop(size)]
    reference = T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
    ours = from_official_args(args).build()
    for img in PHOTOS[:3]:
        small = img.resize((48, 40)) if size <= 32 else img
        assert torch.equal(ours(small), reference(small)), img.size
