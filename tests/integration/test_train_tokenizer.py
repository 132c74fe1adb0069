"""Tokenizer training end to end on CPU: the demo config trains, writes a file pretraining loads."""

import csv
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from bitrain.io import load_torch_file
from bitrain.tokenizers.dvae import DVAETokenizer
from bitrain.training import runner

pytestmark = pytest.mark.slow

FAST = [
    "data.num_workers=0",
    "data.batch_size=16",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]
ROOT = Path(__file__).resolve().parents[2]


def test_demo_config_trains_a_tokenizer_pretraining_loads(compose_cfg, tmp_path):
    weights = tmp_path / "tokenizers" / "demo_dvae.pt"
    cfg = compose_cfg(
        "train_tokenizer",
        [*FAST, "trainer.max_steps=5", f"paths.tokenizers_dir={tmp_path / 'tokenizers'}"],
        tmp_path / "run",
    )
    assert cfg.task.weights_path == str(weights)
    summary = runner.train(cfg)
    assert summary["global_step"] == 5

    blob = load_torch_file(weights)
    assert blob["format"] == "bitrain-dvae" and blob["stats"]["steps"] == 5
    assert 0 < blob["stats"]["codebook_usage"] <= 1 and blob["stats"]["images"] > 0
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        header = next(csv.reader(f))
    assert {"train/loss", "train/codebook_usage", "final/perplexity"} <= set(header)

    # The pretraining config's tokenizer node builds it (sizes checked against the file).
    pre = compose_cfg("pretrain", [f"paths.tokenizers_dir={tmp_path / 'tokenizers'}"], tmp_path)
    tok = hydra.utils.instantiate(OmegaConf.to_container(pre.tokenizer, resolve=True))
    assert isinstance(tok, DVAETokenizer) and tok.grid_size == (4, 4)
    ids = tok.encode(torch.rand(2, 3, 32, 32))
    assert ids.shape == (2, 4, 4) and int(ids.max()) < 512


def test_entry_point_runs_from_the_command_line(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "bitrain.train_tokenizer",
        *FAST,
        "trainer.max_steps=2",
        f"paths.tokenizers_dir={tmp_path / 'tok'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "tok" / "demo_dvae.pt").is_file()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
