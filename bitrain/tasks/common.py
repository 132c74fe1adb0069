"""What the training tasks share: plain hyper-parameters and the non-finite loss guard."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["NonFiniteGuard", "batch_statistics", "plain"]

log = logging.getLogger("bitrain.tasks")


def plain(cfg: Any) -> Any:
    """A Hydra/OmegaConf node as plain, resolved Python containers (anything else unchanged)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def batch_statistics(batch: Mapping[str, torch.Tensor]) -> str:
    """One line describing a batch's image tensors: finite min/max/mean and non-finite counts."""
    parts = []
    for key in ("images", "tokenizer_images"):
        x = batch.get(key)
        if not isinstance(x, torch.Tensor):
            continue
        x = x.detach().float()
        finite = torch.isfinite(x)
        bad = int((~finite).sum())
        vals = x[finite]
        if vals.numel():
            lo, hi, mean = vals.min().item(), vals.max().item(), vals.mean().item()
            rng = f"min {lo:.4g} max {hi:.4g} mean {mean:.4g}"
        else:
            rng = "no finite values"
        parts.append(f"{key} {tuple(x.shape)} {rng}, {bad} non-finite of {x.numel()}")
    return "; ".join(parts) or "no image tensors in the batch"


class NonFiniteGuard:
    """Skip, count and report training steps whose loss is NaN/inf (a LightningModule mixin).

    The module needs ``self.model``, ``self.nonfinite_steps`` and ``self.max_nonfinite_steps``.
    It also logs the training throughput (:meth:`_log_throughput`).
    """

    _t_last: float | None = None

    def _log_throughput(self, batch_size: int) -> None:
        """Log ``train/images_per_sec``: images x world size over the time since the last step."""
        now = time.perf_counter()
        if self._t_last is not None:
            world = self.trainer.world_size if self._trainer is not None else 1
            rate = batch_size * world / max(now - self._t_last, 1e-9)
            self.log("train/images_per_sec", rate, batch_size=batch_size)
        self._t_last = now

    def _skip_nonfinite(
        self, loss: torch.Tensor, batch: Mapping[str, torch.Tensor], bs: int
    ) -> torch.Tensor | None:
        """Count a NaN/inf loss, warn with the batch's statistics, and skip (or stop the run).

        Returns ``None`` (Lightning then skips backward; the optimizer step finds no gradients).
        Under DDP Lightning refuses ``None``, so a zero loss tied to every trainable parameter is
        returned instead: the gradient all-reduce still matches and this rank contributes zeros.

        Raises:
            FloatingPointError: more than ``max_nonfinite_steps`` steps had a non-finite loss.
        """
        self.nonfinite_steps += 1
        step, stats = self.global_step, batch_statistics(batch)
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=bs)
        if self.nonfinite_steps > self.max_nonfinite_steps:
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {step}: {self.nonfinite_steps} steps "
                f"with a non-finite loss exceed task.max_nonfinite_steps="
                f"{self.max_nonfinite_steps}. Batch: {stats}. Check the data for NaN/inf, lower "
                "optim.lr, or use a gradient clip / bf16 instead of fp16"
            )
        log.warning(
            "non-finite training loss (%s) at step %d: step skipped (%d of at most %d). Batch: %s",
            loss.item(),
            step,
            self.nonfinite_steps,
            self.max_nonfinite_steps,
            stats,
        )
        if self._trainer is not None and self.trainer.world_size > 1:
            params = [p for p in self.model.parameters() if p.requires_grad]
            return torch.stack([p.sum() for p in params]).sum() * 0.0
        return None
