"""Evaluate a fine-tuned classifier: top-1 / top-5, loss, images per second, per-class accuracy.

:func:`evaluate` loads the checkpoint (:func:`bitrain.checkpoints.load_classifier`), builds
the config's data module with the checkpoint's model settings (so ``${model.img_size}`` in the
data config is the resolution the model was trained at) and, with ``preprocessing=checkpoint``
(the default), the evaluation preprocessing the checkpoint records (a bitrain run's own, a Hugging
Face folder's ``preprocessor_config.json``, a timm folder's ``pretrained_cfg``) in place of the
data config's ``val_transform``; ``preprocessing=config`` keeps the data config's. It runs the
validation loader once under ``torch.inference_mode`` and writes, into the output directory:

* ``metrics.json``: ``top1``, ``top5``, ``loss``, ``images``, ``images_per_sec``, ``seconds``,
  the checkpoint, EMA or not, the device;
* ``per_class.csv``: ``class,name,count,correct,accuracy`` for every class.

Top-k is the fraction of images whose label is among the k highest logits
(:func:`bitrain.tasks.common.topk_accuracy`: torchmetrics, micro average; top-5 clipped to the
number of classes); the loss is the mean cross entropy over all images.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict
from torchmetrics.classification import MulticlassAccuracy

from bitrain.checkpoints import load_classifier
from bitrain.tasks.common import topk_accuracy

__all__ = ["evaluate", "resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


@torch.inference_mode()
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation the config describes; return the metrics (also written to files)."""
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    model = load_classifier(ckpt, use_ema=bool(cfg.get("use_ema", False)))
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
    model.to(device)
    top1 = topk_accuracy(num_classes, 1).to(device)
    top5 = topk_accuracy(num_classes, 5).to(device)
    per_class = MulticlassAccuracy(num_classes, top_k=1, average="none").to(device)
    count = torch.zeros(num_classes, dtype=torch.long, device=device)
    loss_sum, n = 0.0, 0
    start = time.perf_counter()
    loader = datamodule.val_dataloader()
    total = len(loader) if hasattr(loader, "__len__") else None
    every = max(1, int(cfg.get("log_every_n_batches", 20)))
    for i, batch in enumerate(loader):
        images, labels = batch["images"].to(device), batch["labels"].to(device)
        if int(labels.max()) >= num_classes:
            raise ValueError(
                f"label {int(labels.max())} in the data but the model has {num_classes} classes"
            )
        logits = model(images).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        n += labels.numel()
        top1.update(logits, labels)
        top5.update(logits, labels)
        per_class.update(logits, labels)
        count += torch.bincount(labels, minlength=num_classes)
        if (i + 1) % every == 0:  # one progress line every N batches (no bar in logs)
            log.info(
                "batch %d%s: %d images, running top-1 %.4f, %.0f images/s",
                i + 1,
                f"/{total}" if total else "",
                n,
                float(top1.compute()),
                n / max(time.perf_counter() - start, 1e-9),
            )
    seconds = time.perf_counter() - start
    metrics = {
        "checkpoint": str(ckpt),
        "ema": bool(cfg.get("use_ema", False)),
        "device": str(device),
        "images": n,
        "top1": float(top1.compute()),
        "top5": float(top5.compute()),
        "loss": loss_sum / max(n, 1),
        "seconds": seconds,
        "images_per_sec": n / seconds if seconds > 0 else float("nan"),
    }
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    accuracy = per_class.compute().cpu()  # the same top-1 rule as "top1", per class
    with open(out / "per_class.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "name", "count", "correct", "accuracy"])
        for c in range(num_classes):
            k = int(count[c])
            ok = round(float(accuracy[c]) * k)
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
