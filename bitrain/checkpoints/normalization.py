"""The pixel normalisation and evaluation preprocessing a checkpoint records, in every format.

A pretrained encoder only works on pixels normalised as in its pretraining: the ImageNet-1k BEiT
recipe uses ImageNet's mean/std, the ImageNet-22k chain 0.5 / 0.5
(``--imagenet_default_mean_and_std`` or not, ``beit/datasets.py``). bitrain files record
``normalization`` (``{"mean", "std"}``) and ``eval_transform``
(:func:`~bitrain.data.preprocessing.read_record`) in ``hyper_parameters``, official ``args`` and
timm ``config.json`` as ``bitrain_*``; else a format's own fields are read: unilm's ``args``, a
Hugging Face ``preprocessor_config.json``, timm's ``pretrained_cfg``. Files that record nothing give
None; fine-tuning then keeps the experiment's values (:func:`bitrain.training.runner.build`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from bitrain.checkpoints.hf import read_json
from bitrain.checkpoints.official import plain_args
from bitrain.checkpoints.sniff import Sniffed, sniff
from bitrain.data.preprocessing import (
    EvalPreprocessing,
    channels,
    from_official_args,
    from_processor_config,
    from_timm_cfg,
    official_normalization,
    read_record,
)
from bitrain.io import CheckpointError

__all__ = [
    "Normalization",
    "normalization_of",
    "normalization_record",
    "preprocessing_of",
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
    mean = channels(record["mean"], f"{where}: mean")
    std = channels(record["std"], f"{where}: std", positive=True)
    if max(map(abs, mean + std)) > 1e6:
        raise CheckpointError(f"{where}: {record!r} holds values beyond 1e6")
    return mean, std


def recorded_normalization(path: str | os.PathLike) -> Normalization | None:
    """``(mean, std)`` the checkpoint at ``path`` records (read memory-mapped), or None.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: unreadable or unsafe, or a record that is not plain numbers.
    """
    return normalization_of(sniff(path, mmap=True))


def _records(found: Sniffed) -> tuple[Mapping[str, Any], str]:
    """The mapping a sniffed file keeps bitrain's records in, and its name for errors."""
    if found.format == "bitrain":
        return found.obj["hyper_parameters"], f"'{found.path}' hyper_parameters"
    if found.format == "official":
        return plain_args(found.obj.get("args")), f"'{found.path}' args"
    if found.format == "timm" and found.path.is_dir():
        return found.obj, f"'{found.path / 'config.json'}'"
    return {}, f"'{found.path}'"


def normalization_of(found: Sniffed) -> Normalization | None:
    """:func:`recorded_normalization` of what :func:`~bitrain.checkpoints.sniff` found."""
    records, where = _records(found)
    key = "normalization" if found.format == "bitrain" else "bitrain_normalization"
    if records.get(key) is not None:
        return read_normalization(records[key], f"{where}.{key}")
    if found.format in ("official", "timm") and records.get("bitrain_eval_transform") is None:
        cfg = records.get("pretrained_cfg")
        if found.format == "official" and "imagenet_default_mean_and_std" in records:
            return official_normalization(records)  # unilm's own args
        if isinstance(cfg, Mapping) and cfg.get("mean") is not None and cfg.get("std") is not None:
            return read_normalization(
                {k: cfg[k] for k in ("mean", "std")}, f"{where} pretrained_cfg"
            )
        return None
    spec = preprocessing_of(found)
    return None if spec is None else (spec.mean, spec.std)


def preprocessing_of(found: Sniffed) -> EvalPreprocessing | None:
    """The evaluation preprocessing a sniffed checkpoint records (validated), or None."""
    if found.format == "hf":
        processor = found.path / "preprocessor_config.json"
        if not processor.is_file():
            return None
        return from_processor_config(read_json(processor), str(processor))
    records, where = _records(found)
    key = "eval_transform" if found.format == "bitrain" else "bitrain_eval_transform"
    if records.get(key) is not None:
        return read_record(records[key], f"{where}.{key}")
    if found.format == "official" and records.get("input_size") is not None:
        return from_official_args(records, where)
    if found.format == "timm" and records:
        cfg = records.get("pretrained_cfg") or {}
        if not isinstance(cfg, Mapping):
            raise CheckpointError(
                f"{where}: pretrained_cfg is a {type(cfg).__name__}, not a mapping"
            )
        if cfg.get("input_size"):
            return from_timm_cfg(cfg, f"{where} pretrained_cfg")
    return None
