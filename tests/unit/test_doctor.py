"""bitrain.tools.doctor: the pre-flight checks on a composed pretraining config."""

from __future__ import annotations

import os

import pytest

from bitrain.tools import doctor


@pytest.fixture
def tokenizers_dir(tmp_path):
    """A tokenizers dir holding a random (untrained) demo dVAE file."""
    from bitrain.tokenizers.dvae import DiscreteVAE, save_dvae

    folder = tmp_path / "tokenizers"
    save_dvae(DiscreteVAE(), folder / "demo_dvae.pt")
    return folder


def _problems(overrides):
    cfg = doctor.compose_config(overrides)
    return {c.name: c.detail for c in doctor.run_checks(cfg) if not c.ok}


def test_demo_config_passes(tmp_path, tokenizers_dir, capsys):
    args = [f"paths.tokenizers_dir={tokenizers_dir}", f"paths.log_dir={tmp_path / 'out'}"]
    assert doctor.main(args) == 0
    cfg = doctor.compose_config(args)
    assert cfg.paths.output_dir == str(tmp_path / "out" / "doctor")
    checks = {c.name: c for c in doctor.run_checks(cfg)}
    assert checks["batch"].detail.startswith("128 per device; global 128")
    assert "demo_dvae.pt" in checks["tokenizer"].detail


def test_missing_tokenizer_weights(tmp_path):
    problems = _problems([f"paths.tokenizers_dir={tmp_path}", f"paths.log_dir={tmp_path}"])
    assert set(problems) == {"tokenizer"}
    assert str(tmp_path / "demo_dvae.pt") in problems["tokenizer"]
    assert doctor.main([f"paths.tokenizers_dir={tmp_path}", f"paths.log_dir={tmp_path}"]) == 1


def test_missing_data_root(tmp_path, tokenizers_dir):
    root = tmp_path / "no_such_images"
    problems = _problems(
        [
            f"paths.tokenizers_dir={tokenizers_dir}",
            f"paths.log_dir={tmp_path}",
            "data=image_folder",
            f"data.source.root={root}",
        ]
    )
    assert set(problems) == {"data.source"}
    assert str(root) in problems["data.source"]


def test_image_folder_counts_images(tmp_path, tokenizers_dir):
    root = tmp_path / "images" / "cls"
    root.mkdir(parents=True)
    for name in ("a.jpg", "b.PNG", "notes.txt"):
        (root / name).write_bytes(b"x")
    cfg = doctor.compose_config(
        [
            f"paths.tokenizers_dir={tokenizers_dir}",
            f"paths.log_dir={tmp_path}",
            "data=image_folder",
            f"data.source.root={root.parent}",
        ]
    )
    (check,) = doctor.check_data(cfg)
    assert check.ok and check.detail.startswith("2 images")


def test_missing_shards(tmp_path, tokenizers_dir):
    (tmp_path / "s-0.tar").write_bytes(b"")
    problems = _problems(
        [
            f"paths.tokenizers_dir={tokenizers_dir}",
            f"paths.log_dir={tmp_path}",
            "data=webdataset",
            f"data.source.urls='{tmp_path}/s-{{0..2}}.tar'",
        ]
    )
    assert set(problems) == {"data.source"}
    assert "2 of 3 shard" in problems["data.source"]


def test_unwritable_output_dir(tmp_path, tokenizers_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a 0o500 directory is still writable")
        problems = _problems(
            [f"paths.tokenizers_dir={tokenizers_dir}", f"paths.log_dir={locked / 'outputs'}"]
        )
        assert set(problems) == {"output dir"}
        assert str(locked) in problems["output dir"]
    finally:
        locked.chmod(0o700)


def test_unwritable_output_dir_via_access(tmp_path, tokenizers_dir, monkeypatch):
    """The same check when running as root: os.access reports the directory read-only."""
    monkeypatch.setattr(doctor.os, "access", lambda path, mode: False)
    problems = _problems([f"paths.tokenizers_dir={tokenizers_dir}", f"paths.log_dir={tmp_path}"])
    assert set(problems) == {"output dir"}


def test_global_batch_and_gpu_request(tmp_path, tokenizers_dir):
    cfg = doctor.compose_config(
        [
            f"paths.tokenizers_dir={tokenizers_dir}",
            f"paths.log_dir={tmp_path}",
            "trainer=gpu",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "trainer.accumulate_grad_batches=2",
            "data.batch_size=16",
        ]
    )
    checks, world = doctor.check_trainer(cfg)
    assert world == 8
    (batch,) = doctor.check_batch(cfg, world)
    assert "global 256" in batch.detail
    import torch

    if torch.cuda.device_count() < 4:
        assert any(c.name == "gpus" and not c.ok for c in checks)


def test_batch_derived_from_the_recipe_global_batch(tmp_path, tokenizers_dir):
    base = [f"paths.tokenizers_dir={tokenizers_dir}", f"paths.log_dir={tmp_path}"]
    cfg = doctor.compose_config([*base, "+experiment=beit_base", "trainer.devices=8"])
    (batch,) = doctor.check_batch(cfg, 8)
    assert batch.ok and "128 per device; global 2048 = 128 x 8 (world) x 2" in batch.detail
    cfg = doctor.compose_config([*base, "+experiment=beit_base", "trainer.devices=3"])
    (batch,) = doctor.check_batch(cfg, 3)
    assert not batch.ok and "does not split evenly" in batch.detail


def test_missing_dall_e_decoder_is_reported(tmp_path):
    enc = tmp_path / "dall_e" / "encoder.pkl"
    enc.parent.mkdir()
    enc.write_bytes(b"x" * 100)
    overrides = [
        f"paths.tokenizers_dir={tmp_path}",
        f"paths.log_dir={tmp_path}",
        "tokenizer=dall_e",
    ]
    problems = _problems([*overrides, f"tokenizer.decoder_path={tmp_path}/nope.pkl"])
    assert "tokenizer decoder" in problems and "decoder file" in problems["tokenizer decoder"]
    assert "tokenizer" not in problems
    assert "tokenizer decoder" not in _problems([*overrides, f"tokenizer.decoder_path={enc}"])


@pytest.mark.parametrize(
    "override,expected",
    [
        ("trainer.max_step=5", "use +trainer.max_step=5. Key 'max_step' is not in struct"),
        (
            "+experiment=nope",
            "Could not find 'experiment/nope'. Available options in "
            "'experiment': beit_base, beit_base_ft1k",
        ),
    ],
)
def test_an_override_that_does_not_compose_is_one_line(override, expected, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="bitrain.doctor"):
        assert doctor.main([override]) == 1
    (record,) = caplog.records
    assert "\n" not in record.getMessage() and expected in record.getMessage()


@pytest.mark.slow  # python -m bitrain.doctor in a subprocess (in-process: the test above)
def test_the_command_line_prints_no_traceback_for_a_bad_override():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "bitrain.doctor", "trainer.max_step=5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = (done.stdout + done.stderr).strip()
    assert done.returncode == 1 and len(out.splitlines()) == 1 and "Traceback" not in out, out


def test_a_fresh_start_over_an_earlier_run_is_reported(tmp_path, tokenizers_dir):
    run = tmp_path / "pretrain" / "exp1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    base = [f"paths.tokenizers_dir={tokenizers_dir}", f"paths.log_dir={tmp_path}",
            "paths.run_name=exp1"]  # fmt: skip
    problems = _problems(base)
    assert set(problems) == {"run dir"}
    assert "checkpoints/last.ckpt" in problems["run dir"]
    assert "ckpt_path=auto" in problems["run dir"]
    assert _problems([*base, "ckpt_path=auto"]) == {}
    assert _problems([*base[:2], "paths.run_name=exp2"]) == {}


def test_loader_speed_is_measured_and_a_slow_loader_warned(tmp_path, tokenizers_dir, caplog):
    """Issue 17: workers x measured images/s per worker against what a device consumes."""
    from PIL import Image

    root = tmp_path / "images" / "a"
    root.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (64, 48), (i * 40, 10, 10)).save(root / f"{i}.jpg")
    base = [
        f"paths.tokenizers_dir={tokenizers_dir}",
        f"paths.log_dir={tmp_path / 'out'}",
        "data=image_folder",
        f"data.source.root={tmp_path / 'images'}",
    ]
    checks = {c.name: c for c in doctor.run_checks(doctor.compose_config(base))}
    assert "not checked" in checks["loader"].detail  # a CPU run consumes what it gets
    slow = doctor.run_checks(
        doctor.compose_config([*base, "data.num_workers=2", "+doctor.img_s_per_device=1e9"])
    )
    loader = next(c for c in slow if c.name == "loader")
    assert loader.ok and loader.warn  # a warning, not a failure
    assert "2 worker(s) x" in loader.detail and "the device needs 1000000000" in loader.detail
    assert "--max-side" in loader.detail
    with caplog.at_level("INFO", logger="bitrain.doctor"):
        assert doctor.main([*base, "data.num_workers=2", "+doctor.img_s_per_device=1e9"]) == 0
    assert "[warn] loader" in caplog.text and "1 warning(s)" in caplog.text
    fast = doctor.run_checks(
        doctor.compose_config([*base, "data.num_workers=null", "+doctor.img_s_per_device=1"])
    )
    loader = next(c for c in fast if c.name == "loader")
    assert loader.ok and not loader.warn
    from bitrain.data.datamodule import default_num_workers

    assert loader.detail.startswith(f"{default_num_workers(1)} worker(s) x")


def test_uint8_views_without_task_normalization_are_a_problem(tmp_path, tokenizers_dir):
    """uint8 views (TwoViewTransform's default) need task.normalization; float ones do not."""
    base = [f"paths.tokenizers_dir={tokenizers_dir}", f"paths.log_dir={tmp_path / 'out'}"]
    checks = {c.name: c for c in doctor.run_checks(doctor.compose_config(base))}
    assert checks["views"].ok and "uint8 views, normalised on the device" in checks["views"].detail
    assert "0.309" in checks["views"].detail  # the demo's mean, taken from data.transform
    no_norm = ["task.normalization.mean=null", "task.normalization.std=null"]
    problems = _problems([*base, *no_norm])
    assert "task.normalization has no mean/std" in problems["views"]
    assert "views" not in _problems([*base, *no_norm, "+data.transform.output_dtype=float32"])
    other = doctor.run_checks(
        doctor.compose_config([*base, "task.normalization.mean=[0.5,0.5,0.5]"])
    )
    (views,) = [c for c in other if c.name == "views"]
    assert views.ok and views.warn and "not the data.transform's mean" in views.detail
