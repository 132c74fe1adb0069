"""bitrain.training.loggers.CSVLogger: a resumed run continues metrics.csv, not deletes it."""

import csv

from bitrain.training.loggers import CSVLogger


def _steps(path):
    with open(path, newline="") as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


def test_resumed_run_keeps_rows_before_its_step_and_drops_the_rest(tmp_path):
    first = CSVLogger(tmp_path, name="", version="")
    for step in range(6):
        first.log_metrics({"loss": float(step)}, step=step)
    first.save()
    # Killed after step 5, last checkpoint at step 3: the resumed run logs step 3 again.
    resumed = CSVLogger(tmp_path, name="", version="")
    resumed.log_metrics({"loss": 30.0, "acc": 0.5}, step=3)
    resumed.log_metrics({"loss": 40.0, "acc": 0.6}, step=4)
    resumed.save()
    assert _steps(tmp_path / "metrics.csv") == [
        (0, "0.0"),
        (1, "1.0"),
        (2, "2.0"),
        (3, "30.0"),
        (4, "40.0"),
    ]
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert set(csv.DictReader(f).fieldnames) == {"step", "loss", "acc"}


def test_fresh_directory_behaves_like_lightning(tmp_path):
    logger = CSVLogger(tmp_path, name="", version="")
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.save()
    assert _steps(tmp_path / "metrics.csv") == [(0, "1.0")]


def test_wandb_run_id_is_kept_in_the_run_dir(tmp_path, monkeypatch):
    from bitrain.training.loggers import wandb_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    first = wandb_logger(save_dir=str(tmp_path), project="p", offline=True)
    saved = (tmp_path / "wandb_run_id").read_text().strip()
    assert saved and first.version == saved
    again = wandb_logger(save_dir=str(tmp_path), project="p", offline=True)
    assert again.version == saved
    other = wandb_logger(save_dir=str(tmp_path / "other"), project="p", offline=True)
    assert other.version != saved
