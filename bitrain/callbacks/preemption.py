"""Stopping cleanly on SIGTERM and Ctrl-C: a checkpoint of the last finished step, then exit.

* **SIGTERM** (SLURM's preemption/time limit, ``kill``, Kubernetes, torchrun's agent): Lightning's
  signal connector notes the signal and stops at the end of the current training batch with
  ``SIGTERMException``; :class:`PreemptionCheckpoint` then writes ``checkpoints/last.ckpt``
  (atomically, like every checkpoint) so nothing after the previous periodic checkpoint is lost,
  and the process exits with status 143 (128 + SIGTERM) instead of 0, so a scheduler sees an
  interrupted job, not a finished one (:func:`exit_code_for`).
* **Ctrl-C** (SIGINT) during training is handled the same way (exit status 130); a second Ctrl-C
  stops at once.
* **SIGUSR1** inside SLURM (``#SBATCH --signal=USR1@180``): Lightning's own auto-requeue saves
  ``hpc_ckpt_N.ckpt`` in the run directory and requeues the job with ``scontrol``;
  :func:`bitrain.training.resume.resolve_ckpt_path` counts those files as candidates for ``auto``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["SIGTERM_EXIT_CODE", "PreemptionCheckpoint", "exit_code_for"]

log = logging.getLogger(__name__)

SIGTERM_EXIT_CODE = 128 + int(signal.SIGTERM)


def exit_code_for(err: BaseException, signum: int | None = None) -> int | None:
    """Exit status for an exception that ended training: 128 + the signal, else ``None``.

    Args:
        err: what ``Trainer.fit`` raised.
        signum: the signal that stopped training (:attr:`PreemptionCheckpoint.signum`); SIGTERM
            when not known.
    """
    if not isinstance(err, SIGTERMException):
        return None
    return 128 + int(signum or signal.SIGTERM)


class PreemptionCheckpoint(L.Callback):
    """Write ``last.ckpt`` when training stops on SIGTERM or Ctrl-C, at a batch boundary.

    SIGTERM is noted by Lightning's signal connector. Ctrl-C (SIGINT) would raise
    ``KeyboardInterrupt`` wherever the process happens to be (inside an optimizer step, say) and
    Lightning would exit without a checkpoint; during training this callback handles it as
    Lightning handles SIGTERM instead: the run stops at the end of the current batch, the state is
    consistent, and the checkpoint is written. A second Ctrl-C stops at once (no checkpoint).

    Args:
        dirpath: the run's checkpoint directory (``ModelCheckpoint``'s).
        filename: file name of the checkpoint (``last.ckpt``: what ``ckpt_path=auto`` tries first).
    """

    def __init__(self, dirpath: str | os.PathLike, filename: str = "last.ckpt") -> None:
        super().__init__()
        self.path = Path(dirpath) / filename
        self.saved: Path | None = None
        self.signum: int | None = None  # the signal that stopped training
        self._previous_sigint: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._previous_sigint = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:
            if self.signum is not None:  # the second Ctrl-C: stop now
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.signum = int(signal.SIGINT)
            trainer._signal_connector.received_sigterm = True  # stop as on SIGTERM
            log.warning(
                "Ctrl-C: stopping after this training step to write a checkpoint of it "
                "(press Ctrl-C again to stop at once, without one)"
            )

        signal.signal(signal.SIGINT, on_sigint)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self.signum = self.signum or int(signal.SIGTERM)
        # Every rank calls it; the strategy writes on rank 0. The full state (optimizer, loops).
        trainer.save_checkpoint(self.path, weights_only=False)
        self.saved = self.path
        what = "Ctrl-C" if self.signum == signal.SIGINT else "SIGTERM"
        log.warning(
            "%s: checkpoint of step %d written to %s. Resume with the same command and "
            "ckpt_path=auto hydra.run.dir=%s (or the same paths.run_name / SLURM job), or "
            "ckpt_path=%s",
            what,
            trainer.global_step,
            self.path,
            trainer.default_root_dir,
            self.path,
        )
