"""Running on clusters: run directories that survive a requeue, and a checkpoint on SIGTERM.

* **Run directory.** ``hydra.run.dir`` is ``outputs/<task>/<run name>`` where the run name is, in
  order: ``paths.run_name`` when given; ``slurm-<job id>`` (``<array job>_<task>`` for array jobs)
  inside a SLURM job, so a requeued job finds its own directory and ``ckpt_path=auto`` resumes it;
  else ``<date>/<time>`` of the start (``${run_dir:...}`` resolver, below).
* **SIGTERM** (SLURM's preemption/time limit, ``kill``, Kubernetes, torchrun's agent): Lightning's
  signal connector notes the signal and stops at the end of the current training batch with
  ``SIGTERMException``; :class:`PreemptionCheckpoint` then writes ``checkpoints/last.ckpt``
  (atomically, like every checkpoint) so nothing after the previous periodic checkpoint is lost,
  and the process exits with status 143 (128 + SIGTERM) instead of 0, so a scheduler sees an
  interrupted job, not a finished one (:func:`exit_code_for`).
* **SIGUSR1** inside SLURM (``#SBATCH --signal=USR1@180``): Lightning's own auto-requeue saves
  ``hpc_ckpt_N.ckpt`` in the run directory and requeues the job with ``scontrol``;
  :func:`bitrain.runner.resolve_ckpt_path` counts those files as candidates for ``auto``.
"""

from __future__ import annotations

import logging
import os
import signal
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

__all__ = [
    "PreemptionCheckpoint",
    "SIGTERM_EXIT_CODE",
    "exit_code_for",
    "run_dir_name",
    "slurm_job_id",
]

log = logging.getLogger(__name__)

SIGTERM_EXIT_CODE = 128 + int(signal.SIGTERM)
_START = datetime.now()  # one timestamp per process, however often the run dir is resolved


def slurm_job_id(environ: dict[str, str] | None = None) -> str | None:
    """The SLURM job id (``<array job id>_<task id>`` for array jobs), ``None`` outside SLURM.

    Interactive allocations (``SLURM_JOB_NAME`` ``bash``/``interactive``) count as no job, as
    Lightning does, so a shell on a compute node does not pin every run to one directory.
    """
    env = os.environ if environ is None else environ
    if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return env.get("SLURM_JOB_ID") or None


def run_dir_name(run_name: Any = None, environ: dict[str, str] | None = None) -> str:
    """The run directory's name under ``outputs/<task>/`` (see the module docstring)."""
    if run_name not in (None, "", "null"):
        name = str(run_name)
        if name.startswith("/") or ".." in Path(name).parts:
            raise ValueError(f"paths.run_name={name!r} must be a relative name without '..'")
        return name
    job = slurm_job_id(environ)
    if job:
        return f"slurm-{job}"
    return _START.strftime("%Y-%m-%d/%H-%M-%S")


OmegaConf.register_new_resolver("run_dir", lambda name=None: run_dir_name(name), replace=True)


def exit_code_for(err: BaseException) -> int | None:
    """Exit status for an exception that ended training: 143 for SIGTERM, else ``None``."""
    return SIGTERM_EXIT_CODE if isinstance(err, SIGTERMException) else None


class PreemptionCheckpoint(L.Callback):
    """Write ``last.ckpt`` when training stops on SIGTERM (at a batch boundary, state consistent).

    Args:
        dirpath: the run's checkpoint directory (``ModelCheckpoint``'s).
        filename: file name of the checkpoint (``last.ckpt``: what ``ckpt_path=auto`` tries first).
    """

    def __init__(self, dirpath: str | os.PathLike, filename: str = "last.ckpt") -> None:
        super().__init__()
        self.path = Path(dirpath) / filename
        self.saved: Path | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        trainer.save_checkpoint(self.path)  # every rank calls it; the strategy writes on rank 0
        self.saved = self.path
        log.warning(
            "SIGTERM: checkpoint of step %d written to %s; resume with ckpt_path=auto "
            "(same paths.run_name / SLURM job) or ckpt_path=%s",
            trainer.global_step,
            self.path,
            self.path,
        )
