"""What the training tasks share: plain hyper-parameters, top-k accuracy, images/s, NaN guard."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "NONFINITE_CHECKS",
    "ImageRate",
    "NonFiniteGuard",
    "batch_statistics",
    "check_nonfinite_mode",
    "plain",
    "topk_accuracy",
]

NONFINITE_CHECKS = ("auto", "sync", "device")

log = logging.getLogger("bitrain.tasks")


def topk_accuracy(num_classes: int, k: int = 1) -> Any:
    """Top-k accuracy as ImageNet reports it: the share of images with the label in the top k.

    The label must be among the ``k`` highest logits (``k`` clipped to ``num_classes``).
    torchmetrics' ``MulticlassAccuracy`` defaults to ``average="macro"`` (the mean of per-class
    accuracies), which differs from this on any unbalanced set; ``"micro"`` is asked for here.
    """
    from torchmetrics.classification import MulticlassAccuracy

    return MulticlassAccuracy(num_classes, top_k=min(int(k), int(num_classes)), average="micro")


def check_nonfinite_mode(nonfinite_check: Any) -> str:
    """``task.nonfinite_check`` if it is one of :data:`NONFINITE_CHECKS`, else a ``ValueError``."""
    if nonfinite_check not in NONFINITE_CHECKS:
        raise ValueError(
            f"task.nonfinite_check must be one of {NONFINITE_CHECKS}, got {nonfinite_check!r}"
        )
    return nonfinite_check


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


class ImageRate:
    """Images per second of all ranks together: the one definition bitrain reports.

    ``images x world_size / wall-clock seconds`` since :meth:`start` (every rank is assumed to see
    as many images as this one, as with a ``DistributedSampler``). The tasks' per-step
    ``train/images_per_sec``, :class:`bitrain.callbacks.progress.LineProgress`'s ``img/s`` and any
    whole-pass figure (an evaluation) read it. No CUDA synchronisation: over a run the host waits
    for the device anyway, and a sync per step would stall the asynchronous NaN check
    (:class:`NonFiniteGuard`).

    Args:
        world_size: processes that each see as many images (``trainer.world_size``).
        clock: seconds as a float (``time.perf_counter``; a fake one in tests).
    """

    def __init__(self, world_size: int = 1, clock: Callable[[], float] = time.perf_counter) -> None:
        if int(world_size) < 1:
            raise ValueError(f"ImageRate: world_size must be >= 1, got {world_size}")
        self.world_size = int(world_size)
        self._clock = clock
        self._start: float | None = None
        self.images = 0

    def start(self) -> None:
        """Start a new window: no images, the clock at now."""
        self._start = self._clock()
        self.images = 0

    def add(self, images: int) -> None:
        """Count ``images`` more images of this rank."""
        self.images += int(images)

    def seconds(self) -> float:
        """Seconds since :meth:`start` (``nan`` before it)."""
        return float("nan") if self._start is None else self._clock() - self._start

    def rate(self) -> float:
        """Images per second of all ranks since :meth:`start` (``nan`` before it)."""
        elapsed = self.seconds()
        if elapsed != elapsed:  # nan: not started
            return elapsed
        return self.images * self.world_size / max(elapsed, 1e-9)

    def lap(self) -> float:
        """:meth:`rate`, then :meth:`start` a new window."""
        rate = self.rate()
        self.start()
        return rate


class NonFiniteGuard:
    """Skip, count and report training steps whose loss is NaN/inf (a LightningModule mixin).

    The module needs ``self.model``, ``self.nonfinite_steps``, ``self.max_nonfinite_steps`` and
    ``self.nonfinite_check`` (one of :data:`NONFINITE_CHECKS`); ``training_step`` ends with
    ``return self._check_loss(loss, batch, batch_size)``. Two ways to skip a bad step:

    * ``sync``: ``bool(torch.isfinite(loss))`` on the host (one device-to-host sync per step);
      a bad step returns ``None``, so Lightning runs no backward and the optimizer sees no
      gradients. Works with every optimizer and precision.
    * ``device``: no sync. The finite flag stays on the device and is handed to the optimizer as
      ``found_inf`` (what AMP's GradScaler does): torch's fused Adam/AdamW/SGD kernels then skip
      the update on the device (weights, moments and step count untouched). Under DDP the flag is
      all-reduced (max) first, so every rank skips together; with gradient accumulation a bad
      micro-batch skips the whole optimizer step. The host reads the flag later through a pinned
      copy and a CUDA event, once the GPU has got there (at most a step or two late), and counts,
      warns and stops exactly as ``sync`` does; checkpoints and the end of training wait for it.
    * ``auto`` (default): ``device`` on CUDA with a fused optimizer and without a fp16 grad scaler
      (which owns ``found_inf``), else ``sync``. On a CPU the sync costs nothing.

    It also logs the training throughput (:meth:`_log_throughput`).
    """

    _image_rate: ImageRate | None = None
    nonfinite_check: str = "auto"

    def _log_throughput(self, batch_size: int) -> None:
        """Log ``train/images_per_sec`` (:class:`ImageRate`): this step's images since the last."""
        if self._image_rate is None:
            world = self.trainer.world_size if self._trainer is not None else 1
            self._image_rate = ImageRate(world)
            self._image_rate.start()
            return
        self._image_rate.add(batch_size)
        self.log("train/images_per_sec", self._image_rate.lap(), batch_size=batch_size)

    def _check_loss(
        self, loss: torch.Tensor, batch: Mapping[str, torch.Tensor], bs: int
    ) -> torch.Tensor | None:
        """The end of ``training_step``: the loss to backpropagate, or ``None`` to skip."""
        if self._skips_on_device():
            self._flag_on_device(loss, batch)
        elif not bool(torch.isfinite(loss)):  # the one host sync of the step
            return self._skip_nonfinite(loss, batch, bs)
        else:
            self.__dict__["_finite_batches"] = self.__dict__.get("_finite_batches", 0) + 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=bs)
        return loss

    def _inner_optimizer(self) -> Any:
        opt = self.optimizers(use_pl_optimizer=False)
        return opt if not isinstance(opt, list) else None

    def _skips_on_device(self) -> bool:
        if self.nonfinite_check == "sync" or self._trainer is None:
            return False
        opt = self._inner_optimizer()
        fused = bool(opt is not None and getattr(opt, "_step_supports_amp_scaling", False))
        scaler = str(self.trainer.precision) in ("16-mixed", "16")
        if self.nonfinite_check == "device":
            if not fused or scaler:
                raise ValueError(
                    "task.nonfinite_check=device needs a fused optimizer (optim.fused, AdamW / "
                    "SGD on CUDA or CPU) and no fp16 grad scaler; use 'auto' or 'sync'"
                )
            return True
        return fused and not scaler and self.device.type == "cuda"

    def _flag_on_device(self, loss: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        """Hand the step's non-finite flag to the fused optimizer; read it on the host later."""
        self._drain_nonfinite(block=False)
        bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(())
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        opt = self._inner_optimizer()
        previous = getattr(opt, "found_inf", None)
        if not self.__dict__.get("_nonfinite_fresh", True) and previous is not None:
            # A bad micro-batch skips the whole (accumulated) step.
            opt.found_inf = torch.maximum(bad, previous)
        else:
            opt.found_inf = bad
        self.__dict__["_nonfinite_fresh"] = False
        if bad.device.type == "cuda":
            host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host.copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = bad, None
        self._pending_nonfinite().append((self.global_step, host, event, batch))

    def configure_gradient_clipping(
        self,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as Lightning does, except under ``bf16-mixed``, where the tasks clip themselves.

        Lightning's autocast plugin refuses to clip for a fused optimizer because fp16's grad
        scaler unscales inside the fused step; bf16 autocast has no scaler, so the gradients are
        already true gradients and are clipped exactly as in full precision. That keeps the fused
        AdamW (and the on-device skip of NaN steps) for the BEiT recipes (bf16 + clip 3.0).
        """
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision
        from lightning.pytorch.utilities import GradClipAlgorithmType

        plugin = self.trainer.precision_plugin
        if (
            gradient_clip_val
            and isinstance(plugin, MixedPrecision)
            and getattr(plugin, "scaler", None) is None
        ):
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(plugin, optimizer, float(gradient_clip_val), algorithm)
            return
        super().configure_gradient_clipping(
            optimizer,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
        )

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # The next micro-batch starts a new accumulation window (a new found_inf).
        self.__dict__["_nonfinite_fresh"] = True

    def _pending_nonfinite(self) -> deque:
        if "_nonfinite_pending" not in self.__dict__:
            self.__dict__["_nonfinite_pending"] = deque()
        return self.__dict__["_nonfinite_pending"]

    def _drain_nonfinite(self, block: bool = True) -> None:
        """Count the flagged steps whose flag has reached the host (all of them with ``block``)."""
        pending = self._pending_nonfinite()
        while pending:
            step, host, event, batch = pending[0]
            if event is not None:
                if not block and not event.query():
                    return
                event.synchronize()
            pending.popleft()
            # Micro-batches of one accumulated step share the global step: count the step once.
            if float(host) > 0 and self.__dict__.get("_nonfinite_last_step") != step:
                self.__dict__["_nonfinite_last_step"] = step
                self._record_nonfinite("NaN/inf", step, batch, skipped_on="device")
            elif float(host) == 0:
                self.__dict__["_finite_batches"] = self.__dict__.get("_finite_batches", 0) + 1

    def on_train_start(self) -> None:
        self.__dict__["_finite_batches"] = 0
        self.__dict__["_first_step"] = self.global_step

    def on_train_end(self) -> None:
        """Count the last flagged steps; fail the run if not one batch of it had a finite loss.

        Fewer than ``max_nonfinite_steps`` skipped steps do not stop a run, so a short run whose
        every step is skipped (e.g. a loss over zero masked patches) would otherwise end with
        status 0 and an untrained checkpoint.

        Raises:
            FloatingPointError: the run made optimizer steps, and every batch had a NaN/inf loss
                (on every rank).
        """
        self._drain_nonfinite(block=True)
        steps = self.global_step - self.__dict__.get("_first_step", self.global_step)
        if steps <= 0:
            return
        finite = torch.tensor(float(self.__dict__.get("_finite_batches", 0)), device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="sum")
        if float(finite) == 0:
            raise FloatingPointError(
                f"every training step of this run (steps {self.global_step - steps} to "
                f"{self.global_step - 1}) had a non-finite loss and was skipped: the model was not "
                "trained, and its checkpoint holds the weights it started from. Check the data "
                "for NaN/inf, the masking (masking.num_masking_patches > 0) and optim.lr"
            )

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
        self._record_nonfinite(loss.item(), self.global_step, batch, skipped_on="host")
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=bs)
        if self._trainer is not None and self.trainer.world_size > 1:
            params = [p for p in self.model.parameters() if p.requires_grad]
            return torch.stack([p.sum() for p in params]).sum() * 0.0
        return None

    def _record_nonfinite(
        self, value: Any, step: int, batch: Mapping[str, torch.Tensor], skipped_on: str
    ) -> None:
        """Count one skipped step; warn, or raise past ``max_nonfinite_steps``."""
        self.nonfinite_steps += 1
        stats = batch_statistics(batch)
        if self.nonfinite_steps > self.max_nonfinite_steps:
            raise FloatingPointError(
                f"training loss is {value} at step {step}: {self.nonfinite_steps} steps "
                f"with a non-finite loss exceed task.max_nonfinite_steps="
                f"{self.max_nonfinite_steps}. Batch: {stats}. Check the data for NaN/inf, lower "
                "optim.lr, or use a gradient clip / bf16 instead of fp16"
            )
        log.warning(
            "non-finite training loss (%s) at step %d: step skipped (on the %s; %d of at most "
            "%d). Batch: %s",
            value,
            step,
            skipped_on,
            self.nonfinite_steps,
            self.max_nonfinite_steps,
            stats,
        )
