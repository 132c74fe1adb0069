"""bitrain.tasks.tokenizer: the dVAE training LightningModule, with a plain lightning.Trainer."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from bitrain.io import load_torch_file
from bitrain.tasks.tokenizer import DVAETraining, batch_images, temperature_at
from bitrain.tokenizers.dvae import DVAETokenizer

TINY_MODEL = {
    "_target_": "bitrain.tokenizers.dvae.DiscreteVAE",
    "vocab_size": 32,
    "input_size": 16,
    "num_downsamples": 2,
    "hidden_dim": 16,
    "num_res_blocks": 1,
    "codebook_dim": 8,
}
OPTIM = {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 2}


def _task(tmp_path, **kwargs) -> DVAETraining:
    return DVAETraining(TINY_MODEL, OPTIM, weights_path=str(tmp_path / "tok.pt"), **kwargs)


def _loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    x = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x), batch_size=batch_size)


def _trainer(tmp_path, max_steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_temperature_schedule():
    assert temperature_at(0, 100, 1.0, 1 / 16) == pytest.approx(1.0)
    assert temperature_at(50, 100, 1.0, 1 / 16) == pytest.approx(0.25)  # geometric midpoint
    assert temperature_at(100, 100, 1.0, 1 / 16) == pytest.approx(1 / 16)
    assert temperature_at(500, 100, 1.0, 1 / 16) == pytest.approx(1 / 16)
    values = [temperature_at(s, 100, 1.0, 1 / 16) for s in range(101)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_batch_images_formats():
    x = torch.zeros(2, 3, 4, 4)
    assert batch_images({"images": x}) is x and batch_images([x, 1]) is x and batch_images(x) is x
    with pytest.raises(KeyError, match="'images'"):
        batch_images({"pixels": x})


def test_hyperparameters_are_plain_and_model_built(tmp_path):
    task = DVAETraining(
        OmegaConf.create(TINY_MODEL), OmegaConf.create(OPTIM), weights_path=str(tmp_path / "t.pt")
    )
    assert type(task.hparams["model"]) is dict and type(task.hparams["optim"]) is dict
    assert task.model.grid_size == (4, 4) and task.hparams.kl_weight == 1e-3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"temperature_end": 0.0}, ValueError, "temperatures"),
        ({"kl_weight": -1.0}, ValueError, "kl_weight"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        _task(tmp_path, **kwargs)


def test_model_must_be_a_dvae(tmp_path):
    with pytest.raises(TypeError, match="DiscreteVAE"):
        DVAETraining({"_target_": "torch.nn.Identity"}, OPTIM, str(tmp_path / "t.pt"))


def test_fit_logs_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    task = _task(tmp_path, stats_max_batches=None)
    _trainer(tmp_path, max_steps=6).fit(task, train_dataloaders=_loader())

    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = {k for row in rows for k, v in row.items() if v not in ("", None)}
    for key in (
        "train/loss",
        "train/recon_loss",
        "train/kl",
        "train/temperature",
        "train/codebook_usage",
        "train/perplexity",
        "train/codebook_usage_epoch",
        "final/codebook_usage",
        "final/perplexity",
        "final/recon_loss",
    ):
        assert key in keys, key
    temps = [float(r["train/temperature"]) for r in rows if r.get("train/temperature")]
    assert temps[0] == pytest.approx(1.0) and temps == sorted(temps, reverse=True)

    blob = load_torch_file(tmp_path / "tok.pt")
    stats = blob["stats"]
    assert stats["steps"] == 6 and stats["images"] == 16
    assert 0 < stats["codebook_usage"] <= 1 and 1 <= stats["perplexity"] <= 32
    assert stats["temperature_end"] == pytest.approx(1 / 16)
    assert math.isfinite(stats["recon_loss"]) and stats == task.final_stats

    # The written file is the trained model: a fresh tokenizer gives the same ids.
    tok = DVAETokenizer(tmp_path / "tok.pt")
    x = next(iter(_loader()))[0]
    task.model.eval()
    assert torch.equal(tok.encode(x), task.model.encode_logits(x).argmax(1))


def test_anneal_steps_override(tmp_path):
    task = _task(tmp_path, temperature_anneal_steps=2)
    _trainer(tmp_path, max_steps=4).fit(task, train_dataloaders=_loader())
    assert task.temperature == pytest.approx(1 / 16)


def test_training_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    # Structured images (flat colour + square) that a 4x4 code grid can reconstruct.
    x = torch.rand(4, 3, 1, 1, generator=torch.Generator().manual_seed(1)).expand(4, 3, 16, 16)
    x = x.clone()
    for i in range(4):
        x[i, :, 4 * i : 4 * i + 6, 2:8] = 1.0
    loader = DataLoader(TensorDataset(x), batch_size=4)
    optim = {"lr": 3e-3, "min_lr": 3e-3, "weight_decay": 0.0}  # constant lr
    task = DVAETraining(TINY_MODEL, optim, str(tmp_path / "t.pt"), 0.5, 0.5)  # fixed tau
    _trainer(tmp_path, max_steps=40).fit(task, train_dataloaders=loader)
    with open(tmp_path / "metrics.csv", newline="") as f:
        recon = [float(r["train/recon_loss"]) for r in csv.DictReader(f) if r["train/recon_loss"]]
    assert len(recon) == 40
    assert sum(recon[-5:]) < 0.8 * sum(recon[:5]), recon[::5]  # seeded: 0.72 measured
