"""The pixel normalisation a checkpoint was trained with, in every format that can say it.

A pretrained encoder only works on pixels normalised as in its pretraining: the ImageNet-1k BEiT
recipe uses ImageNet's mean/std, the ImageNet-22k chain 0.5 / 0.5
(``--imagenet_default_mean_and_std`` or not, ``beit/datasets.py``). Where each format keeps it:

=================  ============================================================================
bitrain ``.ckpt``  ``hyper_parameters["normalization"]`` (``{"mean", "std"}``: pretraining and
                   fine-tuning runs record their training transform's); a classifier's
                   evaluation preprocessing record
official ``.pth``  ``args.bitrain_normalization``, else unilm's own
                   ``args.imagenet_default_mean_and_std``
Hugging Face       ``preprocessor_config.json`` ``image_mean`` / ``image_std``
timm folder        bitrain's record, else ``pretrained_cfg`` ``mean`` / ``std``
=================  ============================================================================

:func:`recorded_normalization` reads it without loading the tensors (memory-mapped); files that
record nothing (the released official ``.pth`` files, bare state dicts) give None, and fine-tuning
then keeps the experiment's values (:func:`bitrain.runner.build`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from bitrain.checkpoints.hf import read_json
from bitrain.checkpoints.sniff import Sniffed, sniff
from bitrain.data.preprocessing import (
    from_processor_config,
    from_timm_args,
    official_normalization,
    read_record,
)
from bitrain.io import CheckpointError

__all__ = [
    "Normalization",
    "normalization_of",
    "normalization_record",
    "read_normalization",
    "recorded_normalization",
]

Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def normalization_record(mean: Any, std: Any) -> dict[str, list[float]]:
    """``{"mean": [...], "std": [...]}``, validated (1 or 3 finite numbers, std > 0)."""
    mean_, std_ = read_normalization({"mean": mean, "std": std}, "normalization")
    return {"mean": list(mean_), "std": list(std_)}


def read_normalization(record: Any, where: str) -> Normalization:
    """A ``{"mean", "std"}`` record as data; anything else is a CheckpointError naming ``where``."""
    if not isinstance(record, Mapping) or set(record) != {"mean", "std"}:
        raise CheckpointError(f"{where}: {record!r} is not a {{mean, std}} record")
    values = []
    for key in ("mean", "std"):
        value = record[key]
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value] * 3
        if not isinstance(value, list | tuple) or len(value) not in (1, 3):
            raise CheckpointError(f"{where}: {key} {value!r} is not 1 or 3 numbers")
        floats = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int | float) or v != v or abs(v) > 1e6:
                raise CheckpointError(f"{where}: {key} {value!r} is not finite numbers")
            floats.append(float(v))
        if key == "std" and min(floats) <= 0:
            raise CheckpointError(f"{where}: std {value!r} must be positive")
        values.append(tuple(floats))
    return values[0], values[1]


def recorded_normalization(path: str | os.PathLike) -> Normalization | None:
    """``(mean, std)`` the checkpoint at ``path`` records, or None when it records none.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: unreadable or unsafe, or a record that is not plain numbers.
    """
    return normalization_of(sniff(path, mmap=True))


def normalization_of(found: Sniffed) -> Normalization | None:
    """:func:`recorded_normalization` of what :func:`~bitrain.checkpoints.sniff` found."""
    obj, where = found.obj, f"'{found.path}'"
    if found.format == "bitrain":
        hparams = obj["hyper_parameters"]
        if hparams.get("normalization") is not None:
            return read_normalization(hparams["normalization"], f"{where} normalization")
        if hparams.get("eval_transform") is not None:
            spec = read_record(hparams["eval_transform"], f"{where} eval_transform")
            return spec.mean, spec.std
        return None
    if found.format == "official":
        args = obj.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
        if args.get("bitrain_normalization") is not None:
            return read_normalization(args["bitrain_normalization"], f"{where} args")
        if args.get("bitrain_eval_transform") is not None:
            spec = read_record(args["bitrain_eval_transform"], f"{where} args")
            return spec.mean, spec.std
        if "imagenet_default_mean_and_std" in args:
            return official_normalization(args)
        return None
    if found.path.is_dir():
        if found.format == "hf":
            processor = found.path / "preprocessor_config.json"
            if not processor.is_file():
                return None
            spec = from_processor_config(read_json(processor), str(processor))
            return spec.mean, spec.std
        if found.obj.get("bitrain_eval_transform") is not None:
            spec = read_record(found.obj["bitrain_eval_transform"], f"{where} config.json")
            return spec.mean, spec.std
        cfg = found.obj.get("pretrained_cfg") or {}
        if isinstance(cfg, Mapping) and cfg.get("mean") is not None and cfg.get("std") is not None:
            spec = from_timm_args({"input_size": 224, "mean": cfg["mean"], "std": cfg["std"]})
            return spec.mean, spec.std
    return None
