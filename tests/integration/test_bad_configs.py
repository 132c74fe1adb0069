"""Configurations that cannot work are refused at start-up, with a message naming the keys."""

import os
import subprocess
import sys

import pytest

from bitrain.training import runner

CASES = [
    (["masking.num_masking_patches=100"], r"num_masking_patches .*\[0, 16\].*4x4 grid"),
    (["masking.num_masking_patches=0"], r"num_masking_patches=0 masks no patch.*at least one"),
    (["model.img_size=64"], r"tokenizer grid \(4, 4\) != model patch grid \(8, 8\)"),
    (["model.vocab_size=1000"], r"model.vocab_size=1000 != tokenizer.vocab_size=512"),
    (["data.batch_size=0"], r"batch_size must be a positive integer, got 0"),
    (["tokenizer.input_size=64"], r"input_size=64 in the config but 32 in the file"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[c[0][0] for c in CASES])
def test_refused_at_build(compose_cfg, demo_tokenizer_file, tmp_path, overrides, message):
    cfg = compose_cfg(
        "pretrain", [*overrides, f"tokenizer.weights_path={demo_tokenizer_file}"], tmp_path
    )
    with pytest.raises(Exception, match=message):
        runner.build(cfg)


@pytest.mark.slow
def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    """From the command line (an unknown key of any node fails composing: test_configs.py)."""
    override = "data.batch_sise=8"
    proc = subprocess.run(
        [sys.executable, "-m", "bitrain.pretrain", override, f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
        timeout=300,
    )
    assert proc.returncode != 0
    key = override.split("=")[0].split(".")[-1]
    assert f"Key '{key}' is not in struct" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_resuming_a_checkpoint_of_another_model_shape_lists_the_keys(
    compose_cfg, demo_tokenizer_file, tmp_path
):
    common = [
        f"tokenizer.weights_path={demo_tokenizer_file}",
        "data.batch_size=8",
        "trainer.max_steps=1",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "callbacks.panels=null",
    ]
    small = tmp_path / "small"
    runner.train(compose_cfg("pretrain", [*common, "model.embed_dim=96"], small))
    ckpt = small / "checkpoints" / "last.ckpt"
    cfg = compose_cfg("pretrain", [*common, "trainer.max_steps=2", f"ckpt_path={ckpt}"], tmp_path)
    with pytest.raises(RuntimeError, match=r"size mismatch for model\.cls_token"):
        runner.train(cfg)


def test_every_missing_input_is_named_at_once(compose_cfg, tmp_path):
    """+experiment=beit_base with neither its images nor encoder.pkl: both named, one error."""
    images, encoder = tmp_path / "imagenet" / "train", tmp_path / "dall_e" / "encoder.pkl"
    cfg = compose_cfg(
        "pretrain",
        [
            "+experiment=beit_base",
            f"data.source.root={images}",
            f"tokenizer.weights_path={encoder}",
        ],
        tmp_path / "run",
    )
    with pytest.raises(runner.StartupError) as err:
        runner.build(cfg)
    msg = str(err.value)
    assert msg.startswith("2 problems stop this run before it starts"), msg
    assert f"data.source: ImageFolderSource root '{images}' does not exist" in msg, msg
    assert f"expected a file at '{encoder}'" in msg and "python -m bitrain.doctor" in msg, msg
