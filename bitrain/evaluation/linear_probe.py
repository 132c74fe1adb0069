"""The BEiT linear probe (paper, App. D): ``python -m bitrain.evaluate task=linear_probe``.

The encoder of a checkpoint (a pretraining one: bitrain ``.ckpt``, official unilm ``.pth``, Hugging
Face ``BeitForMaskedImageModeling`` folder; or a fine-tuned classifier) is frozen. For every
chosen layer, the output tokens of that block are mean-pooled over the patches (optionally
concatenated with the [CLS] token, as the official ``run_linear_eval.py`` does), and a linear
classifier is trained on them with AdamW, one per layer, on the same batches. The classifier is
``BatchNorm1d(affine=False)`` + ``Linear``: a parameter-free normalisation of the features (the
scale of intermediate tokens differs from layer to layer), so the probe stays linear.

The optimizer and its per-step schedule are the training tasks' own
(:func:`bitrain.tasks.optim.build`: AdamW, linear warmup of ``task.warmup_epochs`` then a cosine
to 0, stepped every batch) with the paper's values (App. D, Table 9: lr 4e-3, batch 1024, weight
decay 1e-4, 50 epochs; ``configs/task/linear_probe.yaml``). One difference from the training
recipes, as the official probe: weight decay on every parameter of the probe, biases too
(``torch.optim.AdamW(linear_classifier.parameters(), lr, weight_decay=1e-4)``, microsoft/unilm
``beit/run_linear_eval.py`` lines 125-126 at commit 768a3c8; that file steps a
``CosineAnnealingLR`` once per epoch without warmup, line 129).

Two ways to feed it:

* ``task.augment=false`` (default): the features of the training images (with the *evaluation*
  transform) are computed once and cached in memory; the probe then trains for
  ``task.epochs`` on the cache. Fast: the encoder runs once per image.
* ``task.augment=true``: the training transform (random crops, ...) runs every epoch and the
  frozen encoder with it, as in the paper; ``task.batch_size`` is then ``data.batch_size``.

``task.random_init=true`` probes the same architecture with fresh random weights (seeded): the
baseline that says how much of the accuracy the pretraining is responsible for.

Writes ``linear_probe.json`` (per layer: top-1, top-5, loss; the best layer) and
``per_layer.csv`` to the output directory, and logs a table.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from torch import nn

from bitrain.checkpoints import load_classifier, load_mim_model, sniff
from bitrain.evaluation.validation import resolve_device
from bitrain.io import CheckpointError
from bitrain.models.beit import BeitMIM
from bitrain.models.classifier import create_classifier
from bitrain.tasks import optim as optim_lib
from bitrain.tasks.common import topk_accuracy

__all__ = [
    "LinearProbes",
    "linear_probe",
    "load_frozen_encoder",
    "pooled_features",
    "probe_optimizer",
    "resolve_layers",
]

log = logging.getLogger(__name__)


def load_frozen_encoder(
    path: str | Path, use_ema: bool = False, random_init: bool = False, seed: int = 0
) -> tuple[nn.Module, dict[str, Any], str]:
    """The encoder of a pretraining or classifier checkpoint, frozen, in eval mode.

    Returns:
        ``(model, spec, kind)``: ``spec`` has at least ``img_size``; ``kind`` is ``"mim"`` or
        ``"classifier"``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: neither a pretraining nor a classifier checkpoint.
    """
    try:
        found = sniff(path)  # one read, whatever the format
    except FileNotFoundError as err:
        raise FileNotFoundError(f"linear probe: {err}") from None
    if found.kind == "mim":
        model: nn.Module = load_mim_model(found)
        spec = dict(model.model_kwargs)
        kind = "mim"
    else:
        model = load_classifier(found, use_ema=use_ema)
        spec = dict(model.bitrain_spec)
        kind = "classifier"
    if random_init:
        torch.manual_seed(seed)
        model = BeitMIM(**spec) if kind == "mim" else create_classifier(**spec)
    if not hasattr(model, "forward_intermediates"):
        raise CheckpointError(
            f"linear probe: {type(model).__name__} has no forward_intermediates (timm >= 1.0 "
            "models have it)"
        )
    model.requires_grad_(False)
    return model.eval(), spec, kind


def _num_layers(model: nn.Module) -> int:
    blocks = getattr(model, "blocks", None)
    if blocks is not None:
        return len(blocks)
    stages = getattr(model, "stages", None)
    if stages is not None:
        return len(stages)
    raise ValueError(f"linear probe: {type(model).__name__} has neither blocks nor stages")


def resolve_layers(layers: Any, depth: int) -> list[int]:
    """1-based layer numbers from ``all``, an int or a list (negative counts from the end).

    Raises:
        ValueError: a layer outside ``1..depth``, or an empty list.
    """
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"task.layers must be 'all', an int or a list, got {layers!r}")
        return list(range(1, depth + 1))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        n = int(layer) + depth + 1 if int(layer) < 0 else int(layer)
        if not 1 <= n <= depth:
            raise ValueError(
                f"task.layers: layer {layer} is outside 1..{depth} (the encoder has {depth} "
                "blocks; -1 is the last)"
            )
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError("task.layers is empty")
    return out


def pooled_features(
    model: nn.Module, images: torch.Tensor, layers: Sequence[int], with_cls: bool = False
) -> list[torch.Tensor]:
    """Mean-pooled patch tokens (``[B, D]``, or ``[B, 2D]`` with [CLS]) of each 1-based layer."""
    kwargs: dict[str, Any] = {"indices": [n - 1 for n in layers], "intermediates_only": True}
    prefix = with_cls and getattr(model, "num_prefix_tokens", 0) > 0
    if prefix:
        kwargs["return_prefix_tokens"] = True
    outs = model.forward_intermediates(images, output_fmt="NCHW", **kwargs)
    feats = []
    for out in outs:
        if prefix:
            spatial, cls = out
            feats.append(torch.cat([cls[:, 0], spatial.mean(dim=(2, 3))], dim=1).float())
        else:
            feats.append(out.mean(dim=(2, 3)).float())
    return feats


class LinearProbes(nn.Module):
    """One ``BatchNorm1d(affine=False)`` + ``Linear`` per layer; ``forward`` takes a list."""

    def __init__(self, dims: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.BatchNorm1d(d, affine=False), nn.Linear(d, num_classes)) for d in dims
        )
        for head in self.heads:
            nn.init.trunc_normal_(head[1].weight, std=0.01)
            nn.init.zeros_(head[1].bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [head(f) for head, f in zip(self.heads, feats, strict=True)]


def probe_optimizer(
    heads: nn.Module,
    total_steps: int,
    steps_per_epoch: int,
    *,
    lr: float,
    weight_decay: float,
    warmup_epochs: float,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The probe's AdamW and per-step schedule: :func:`bitrain.tasks.optim.build`.

    Warmup of ``warmup_epochs`` then a cosine to 0 over ``total_steps`` (step the scheduler after
    every batch), as the training tasks; weight decay on every parameter, biases too, as the
    official probe (``run_linear_eval.py``; see the module docstring), where the training
    recipes leave 1-D tensors undecayed.
    """
    opt, sched = optim_lib.build(
        heads,
        total_steps,
        lr=lr,
        weight_decay=weight_decay,
        min_lr=0.0,
        warmup_epochs=warmup_epochs,
        steps_per_epoch=max(1, steps_per_epoch),
        no_weight_decay=[],
    )
    for group in opt.param_groups:  # the official probe decays biases too
        group["weight_decay"] = weight_decay
    return opt, sched


@torch.no_grad()
def _extract(model, loader, layers, with_cls, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    feats: list[list[torch.Tensor]] = [[] for _ in layers]
    labels = []
    for batch in loader:
        out = pooled_features(model, batch["images"].to(device), layers, with_cls)
        for acc, f in zip(feats, out, strict=True):
            acc.append(f.cpu())
        labels.append(batch["labels"])
    if not labels:
        raise ValueError("linear probe: the data source yielded no images")
    return [torch.cat(f) for f in feats], torch.cat(labels)


def _cached_batches(
    feats: list[torch.Tensor], labels: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    order = torch.randperm(len(labels), generator=generator)
    # Drop a last batch of one: BatchNorm cannot train on it.
    stop = len(order) - (1 if len(order) % batch_size == 1 else 0)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield [f[idx] for f in feats], labels[idx]


def linear_probe(cfg: DictConfig) -> dict[str, Any]:
    """Run the linear probe the config describes; return the metrics (also written to files)."""
    probe = cfg.task
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    seed = int(cfg.get("seed", 0))
    model, spec, kind = load_frozen_encoder(
        ckpt,
        use_ema=bool(cfg.get("use_ema", False)),
        random_init=bool(probe.get("random_init", False)),
        seed=seed,
    )
    with open_dict(cfg):
        cfg.model = OmegaConf.create({k: v for k, v in spec.items() if not callable(v)})
    layers_cfg = probe.layers
    if isinstance(layers_cfg, ListConfig):
        layers_cfg = list(layers_cfg)
    layers = resolve_layers(layers_cfg, _num_layers(model))
    with_cls = str(probe.get("features", "mean")) == "cls_mean"
    device = resolve_device(str(cfg.get("device", "auto")))
    model.to(device)
    augment = bool(probe.get("augment", False))
    # The training split, through the evaluation transform, for the cache; the val split as is.
    data_train = hydra.utils.instantiate(cfg.data, val_source=cfg.data.source)
    data = hydra.utils.instantiate(cfg.data)
    if data.val_source is None:
        raise ValueError("the data config has no val_source to evaluate on: set data.val_source")
    num_classes = int(cfg.data.num_classes)
    start = time.perf_counter()
    val_feats, val_labels = _extract(model, data.val_dataloader(), layers, with_cls, device)
    if augment:
        train_feats = None
        dims = [f.shape[1] for f in val_feats]
        batch_size = int(cfg.data.batch_size)
        steps_per_epoch = len(data.train_dataloader())
    else:
        train_feats, train_labels = _extract(
            model, data_train.val_dataloader(), layers, with_cls, device
        )
        dims = [f.shape[1] for f in train_feats]
        batch_size = min(int(probe.batch_size), len(train_labels))
        n = len(train_labels)
        steps_per_epoch = n // batch_size + (1 if n % batch_size > 1 else 0)
    log.info(
        "linear probe of %s (%s, %s): layers %s, %s features (dim %d), %s",
        ckpt,
        kind,
        "random init" if probe.get("random_init", False) else "pretrained weights",
        layers,
        "[CLS] + mean" if with_cls else "mean-pooled",
        dims[0],
        "augmented every epoch" if augment else "cached training features",
    )
    if int(val_labels.max()) >= num_classes or (
        train_feats is not None and int(train_labels.max()) >= num_classes
    ):
        raise ValueError(f"a label in the data is >= data.num_classes={num_classes}")

    torch.manual_seed(seed)
    heads = LinearProbes(dims, num_classes).to(device)
    epochs = int(probe.epochs)
    total = max(1, epochs * steps_per_epoch)
    opt, sched = probe_optimizer(
        heads,
        total,
        steps_per_epoch,
        lr=float(probe.lr),
        weight_decay=float(probe.weight_decay),
        warmup_epochs=float(probe.get("warmup_epochs", 0)),
    )
    if total < 500:
        log.warning(
            "the probe trains for %d steps only (%d epochs x %d steps of batch %d): the paper's "
            "recipe (batch 1024, 50 epochs) is sized for ImageNet; on small data lower "
            "task.batch_size or raise task.epochs",
            total,
            epochs,
            steps_per_epoch,
            batch_size,
        )
    gen = torch.Generator().manual_seed(seed)
    heads.train()
    for epoch in range(epochs):
        if augment:
            if hasattr(data, "set_epoch"):
                data.set_epoch(epoch)
            batches = (
                (pooled_features(model, b["images"].to(device), layers, with_cls), b["labels"])
                for b in data.train_dataloader()
            )
        else:
            batches = _cached_batches(train_feats, train_labels, batch_size, gen)
        losses = []
        for feats, labels in batches:
            labels = labels.to(device)
            outs = heads([f.to(device) for f in feats])
            loss = sum(F.cross_entropy(o, labels) for o in outs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())
        if losses and ((epoch + 1) % max(1, epochs // 5) == 0 or epoch + 1 == epochs):
            log.info(
                "epoch %d/%d: mean probe loss %.4f (summed over %d layers)",
                epoch + 1,
                epochs,
                float(torch.stack(losses).mean()),
                len(layers),
            )

    heads.eval()
    per_layer: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        outs = heads([f.to(device) for f in val_feats])
        labels = val_labels.to(device)
        for layer, logits in zip(layers, outs, strict=True):
            top1 = topk_accuracy(num_classes, 1).to(device)
            top5 = topk_accuracy(num_classes, 5).to(device)
            per_layer[str(layer)] = {
                "top1": float(top1(logits, labels)),
                "top5": float(top5(logits, labels)),
                "loss": float(F.cross_entropy(logits, labels)),
            }
    best = max(per_layer, key=lambda k: per_layer[k]["top1"])
    metrics = {
        "checkpoint": str(ckpt),
        "encoder": kind,
        "random_init": bool(probe.get("random_init", False)),
        "features": "cls_mean" if with_cls else "mean",
        "augment": augment,
        "epochs": epochs,
        "train_images": None if train_feats is None else len(train_labels),
        "val_images": len(val_labels),
        "layers": per_layer,
        "best_layer": int(best),
        "best_top1": per_layer[best]["top1"],
        "seconds": time.perf_counter() - start,
    }
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear_probe.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(out / "per_layer.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "top1", "top5", "loss"])
        for layer, m in per_layer.items():
            writer.writerow([layer, f"{m['top1']:.6f}", f"{m['top5']:.6f}", f"{m['loss']:.6f}"])
    log.info("layer  top-1   top-5   loss")
    for layer, m in per_layer.items():
        log.info("%5s  %.4f  %.4f  %.4f", layer, m["top1"], m["top5"], m["loss"])
    log.info(
        "best: layer %d, top-1 %.4f on %d images; wrote %s and %s",
        int(best),
        per_layer[best]["top1"],
        len(val_labels),
        out / "linear_probe.json",
        out / "per_layer.csv",
    )
    return metrics
