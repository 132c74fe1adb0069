"""Supervised fine-tuning of a timm classifier as a LightningModule (``run_class_finetuning.py``).

One step: optional Mixup/CutMix (timm ``Mixup``; its soft targets carry the label smoothing) on
the batch, the classifier's logits, and the loss: soft-target cross entropy with mixing, else
cross entropy with ``label_smoothing``. Validation reports ``val/loss`` (plain cross entropy),
``val/top1`` and ``val/top5`` (torchmetrics, top-k clipped to the number of classes) and, with an
EMA of the weights (timm ``ModelEmaV3``, updated after every optimizer step), the same for the
EMA model as ``val/ema_top1`` / ``val/ema_top5``.

The model is built by its config (``bitrain.checkpoints.build_classifier``: a timm model,
optionally initialised from ``model.pretrained``); the optimizer by :mod:`bitrain.tasks.optim` with
layer-wise lr decay folded into each group's lr. Label names (from the data module) are kept in
every checkpoint (``checkpoint["label_names"]``), and hyper-parameters are plain containers, so
``torch.load(..., weights_only=True)`` reads the ``.ckpt``. Non-finite losses: skipped and counted
as in pretraining (:class:`bitrain.tasks.common.NonFiniteGuard`). ``bitrain.evaluate`` runs this
task's validation on a loaded checkpoint (:meth:`ImageClassification.from_model`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F

from bitrain.data.preprocessing import from_timm_args, from_transform, read_record
from bitrain.io import CheckpointError
from bitrain.tasks import optim as optim_lib
from bitrain.tasks.common import NonFiniteGuard, check_nonfinite_mode, plain, topk_accuracy

__all__ = ["ImageClassification"]

log = logging.getLogger(__name__)


def eval_preprocessing_record(node: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The run's evaluation transform as a data record, for the checkpoint.

    The node comes from the user's own config (trusted); the record is an
    :class:`bitrain.data.preprocessing.EvalPreprocessing`, which names no code.

    A ``timm.data.create_transform`` node is read with timm's rules; any other node is built (it
    is the user's config, not a file) and described step by step. A transform that cannot be
    described (e.g. one with a ``ColorJitter``) is not recorded: a warning says so, and
    ``bitrain.predict`` then falls back to timm's default for the model.
    """
    if not node:
        return None
    try:
        if "_target_" not in node:
            return read_record(node, "task.eval_transform").to_record()
        if node["_target_"] in ("timm.data.create_transform",):
            args = {k: v for k, v in node.items() if k in _TIMM_EVAL_KEYS}
            if not node.get("is_training", False):
                return from_timm_args(args, "task.eval_transform").to_record()
        return from_transform(hydra.utils.instantiate(node)).to_record()
    except (ValueError, CheckpointError) as err:
        log.warning(
            "the evaluation transform is not recorded in the checkpoint (%s); bitrain.predict "
            "will use timm's default preprocessing for the model",
            err,
        )
        return None


_TIMM_EVAL_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


class ImageClassification(NonFiniteGuard, L.LightningModule):
    """Fine-tune (or train from scratch) an image classifier.

    Args:
        model: config of the classifier (``_target_`` + arguments, incl. ``num_classes``).
        optim: keyword arguments of :func:`bitrain.tasks.optim.build`.
        mixup: ``timm.data.Mixup`` arguments (``mixup_alpha``, ``cutmix_alpha``, ``prob``,
            ``switch_prob``, ``mode``), or None / both alphas 0 for no mixing.
        label_smoothing: label smoothing of the targets (in the mixed soft targets too).
        ema: ``{"decay": 0.9999}`` (+ other ``ModelEmaV3`` arguments) to keep an EMA of the
            weights, evaluated separately; None for none.
        compile: ``torch.compile`` the model's forward.
        max_nonfinite_steps: NaN/inf training steps skipped before the run stops.
        nonfinite_check: ``auto`` | ``sync`` | ``device``: how a NaN/inf step is skipped
            (:class:`bitrain.tasks.common.NonFiniteGuard`).
        label_names: class names (normally taken from the data module at fit start).
        eval_transform: config of the evaluation transform (``${data.val_transform}``). The
            checkpoint keeps it as data (:func:`eval_preprocessing_record`), so ``python -m
            bitrain.predict`` preprocesses images the same way without running code from a file.

    :meth:`from_model` wraps a classifier that is already built (a loaded checkpoint) to run this
    task's validation on it (``bitrain.evaluate``).
    """

    def __init__(
        self,
        model: Mapping[str, Any] | torch.nn.Module,
        optim: Mapping[str, Any],
        mixup: Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
        ema: Mapping[str, Any] | None = None,
        compile: bool = False,
        max_nonfinite_steps: int = 10,
        nonfinite_check: str = "auto",
        label_names: list[str] | None = None,
        eval_transform: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        built = model if isinstance(model, torch.nn.Module) else None  # from_model
        if built is not None:
            model = {"num_classes": _num_classes(built)}
        model, optim, mixup, ema = plain(model), plain(optim), plain(mixup), plain(ema)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"task.label_smoothing must be in [0, 1), got {label_smoothing}")
        if isinstance(max_nonfinite_steps, bool) or int(max_nonfinite_steps) < 0:
            raise ValueError(f"task.max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        check_nonfinite_mode(nonfinite_check)
        self.save_hyperparameters(
            {
                "model": model,
                "optim": optim,
                "mixup": mixup,
                "label_smoothing": float(label_smoothing),
                "ema": ema,
                "compile": compile,
                "max_nonfinite_steps": int(max_nonfinite_steps),
                "nonfinite_check": nonfinite_check,
                "eval_transform": eval_preprocessing_record(plain(eval_transform)),
            }
        )
        self.model = built if built is not None else hydra.utils.instantiate(model)
        self.validation_only = built is not None
        self.num_classes = int(model["num_classes"])
        self.optim_cfg = dict(optim)
        self.label_smoothing = float(label_smoothing)
        self.mixup_fn = _build_mixup(mixup, self.label_smoothing, self.num_classes)
        self.ema = None
        if ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, **ema)
        self.__dict__["_forward"] = torch.compile(self.model) if compile else self.model
        self.val_top1 = topk_accuracy(self.num_classes, 1)
        self.val_top5 = topk_accuracy(self.num_classes, 5)
        self.ema_top1 = topk_accuracy(self.num_classes, 1)
        self.ema_top5 = topk_accuracy(self.num_classes, 5)
        self.label_names = list(label_names) if label_names else None
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        self.nonfinite_check = nonfinite_check
        self.nonfinite_steps = 0
        self._t_last: float | None = None

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, label_names: list[str] | None = None
    ) -> ImageClassification:
        """The task around an already-built classifier, to validate it as fine-tuning does.

        ``bitrain.evaluate`` wraps a loaded checkpoint in it and runs ``Trainer.validate``: the
        same :meth:`validation_step` and metrics as a fine-tuning run's validation, so its
        ``val/top1``, ``val/top5`` and ``val/loss`` are that run's by construction. No optimizer
        (the task is not for training), no EMA (load the EMA weights as the model instead), no
        ``torch.compile``.

        Args:
            model: a classifier with ``num_classes`` (a timm model, as
                :func:`bitrain.checkpoints.load_classifier` returns), logits ``[B, num_classes]``.
            label_names: its class names, if known.
        """
        return cls(model=model, optim={}, label_names=label_names)

    # --- Lightning hooks -------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self._forward(images)

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, "label_names", None)
        if names is not None:
            if len(names) != self.num_classes:
                raise ValueError(
                    f"the data has {len(names)} classes but model.num_classes={self.num_classes}"
                )
            self.label_names = list(names)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._drain_nonfinite(block=True)  # steps flagged on the device count too
        checkpoint["label_names"] = self.label_names
        checkpoint["nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))
        if checkpoint.get("label_names"):
            self.label_names = list(checkpoint["label_names"])

    def training_step(
        self, batch: Mapping[str, torch.Tensor], batch_idx: int
    ) -> torch.Tensor | None:
        images, labels = batch["images"], batch["labels"]
        bs = images.shape[0]
        if self.mixup_fn is not None:
            if bs % 2:
                raise ValueError(
                    f"Mixup/CutMix needs an even batch size, got {bs}: set data.drop_last=true "
                    "and an even data.batch_size"
                )
            images, targets = self.mixup_fn(images, labels)
            logits = self(images)
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = self(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            acc = (logits.detach().argmax(-1) == labels).float().mean()
            self.log("train/acc", acc, prog_bar=True, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        peak = max(g["lr"] for g in self.optimizers().param_groups)  # the head (layer decay)
        self.log("lr", peak, prog_bar=True, batch_size=bs)
        self._log_throughput(bs)
        return self._check_loss(loss, batch, bs)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After each optimizer step (not each micro-batch of a gradient accumulation).
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        if self.ema is not None and (batch_idx + 1) % accumulate == 0:
            self.ema.update(self.model, step=self.global_step)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Log ``val/loss``, ``val/top1``, ``val/top5`` (and the EMA's); return the logits.

        The logits ``[B, num_classes]`` reach the callbacks' ``on_validation_batch_end`` (the
        evaluation's per-class counts); Lightning keeps nothing of them after the batch.
        """
        images, labels = batch["images"], batch["labels"]
        bs = images.shape[0]
        logits = self(images)
        loss = F.cross_entropy(logits.float(), labels)
        self.val_top1.update(logits, labels)
        self.val_top5.update(logits, labels)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=bs)
        self.log("val/top1", self.val_top1, prog_bar=True, batch_size=bs)
        self.log("val/top5", self.val_top5, batch_size=bs)
        if self.ema is not None:
            ema_logits = self.ema.module(images)
            self.ema_top1.update(ema_logits, labels)
            self.ema_top5.update(ema_logits, labels)
            self.log("val/ema_top1", self.ema_top1, batch_size=bs)
            self.log("val/ema_top5", self.ema_top5, batch_size=bs)
        return logits

    def configure_optimizers(self):
        if self.validation_only:
            raise ValueError(
                "this ImageClassification was built by from_model, for validation only: it has "
                "no optimizer settings; build it from a config with optim=... to train"
            )
        return optim_lib.lightning_optimizers(self.model, self.trainer, self.optim_cfg)


def _num_classes(model: torch.nn.Module) -> int:
    """A built classifier's number of classes (timm models keep it as ``num_classes``)."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TypeError(
            f"ImageClassification.from_model: {type(model).__name__} has no positive integer "
            f"num_classes ({n!r}); give a classifier such as a timm model or what "
            "bitrain.checkpoints.load_classifier returns"
        )
    return n


def _build_mixup(cfg: Mapping[str, Any] | None, smoothing: float, num_classes: int):
    """The ``timm.data.Mixup`` of the config, or None when both alphas are 0 / no config."""
    if not cfg:
        return None
    cfg = dict(cfg)
    if not (cfg.get("mixup_alpha", 0) > 0 or cfg.get("cutmix_alpha", 0) > 0):
        return None
    from timm.data import Mixup

    return Mixup(**cfg, label_smoothing=smoothing, num_classes=num_classes)
