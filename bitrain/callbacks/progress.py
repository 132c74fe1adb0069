"""Progress display: a live bar on a terminal, one log line per N steps everywhere else.

A week-long job's log (SLURM ``.out`` file, CI output) should read like a table, not like a
carriage-return animation. :func:`progress_bar` (the ``callbacks.progress_bar`` node of every
config) picks:

* an interactive terminal: Lightning's ``RichProgressBar`` (``TQDMProgressBar`` without ``rich``);
* anything else (a file, a pipe, SLURM, CI): :class:`LineProgress`, which prints one line every
  ``every_n_steps`` optimizer steps with the step, the epoch, every metric logged with
  ``prog_bar=True`` (loss, masked accuracy / top-1, lr), images per second and the ETA, and one
  line per validation with its metrics.

``style=rich|tqdm|lines`` forces a choice. Only rank 0 prints.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from typing import Any

import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException

from bitrain.tasks.common import ImageRate

__all__ = ["LineProgress", "format_duration", "progress_bar"]

log = logging.getLogger("bitrain.callbacks.progress")

STYLES = ("auto", "rich", "tqdm", "lines")


def progress_bar(
    style: str = "auto", every_n_steps: int = 50, refresh_rate: int = 1, enabled: bool = True
) -> ProgressBar | None:
    """The progress callback for this process's output (see the module docstring).

    Args:
        style: ``auto`` (bar on a terminal, lines otherwise), ``rich``, ``tqdm`` or ``lines``.
        every_n_steps: steps between two lines of :class:`LineProgress`.
        refresh_rate: batches between two refreshes of a live bar.
        enabled: ``False`` (``trainer.enable_progress_bar=false``): no progress callback at all.
    """
    if not enabled:
        return None
    if style not in STYLES:
        raise ValueError(f"callbacks.progress_bar.style={style!r}: choose one of {STYLES}")
    if style == "auto":
        style = "rich" if _is_terminal() else "lines"
    if style == "rich":
        try:
            return RichProgressBar(refresh_rate=refresh_rate)
        except ModuleNotFoundError:  # rich is optional in Lightning
            style = "tqdm"
    if style == "tqdm":
        return TQDMProgressBar(refresh_rate=refresh_rate)
    return LineProgress(every_n_steps=every_n_steps)


def _is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1:02:05"``; ``59`` -> ``"0:59"``; unknown -> ``"?"``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _format_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class LineProgress(ProgressBar):
    """A progress "bar" for logs: one line per ``every_n_steps`` steps and one per validation.

    Example line::

        step 150/300 (50%) epoch 14 | train/loss 4.61 train/mim_acc 0.058 lr 0.00112 |
        212 img/s | elapsed 0:51 ETA 0:51

    Images per second are measured over the steps since the previous line by
    :class:`bitrain.tasks.common.ImageRate` (images of the batches seen x world size, the definition
    of the tasks' ``train/images_per_sec``), so every task shows them.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self._enabled = True
        self._t_start = 0.0
        self._step_start = self._step_last = 0
        self._rate = ImageRate()

    # ProgressBar's small interface.
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and (self._trainer is None or self.trainer.is_global_zero)

    def _print(self, line: str) -> None:
        if self.is_enabled:
            print(line, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._t_start = time.perf_counter()
        self._step_start = self._step_last = trainer.global_step
        self._rate = ImageRate(trainer.world_size)
        self._rate.start()
        total = self._total_steps(trainer)
        self._print(
            f"training from step {trainer.global_step}"
            + (f" to {total}" if total else "")
            + f", a line every {self.every_n_steps} steps"
        )

    def _total_steps(self, trainer) -> int | None:
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001 - unknown length (iterable data without max_steps)
            return None
        return int(total) if math.isfinite(total) else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._rate.add(_batch_size(batch))
        step = trainer.global_step
        if step == self._step_last or step % self.every_n_steps:
            return
        now = time.perf_counter()
        rate = self._rate.lap()
        total = self._total_steps(trainer)
        done = step - self._step_start
        elapsed = now - self._t_start
        eta = (total - step) * elapsed / done if total and done > 0 else float("nan")
        where = f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"
        metrics = self._metrics(trainer, pl_module, prefix=("val/",), keep=False)
        self._print(
            f"{where} epoch {trainer.current_epoch} | {metrics} | {rate:.0f} img/s | "
            f"elapsed {format_duration(elapsed)} ETA {format_duration(eta)}"
        )
        self._step_last = step

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = self._metrics(trainer, pl_module, prefix=("val/",), keep=True)
        if metrics:
            self._print(f"validation at step {trainer.global_step} | {metrics}")

    def on_train_end(self, trainer, pl_module) -> None:
        elapsed = time.perf_counter() - self._t_start
        self._print(
            f"training done at step {trainer.global_step} in {format_duration(elapsed)} "
            f"({trainer.global_step - self._step_start} steps)"
        )

    def _metrics(self, trainer, pl_module, prefix: tuple[str, ...], keep: bool) -> str:
        """Progress-bar metrics as ``key value`` pairs: only ``prefix`` ones or all but them."""
        items = self.get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        chosen = {k: v for k, v in items.items() if k.startswith(prefix) == keep}
        return " ".join(f"{k} {_format_value(v)}" for k, v in chosen.items())

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        reason = type(exception).__name__
        if isinstance(exception, SIGTERMException):  # Lightning's stop on a signal
            signums = {getattr(c, "signum", None) for c in trainer.callbacks}
            reason = "Ctrl-C" if signal.SIGINT in signums else "SIGTERM"
        self._print(f"training stopped at step {trainer.global_step}: {reason}")


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (dicts, tuples, tensors)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            if isinstance(item, torch.Tensor) and item.ndim:
                return int(item.shape[0])
    return 0
