"""Random-number states in checkpoints, so a resumed run draws what the uninterrupted run would."""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch

__all__ = ["RNGStateCheckpoint"]

log = logging.getLogger(__name__)


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
