"""bitrain.callbacks.progress: which display is chosen, the lines LineProgress prints, its img/s."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from torch.utils.data import DataLoader

from bitrain.callbacks.progress import LineProgress, format_duration, progress_bar
from bitrain.tasks.common import ImageRate


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch["images"]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch["images"]).pow(2).mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    data = [{"images": torch.randn(4)} for _ in range(24)]
    return DataLoader(data, batch_size=3)


def test_styles():
    assert isinstance(progress_bar("rich"), RichProgressBar)
    assert isinstance(progress_bar("tqdm"), TQDMProgressBar)
    assert isinstance(progress_bar("lines", every_n_steps=7), LineProgress)
    assert progress_bar("rich", enabled=False) is None
    # pytest captures stdout: not a terminal, so "auto" prints lines.
    assert isinstance(progress_bar("auto"), LineProgress)
    with pytest.raises(ValueError, match="style"):
        progress_bar("fancy")
    with pytest.raises(ValueError, match="every_n_steps"):
        LineProgress(every_n_steps=0)


def test_format_duration():
    assert format_duration(59) == "0:59"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(float("nan")) == "?"


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    """A CPU Trainer with LineProgress every 2 steps and nothing else."""
    return L.Trainer(
        callbacks=[LineProgress(every_n_steps=2)],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        **kwargs,
    )


def test_line_progress_prints_one_line_per_n_steps(tmp_path, capsys):
    trainer = _trainer(
        tmp_path, max_steps=8, val_check_interval=4, num_sanity_val_steps=0, limit_val_batches=2
    )
    trainer.fit(_Tiny(), train_dataloaders=_loader(), val_dataloaders=_loader())
    out = capsys.readouterr().out.splitlines()
    steps = [line for line in out if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["2/8", "4/8", "6/8", "8/8"]
    assert all("train/loss" in line and "img/s" in line and "ETA" in line for line in steps)
    assert not any("val/loss" in line for line in steps)
    vals = [line for line in out if line.startswith("validation at step")]
    assert len(vals) == 2 and all("val/loss" in line for line in vals)
    assert out[-1].startswith("training done at step 8")
    assert not any("\r" in line for line in out)


def test_line_progress_prints_the_rate_of_image_rate(tmp_path, capsys, monkeypatch):
    """The img/s of the lines is ImageRate's (the definition of train/images_per_sec)."""
    monkeypatch.setattr(ImageRate, "rate", lambda self: 4321.0)
    trainer = _trainer(tmp_path, max_steps=4, limit_val_batches=0)
    trainer.fit(_Tiny(), train_dataloaders=_loader())
    steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and all("| 4321 img/s |" in line for line in steps), steps
