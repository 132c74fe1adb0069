"""Resuming: the checkpoint ``ckpt_path`` means, and how training checkpoints are read and written.

* ``ckpt_path=auto`` resumes from the newest readable checkpoint of the run's checkpoint directory
  (:func:`resolve_ckpt_path`): ``last.ckpt`` (or Lightning's ``last-vN.ckpt``) and SLURM's
  ``hpc_ckpt_N.ckpt``, newest first, else ``step_*.ckpt`` by step; none: a fresh start. A
  candidate is checked without reading its tensors, so the chosen one is read once, by Lightning.
* :class:`SafeCheckpointIO`: Lightning's checkpoint I/O with atomic writes and ``weights_only=True``
  reads.
* :func:`latest_checkpoint`: the newest ``last.ckpt`` of any run of a task (the
  ``${latest_checkpoint:pretrain}`` resolver of the fine-tuning demo).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from bitrain.io import CheckpointError, atomic_save, load_torch_file

__all__ = ["AUTO", "SafeCheckpointIO", "latest_checkpoint", "resolve_ckpt_path"]

log = logging.getLogger(__name__)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: atomic writes (temp + rename), ``weights_only=True`` reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_torch_file(path, map_location="cpu", what="training checkpoint")


def latest_checkpoint(task: str, log_dir: str | os.PathLike) -> str:
    """The newest ``last*.ckpt`` of any run of ``task`` under ``log_dir`` (``outputs/``).

    Raises:
        FileNotFoundError: there is none; the message names the command that makes one.
    """
    root = Path(log_dir) / task
    found = [p for p in root.glob("**/checkpoints/last*.ckpt") if _LAST_FILE.fullmatch(p.name)]
    if not found:
        raise FileNotFoundError(
            f"no {task} checkpoint under {root}/<run>/checkpoints/: run `make demo` or "
            f"`python -m bitrain.{task}` first, or give model.pretrained=PATH "
            "(model.pretrained=null trains from scratch)"
        )
    return str(max(found, key=lambda p: p.stat().st_mtime))


AUTO = "auto"
_STEP_FILE = re.compile(r"step_(\d+)")
_LAST_FILE = re.compile(r"last(-v\d+)?\.ckpt")
_HPC_FILE = re.compile(r"hpc_ckpt_\d+\.ckpt")


def _readable_checkpoint(path: Path) -> None:
    """Check that ``path`` is a whole training checkpoint, without reading its tensors.

    The file is opened as ``torch.load(weights_only=True, mmap=True)`` opens it: the zip's central
    directory (written last, so a file cut short has none), the pickled records (every entry
    checked by the weights-only unpickler) and each tensor's place in the file are read, the
    tensors' bytes are only mapped. A multi-GB checkpoint is then read once, by Lightning, not
    twice. Damaged bytes *inside* a tensor are not seen here (torch.load does not see them
    either: it checks no CRC). A file in torch's legacy (non-zip) format is read whole.

    Raises:
        CheckpointError: the file is truncated, corrupt, refused, or holds no ``state_dict``.
    """
    ckpt = load_torch_file(path, map_location="cpu", what="training checkpoint", mmap=True)
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"'{path}' holds no 'state_dict': it is not a Lightning training checkpoint"
        )


def _candidates(checkpoint_dir: Path) -> list[Path]:
    """``last*.ckpt`` and ``hpc_ckpt_*.ckpt`` newest file first, then ``step_*.ckpt`` by step.

    Lightning's ``ModelCheckpoint`` writes ``last-v1.ckpt`` instead of overwriting a ``last.ckpt``
    it did not write itself (e.g. after a resume from a ``step_*`` file), so every ``last*`` file
    counts, the most recently written first. SLURM auto-requeue (SIGUSR1) writes
    ``hpc_ckpt_N.ckpt`` in the run directory, the checkpoint directory's parent.
    """
    lasts = [p for p in checkpoint_dir.glob("last*.ckpt") if _LAST_FILE.fullmatch(p.name)]
    lasts += [
        p for p in checkpoint_dir.parent.glob("hpc_ckpt_*.ckpt") if _HPC_FILE.fullmatch(p.name)
    ]
    lasts = [p for p in lasts if p.is_file()]
    lasts.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    steps = []
    for path in checkpoint_dir.glob("step_*.ckpt"):
        match = _STEP_FILE.match(path.name)
        if match and path.is_file():
            steps.append((int(match.group(1)), path.stat().st_mtime, path))
    steps.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return lasts + [path for _, _, path in steps]


def resolve_ckpt_path(
    ckpt_path: str | None, checkpoint_dir: str | os.PathLike | None = None
) -> str | None:
    """The checkpoint to resume from, checked readable; ``None`` for a fresh start.

    Args:
        ckpt_path: ``None``/``""`` (fresh start), the path of a ``.ckpt``, or ``"auto"``: the
            newest readable checkpoint in ``checkpoint_dir`` (``last.ckpt`` or Lightning's
            ``last-vN.ckpt``, newest file first; else ``step_*.ckpt`` by step). Unreadable
            (truncated, corrupt) files are skipped with a warning in favour of the previous one;
            none readable (or none at all): ``None``.
        checkpoint_dir: the run's checkpoint directory (needed for ``"auto"``).

    Raises:
        FileNotFoundError: an explicit ``ckpt_path`` does not exist.
        CheckpointError: an explicit ``ckpt_path`` cannot be read as a training checkpoint.
        ValueError: ``"auto"`` without a ``checkpoint_dir``.
    """
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) == AUTO:
        if checkpoint_dir is None:
            raise ValueError("ckpt_path=auto needs the run's checkpoint directory to search")
        return _newest_readable(Path(checkpoint_dir).expanduser())
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path='{ckpt_path}' does not exist; pass the path of a .ckpt written by a "
            "previous run (its checkpoints/last.ckpt), or ckpt_path=auto"
        )
    try:
        _readable_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(
            f"cannot resume from ckpt_path='{path}': {err}. Pass an earlier "
            f"{path.parent}/step_*.ckpt, or ckpt_path=auto with the same paths.output_dir to "
            "pick the newest readable one"
        ) from err
    return str(path)


def _newest_readable(checkpoint_dir: Path) -> str | None:
    candidates = _candidates(checkpoint_dir) if checkpoint_dir.is_dir() else []
    if not candidates:
        log.info("ckpt_path=auto: no checkpoint in %s, starting a fresh run", checkpoint_dir)
        return None
    for path in candidates:
        try:
            _readable_checkpoint(path)
        except (CheckpointError, OSError) as err:
            log.warning("ckpt_path=auto: skipping unreadable checkpoint %s (%s)", path, err)
            continue
        log.info("ckpt_path=auto: newest readable checkpoint is %s", path)
        return str(path)
    log.warning(
        "ckpt_path=auto: none of the %d checkpoints in %s is readable; starting a fresh run",
        len(candidates),
        checkpoint_dir,
    )
    return None
