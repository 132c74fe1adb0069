"""Loggers for runs that are resumed in their own directory (``ckpt_path=auto``, requeue).

* :func:`wandb_logger`: Lightning's ``WandbLogger`` whose run id is kept in the run directory
  (``wandb_run_id`` file), so a resumed run continues the same wandb run (``resume="allow"``)
  instead of starting a new one.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when a new run starts in the same
directory, so a preempted-and-resumed run would lose the curve before the preemption.
:class:`CSVLogger` keeps it: rows of the previous attempt are kept up to the step the run resumes
from, rows at or after it (logged after the checkpoint, then lost with the killed process's
state) are dropped when the resumed run logs its first metrics, and new rows are appended. The
file then reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter as _LightningWriter

__all__ = ["CSVLogger", "wandb_logger"]

RUN_ID_FILE = "wandb_run_id"

log = logging.getLogger(__name__)


class _ResumableWriter(_LightningWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep an existing ``metrics.csv`` (Lightning's writer deletes it)."""
        self._resumed = self._fs.isfile(self.metrics_file_path)
        if self._resumed:
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        if getattr(self, "_resumed", False) and step is not None:
            self._drop_rows_from(int(step))
        self._resumed = False
        super().log_metrics(metrics_dict, step)

    def _drop_rows_from(self, step: int) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
        if len(kept) == len(rows):
            return
        log.info(
            "metrics.csv: continuing a previous run at step %d, dropping %d rows logged after "
            "its checkpoint",
            step,
            len(rows) - len(kept),
        )
        tmp = self.metrics_file_path + ".tmp"
        with self._fs.open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.metrics_file_path)


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` that continues an existing ``metrics.csv`` (module docstring)."""

    @property
    def experiment(self) -> _LightningWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_logger(save_dir: str, id: str | None = None, **kwargs: Any) -> WandbLogger:
    """``WandbLogger(save_dir=..., id=..., resume="allow", **kwargs)`` with a run id that persists.

    Args:
        save_dir: the run directory; the id is read from / written to ``save_dir/wandb_run_id``.
        id: an explicit wandb run id (else the saved one, else a new one).
        **kwargs: further ``WandbLogger`` arguments (project, name, offline, log_model, ...).
    """
    path = Path(save_dir) / RUN_ID_FILE
    if id is None and path.is_file():
        id = path.read_text().strip() or None
        if id:
            log.info("wandb: continuing run %s (from %s)", id, path)
    if id is None:
        id = uuid.uuid4().hex[:12]  # wandb ids: lowercase letters and digits
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(id + "\n")
    kwargs.setdefault("resume", "allow")
    return WandbLogger(save_dir=save_dir, id=id, **kwargs)
