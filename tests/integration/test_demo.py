"""`python -m bitrain.demo` from a fresh directory: stages, outputs and its summary figures."""

import os
import subprocess
import sys

import pytest
import torch

from bitrain.tokenizers.dvae import DiscreteVAE, save_dvae

pytestmark = pytest.mark.slow


def test_demo_runs_from_any_directory_and_reports(tmp_path):
    # A ready tokenizer, so the demo skips its (minute-long) training stage.
    torch.manual_seed(0)
    stats = {"codebook_usage": 0.5, "perplexity": 100.0}
    save_dvae(
        DiscreteVAE(vocab_size=512, input_size=32, num_downsamples=3),
        tmp_path / "tokenizers" / "demo_dvae.pt",
        stats=stats,
    )
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        "-m",
        "bitrain.demo",
        "trainer.max_steps=12",
        "data.batch_size=16",
        "trainer.check_val_every_n_epoch=1",
        "+trainer.limit_train_batches=6",
        "+trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "finetune.trainer.max_steps=4",
        "finetune.trainer.check_val_every_n_epoch=1",
        "finetune.+trainer.limit_val_batches=2",
        "finetune.trainer.enable_progress_bar=false",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "bitrain demo summary" in out
    assert "50.0% of codes used" in out
    assert "(the existing file; delete it to retrain)" in out  # not "trained in 0 s"
    assert "MIM loss" in out and "held out" in out
    runs = list((tmp_path / "outputs" / "pretrain").glob("*/*"))
    assert len(runs) == 1
    run = runs[0]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "metrics.csv").is_file()
    assert list((run / "wandb").glob("offline-run-*")), "no offline wandb run"
    # Fine-tuned twice, same steps and seed: from the MIM checkpoint and from scratch.
    assert "from MIM" in out and "from scratch" in out and "gap" in out
    ft = sorted(
        p.name.split("-", 3)[-1] for p in (tmp_path / "outputs" / "finetune").glob("*/*-seed0")
    )
    assert ft == ["pretrained-seed0", "scratch-seed0"], ft
    for ft_run in (tmp_path / "outputs" / "finetune").glob("*/*-seed0"):
        assert (ft_run / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "outputs" / "finetune").glob("*/*-report/report.md"))


def test_pretrain_without_demo_tokenizer_says_how_to_get_one(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "bitrain.pretrain"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    err = proc.stderr
    assert "demo_dvae.pt" in err and "train_tokenizer" in err
