"""What every entry point shares: seeding, building objects from the config, the Trainer, resume.

An entry point composes its Hydra config and calls :func:`train`; everything else happens here, so
``pretrain.py`` and ``train_tokenizer.py`` stay a few lines long (as lightning-hydra-template).

* ``cfg.data`` builds a ``LightningDataModule``; when the config has a ``masking`` group, the mask
  generator is built from it and handed to the data module (data never imports a model).
* ``cfg.task`` builds the ``LightningModule`` (``_recursive_: false``: it receives plain configs of
  its model, tokenizer and optimizer and records them as hyper-parameters).
* ``cfg.callbacks`` and ``cfg.logger`` are mappings of nodes with ``_target_``.
* Checkpoints are written atomically, read with ``weights_only=True`` (:class:`SafeCheckpointIO`).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from bitrain.io import atomic_save, load_torch_file

log = logging.getLogger(__name__)

# ${div:a,b} -> a // b (grid size from image and patch size in configs).
OmegaConf.register_new_resolver("div", lambda a, b: int(a) // int(b), replace=True)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: atomic writes (temp + rename), ``weights_only=True`` reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_torch_file(path, map_location="cpu", what="training checkpoint")


class RNGStateCheckpoint(L.Callback):
    """Save the Python, NumPy and torch RNG states in every checkpoint and restore them on resume.

    Lightning does not checkpoint RNG states; without them a resumed run draws other augmentations,
    masks and drop-path patterns than the uninterrupted run would have. Stored as tensors and plain
    values so the checkpoint still loads with ``weights_only=True``.
    """

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng_states"] = {
            "python": random.getstate(),
            "numpy": [
                name,
                torch.from_numpy(keys.astype(np.int64)),
                int(pos),
                int(has_gauss),
                float(cached),
            ],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if not states:
            log.warning("checkpoint has no RNG states: the resumed run draws new random numbers")
            return
        random.setstate(_as_tuple(states["python"]))
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(states["torch"])
        if states.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples; a checkpoint round trip may return lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` node of a mapping group (callbacks, loggers); skip nulls."""
    if not cfg:
        return []
    out = []
    for name, node in cfg.items():
        if node is None:
            continue
        if not (isinstance(node, Mapping | DictConfig) and "_target_" in node):
            raise ValueError(f"config node '{name}' has no _target_: cannot build it")
        out.append(hydra.utils.instantiate(node))
    return out


def check_output_dir(path: str | os.PathLike, min_free_gb: float = 0.0) -> Path:
    """Create the run directory and fail early, naming it, if it is not writable or too full."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"output directory '{path}' is not writable: {err}") from err
    free_gb = shutil.disk_usage(path).free / 2**30
    if free_gb < min_free_gb:
        raise OSError(
            f"only {free_gb:.1f} GiB free under '{path}', need paths.min_free_gb={min_free_gb}"
        )
    return path


def resolve_ckpt_path(ckpt_path: str | None) -> str | None:
    """Return ``ckpt_path`` if it names a readable file; a clear error otherwise."""
    if ckpt_path in (None, ""):
        return None
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path='{ckpt_path}' does not exist; pass the path of a .ckpt written by a "
            "previous run (its checkpoints/last.ckpt)"
        )
    return str(path)


def build(
    cfg: DictConfig, callbacks: Sequence[L.Callback] = ()
) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Build data module, task and Trainer from a composed config (no training yet).

    Args:
        cfg: the composed config.
        callbacks: callbacks to add to those of ``cfg.callbacks`` (a launcher's, a test's).
    """
    if "masking" in cfg and cfg.masking is not None:
        mask_generator = hydra.utils.instantiate(cfg.masking)
        datamodule = hydra.utils.instantiate(cfg.data, mask_generator=mask_generator)
    else:
        datamodule = hydra.utils.instantiate(cfg.data)
    task = hydra.utils.instantiate(cfg.task)
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=[*instantiate_group(cfg.get("callbacks")), RNGStateCheckpoint(), *callbacks],
        logger=instantiate_group(cfg.get("logger")) or False,
        plugins=[SafeCheckpointIO()],
    )
    return datamodule, task, trainer


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Fit the configured task; return a summary (output dir, last checkpoint, final metrics)."""
    out_dir = check_output_dir(cfg.paths.output_dir, cfg.paths.get("min_free_gb", 0.0))
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"))
    datamodule, task, trainer = build(cfg, callbacks)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    last = out_dir / "checkpoints" / "last.ckpt"
    return {
        "output_dir": str(out_dir),
        "last_checkpoint": str(last) if last.exists() else None,
        "global_step": trainer.global_step,
        "metrics": metrics,
    }
