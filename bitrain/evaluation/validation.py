"""Evaluate a fine-tuned classifier: the fine-tuning task's own validation, run by Lightning.

:func:`evaluate` loads the checkpoint (:func:`bitrain.checkpoints.load_classifier`, EMA weights
with ``use_ema``), builds the config's data module with the checkpoint's model settings (so
``${model.img_size}`` in the data config is the resolution the model was trained at) and, with
``preprocessing=checkpoint`` (the default), the evaluation preprocessing the checkpoint records (a
bitrain run's own, a Hugging Face folder's ``preprocessor_config.json``, a timm folder's
``pretrained_cfg``) in place of the data config's ``val_transform``; ``preprocessing=config``
keeps the data config's. It then wraps the model in the fine-tuning task
(:meth:`bitrain.tasks.classification.ImageClassification.from_model`) and runs
``lightning.Trainer.validate``: top-1, top-5 and loss are the task's ``val/top1``, ``val/top5`` and
``val/loss``, computed by the same ``validation_step`` and metrics as a fine-tuning run's
validation, so on the same data (and batch size, device, ``precision``) they equal that run's last
logged validation by construction. :class:`EvaluationReport` (a callback) adds what a fine-tuning
run does not log: the per-class counts, the throughput and a progress line every
``log_every_n_batches`` batches. Written into the output directory:

* ``metrics.json``: ``top1``, ``top5``, ``loss``, ``images``, ``images_per_sec``, ``seconds``,
  the checkpoint, EMA or not, the device, the precision;
* ``per_class.csv``: ``class,name,count,correct,accuracy`` for every class.

Top-k is the fraction of images whose label is among the k highest logits
(:func:`bitrain.tasks.common.topk_accuracy`: torchmetrics, micro average; top-5 clipped to the
number of classes); the loss is the mean cross entropy over all images (Lightning's mean of the
batch means weighted by batch size).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torchmetrics.classification import MulticlassStatScores

from bitrain.checkpoints import load_classifier
from bitrain.tasks.classification import ImageClassification
from bitrain.tasks.common import ImageRate

__all__ = ["EvaluationReport", "evaluate", "resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _trainer_device(device: torch.device) -> tuple[str, int | list[int]]:
    """``(accelerator, devices)`` of ``lightning.Trainer`` for one torch device."""
    if device.type == "cuda":
        return "gpu", [device.index or 0]
    return device.type, 1


PREPROCESSING = ("checkpoint", "config")


def _preprocessing(cfg: DictConfig, model: torch.nn.Module) -> dict[str, Any]:
    """``{"val_transform": ...}`` from the checkpoint's record, or ``{}`` (the data config's)."""
    choice = str(cfg.get("preprocessing", "checkpoint"))
    if choice not in PREPROCESSING:
        raise ValueError(f"preprocessing={choice!r}: choose one of {PREPROCESSING}")
    spec = getattr(model, "bitrain_eval_transform", None)
    if choice == "config" or spec is None:
        log.info(
            "preprocessing: the data config's val_transform%s",
            "" if choice == "config" else " (the checkpoint records none)",
        )
        return {}
    log.info("preprocessing: the checkpoint's own (%s)", spec)
    return {"val_transform": spec.build()}


class EvaluationReport(L.Callback):
    """What ``bitrain.evaluate`` reports besides the task's metrics: per class, speed, progress.

    Reads the logits :meth:`ImageClassification.validation_step` returns. Per class it counts the
    images and the correct ones with the same top-1 rule as ``val/top1`` (torchmetrics'
    ``MulticlassStatScores``: true positives and support), so the correct counts add up to top-1
    exactly. A label outside ``0..num_classes-1`` stops the run, naming the label and the number
    of classes.

    Args:
        num_classes: classes of the model.
        every_n_batches: a progress line (running top-1, images/s) every N batches.
    """

    def __init__(self, num_classes: int, every_n_batches: int = 20) -> None:
        self.num_classes = int(num_classes)
        self.every = max(1, int(every_n_batches))
        self.stats = MulticlassStatScores(self.num_classes, top_k=1, average="none")
        self.rate = ImageRate()  # one evaluation process: images / seconds
        self.seconds = 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stats = self.stats.to(pl_module.device)
        self.stats.reset()
        self.rate.start()

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        labels = batch["labels"]
        if not labels.numel():
            return
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.num_classes:
            bad = hi if hi >= self.num_classes else lo
            raise ValueError(
                f"label {bad} in the data but the model has {self.num_classes} classes "
                f"(0..{self.num_classes - 1}): evaluate on data with the checkpoint's classes"
            )

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(
                f"EvaluationReport needs the logits from validation_step, got "
                f"{type(outputs).__name__}"
            )
        labels = batch["labels"]
        self.stats.update(outputs.detach(), labels)
        self.rate.add(int(labels.numel()))
        if (batch_idx + 1) % self.every == 0:  # one progress line every N batches (no bar in logs)
            total = trainer.num_val_batches[dataloader_idx] if trainer.num_val_batches else None
            correct = int(self.stats.compute()[:, 0].sum())
            log.info(
                "batch %d%s: %d images, running top-1 %.4f, %.0f images/s",
                batch_idx + 1,
                f"/{int(total)}" if isinstance(total, int) else "",
                self.images,
                correct / max(self.images, 1),
                self.rate.rate(),
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = self.rate.seconds()

    @property
    def images(self) -> int:
        """Images evaluated so far."""
        return self.rate.images

    def per_class(self) -> tuple[list[int], list[int]]:
        """``(count, correct)`` per class."""
        if self.images == 0:
            return [0] * self.num_classes, [0] * self.num_classes
        stats = self.stats.compute().cpu()  # [C, (tp, fp, tn, fn, support)]
        return [int(v) for v in stats[:, 4]], [int(v) for v in stats[:, 0]]


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's INFO lines off (its loggers at WARNING) for the duration; restored after."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation the config describes; return the metrics (also written to files)."""
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    use_ema = bool(cfg.get("use_ema", False))
    model = load_classifier(ckpt, use_ema=use_ema)
    with open_dict(cfg):
        cfg.model = OmegaConf.create(dict(model.bitrain_spec))
    datamodule = hydra.utils.instantiate(cfg.data, **_preprocessing(cfg, model))
    if datamodule.val_source is None:
        raise ValueError("the data config has no val_source to evaluate on: set data.val_source")
    names = model.label_names
    data_names = datamodule.label_names
    num_classes = int(model.bitrain_spec["num_classes"])
    if data_names is not None and names is not None and list(data_names) != list(names):
        log.warning(
            "the data's class names differ from the checkpoint's (%s... vs %s...): labels are "
            "compared by index",
            data_names[:3],
            names[:3],
        )
    names = names or data_names or [str(i) for i in range(num_classes)]
    device = resolve_device(str(cfg.get("device", "auto")))
    precision = str(cfg.get("precision", "32-true"))
    accelerator, devices = _trainer_device(device)
    out = Path(cfg.paths.output_dir)
    report = EvaluationReport(num_classes, int(cfg.get("log_every_n_batches", 20)))
    task = ImageClassification.from_model(model, label_names=list(names))
    with _quiet_lightning():  # its set-up lines (GPU/TPU available, tips); warnings still show
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=devices,
            precision=precision,
            logger=False,
            callbacks=[report],
            enable_checkpointing=False,
            enable_progress_bar=False,  # the report's progress lines instead
            enable_model_summary=False,
            default_root_dir=out,
        )
        (results,) = trainer.validate(task, datamodule=datamodule, verbose=False)
    n, seconds = report.images, report.seconds
    metrics = {
        "checkpoint": str(ckpt),
        "ema": use_ema,
        "device": str(device),
        "precision": precision,
        "images": n,
        "top1": float(results["val/top1"]),
        "top5": float(results["val/top5"]),
        "loss": float(results["val/loss"]),
        "seconds": seconds,
        "images_per_sec": n / seconds if seconds > 0 else float("nan"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    count, correct = report.per_class()
    with open(out / "per_class.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "name", "count", "correct", "accuracy"])
        for c in range(num_classes):
            k, ok = count[c], correct[c]
            writer.writerow([c, names[c], k, ok, f"{ok / k:.6f}" if k else ""])
    log.info(
        "top-1 %.4f  top-5 %.4f  loss %.4f  on %d images  (%.0f images/s on %s)",
        metrics["top1"],
        metrics["top5"],
        metrics["loss"],
        n,
        metrics["images_per_sec"],
        device,
    )
    log.info("wrote %s and %s", out / "metrics.json", out / "per_class.csv")
    return metrics
