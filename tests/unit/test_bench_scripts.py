"""Smoke tests of scripts/bench_*.py at the smallest sizes.

Each runs ``main()`` on CPU (tiny sizes, batch 2, two timed steps) and checks the last printed
line is one JSON object with the throughput keys, positive figures and consistent ratios.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str):
    """Import a script as a module (scripts/ is not a package)."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _last_json(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 3, lines  # a table before the JSON line
    return json.loads(lines[-1])


def test_bench_pretrain_tiny_cpu(capsys):
    bench = _load("bench_pretrain")
    rc = bench.main(
        ["--model", "tiny", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--block", "1"]
    )
    assert rc == 0
    out = _last_json(capsys)
    for key in ("bitrain_img_s", "reference_img_s", "ratio", "cpu", "torch", "threads"):
        assert key in out, key
    assert out["bitrain_img_s"] > 0 and out["reference_img_s"] > 0
    assert math.isclose(out["ratio"], out["bitrain_img_s"] / out["reference_img_s"])
    assert out["target_agreement"] == 1.0  # same DALL-E weights on both sides, float32
    assert out["bitrain"]["mfu"] is None  # no known peak on CPU
    assert math.isfinite(out["bitrain"]["loss"]) and math.isfinite(out["reference"]["loss"])
    assert out["flops_per_step"] > 0
    assert out["bitrain_views"] == "uint8"  # as its loader hands them, normalised in the step


def test_bench_pretrain_rejects_bad_steps():
    bench = _load("bench_pretrain")
    with pytest.raises(SystemExit):
        bench.main(["--steps", "0"])


def test_bench_tokenizer_tiny_cpu(capsys):
    bench = _load("bench_tokenizer")
    rc = bench.main(["--size", "tiny", "--batch-size", "2", "--iters", "2", "--warmup", "1"])
    assert rc == 0
    out = _last_json(capsys)
    for key in ("bitrain_fp32_img_s", "reference_fp32_img_s", "bitrain_bf16_img_s", "ratio"):
        assert out[key] > 0, key
    assert out["reference_id_agreement"] == 1.0  # same weights, float32
    assert 0.0 <= out["bf16_id_agreement"] <= 1.0
    assert 0.0 < out["step_share"]["share"] < 1.0


def test_bench_data_generated_images(capsys):
    bench = _load("bench_data")
    rc = bench.main(
        ["--num-images", "24", "--batch-size", "4", "--batches", "2", "--workers", "0",
         "--shard-size", "10"]
    )  # fmt: skip
    assert rc == 0
    out = _last_json(capsys)
    for key in ("folder_img_s", "shards_img_s", "reference_img_s"):
        assert out[key]["0"] > 0, key
    assert math.isclose(out["ratio"]["0"], out["folder_img_s"]["0"] / out["reference_img_s"]["0"])


def test_bench_data_rounds_resized_shards_and_profile(capsys):
    bench = _load("bench_data")
    rc = bench.main(
        ["--num-images", "12", "--image-size", "120x90", "--batch-size", "4", "--batches", "2",
         "--workers", "0", "--shard-size", "6", "--repeats", "2", "--max-side", "64",
         "--no-shards", "--profile"]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    out = json.loads(text.strip().splitlines()[-1])
    assert "# profile of folder" in text and "# profile of reference" in text
    assert len(out["rounds"]["resized"]["0"]) == 2 and len(out["rounds"]["reference"]["0"]) == 2
    ratios = [a / b for a, b in zip(out["rounds"]["resized"]["0"], out["rounds"]["reference"]["0"])]
    assert math.isclose(out["ratio_resized"]["0"], sum(ratios) / 2)  # the median of two
    assert out["max_side"] == 64 and out["shards_img_s"] == {}


def test_bench_data_refuses_too_few_images(tmp_path):
    from PIL import Image

    bench = _load("bench_data")
    (tmp_path / "a").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "a" / "x.jpg")
    with pytest.raises(SystemExit, match="need at least"):
        bench.main(["--root", str(tmp_path), "--batch-size", "4", "--no-shards"])


def test_bench_data_float_views_iqr_and_uint8_batches(capsys, tmp_path):
    """bitrain's loader hands uint8 views; --float-views adds the float32 ones; IQRs per ratio."""
    bench = _load("bench_data")
    rc = bench.main(
        ["--num-images", "12", "--image-size", "120x90", "--batch-size", "4", "--batches", "2",
         "--workers", "0", "--repeats", "2", "--no-shards", "--float-views"]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    out = json.loads(text.strip().splitlines()[-1])
    assert "bitrain hands uint8 views" in text and out["bitrain_views"] == "uint8"
    assert len(out["rounds"]["folder_f32"]["0"]) == 2
    low, high = out["ratio_iqr"]["0"]
    assert low <= out["ratio"]["0"] <= high and "ratio_folder_f32_iqr" in out
    bench.make_images(tmp_path, 4, (120, 90))
    from bitrain.data.sources import ImageFolderSource

    batch = next(iter(bench.bitrain_loader(ImageFolderSource(tmp_path), 0, 2)))
    assert batch["images"].dtype == torch.uint8 and batch["tokenizer_images"].dtype == torch.uint8
    f32 = next(iter(bench.bitrain_loader(ImageFolderSource(tmp_path), 0, 2, "float32")))
    assert f32["images"].dtype == torch.float32


def test_bench_data_rounding_is_at_most_half_a_grey_level(tmp_path):
    bench = _load("bench_data")
    bench.make_images(tmp_path, 4, (120, 90))
    out = bench.view_rounding(tmp_path, n=6)
    for view in ("patch", "token"):
        assert 0.0 < out[f"{view}_mean"] < 0.5 and out[f"{view}_max"] <= 0.5 + 1e-3
    assert 0.0 < out["patch_normalised_max"] < 0.5 / 255 / 0.224 + 1e-4
