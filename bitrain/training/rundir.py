"""Run directories: their names, and the checks made before anything is written into them.

**Name.** ``hydra.run.dir`` is ``outputs/<task>/<run name>`` where the run name is, in order
(:func:`run_dir_name`, the ``${run_dir:...}`` resolver): ``paths.run_name`` when given;
``slurm-<job id>`` (``<array job>_<task>`` for array jobs) inside a SLURM job, so a requeued job
finds its own directory and ``ckpt_path=auto`` resumes it; else ``<date>/<time>`` of the start.

Two checks, made by :class:`RunDirCheck` (a Hydra callback, ``configs/hydra/default.yaml``) before
Hydra creates the run directory, its ``.hydra/`` and its log file, and again by
:func:`bitrain.training.runner.train` (for configs composed without ``@hydra.main``: tests, sweeps):

* **Writable** (:func:`check_writable`): the directory is created and a probe file written. A path
  under a file, in ``/proc`` or ``/sys``, on a read-only mount or without permission is refused
  with one message naming the path, the reason and the keys that move it.
* **No fresh start over an earlier run** (:func:`check_fresh_start`): a training run without
  ``ckpt_path`` in a directory that already holds a run (its ``metrics.csv``, checkpoints or wandb
  run id) would cut that ``metrics.csv`` to the new rows, overwrite its checkpoints and
  ``.hydra/`` and continue its wandb run. It is refused; the message names ``ckpt_path=auto``
  (continue that run: what a requeued SLURM job does) and how to start a new one (another
  ``paths.run_name``, or move the directory away). A resume (``ckpt_path=auto`` or a path) is
  always allowed: it replaces only what was logged after its checkpoint.

What Hydra itself writes before a job (``.hydra/``, ``<task>.log``) does not count as a run, so a
run that failed before training (a missing file, a typo) can be started again under its name.
"""

from __future__ import annotations

import copy
import errno
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

__all__ = [
    "RunDirCheck",
    "RunDirError",
    "check_fresh_start",
    "check_writable",
    "checkpoint_dir_of",
    "earlier_run_files",
    "is_first_process",
    "run_dir_name",
    "slurm_job_id",
]

_MOVE_IT = "Set paths.root_dir / paths.log_dir, paths.run_name or hydra.run.dir to a writable place"
_PROBE = ".write_test"


_START = datetime.now()  # one timestamp per process, however often the run dir is resolved


def slurm_job_id(environ: dict[str, str] | None = None) -> str | None:
    """The SLURM job id (``<array job id>_<task id>`` for array jobs), ``None`` outside SLURM.

    Interactive allocations (``SLURM_JOB_NAME`` ``bash``/``interactive``) count as no job, as
    Lightning does, so a shell on a compute node does not pin every run to one directory.
    """
    env = os.environ if environ is None else environ
    if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return env.get("SLURM_JOB_ID") or None


def run_dir_name(run_name: Any = None, environ: dict[str, str] | None = None) -> str:
    """The run directory's name under ``outputs/<task>/`` (see the module docstring)."""
    if run_name not in (None, "", "null"):
        name = str(run_name)
        if name.startswith("/") or ".." in Path(name).parts:
            raise ValueError(f"paths.run_name={name!r} must be a relative name without '..'")
        return name
    job = slurm_job_id(environ)
    if job:
        return f"slurm-{job}"
    return _START.strftime("%Y-%m-%d/%H-%M-%S")


class RunDirError(CompactHydraException):
    """The run directory cannot be used; Hydra prints the message alone, without a traceback."""


def checkpoint_dir_of(cfg: DictConfig) -> Path:
    """The run's checkpoint directory (``callbacks.model_checkpoint.dirpath``, else the default).

    The default is ``paths.output_dir/checkpoints`` (``configs/callbacks/default.yaml``).
    """
    node = (cfg.get("callbacks") or {}).get("model_checkpoint")
    dirpath = node.get("dirpath") if node is not None else None
    return Path(dirpath) if dirpath else Path(cfg.paths.output_dir) / "checkpoints"


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _why_not_writable(path: Path, err: OSError) -> str:
    """A short reason for ``err`` raised while creating or writing in ``path``."""
    existing = _existing_ancestor(path)
    if existing.exists() and not existing.is_dir():
        return f"'{existing}' is a file, not a directory"
    top = path.parts[1] if len(path.parts) > 1 else ""
    if top in ("proc", "sys"):
        return f"/{top} is the kernel's view of processes and devices, not a place for files"
    if err.errno == errno.EROFS:
        return "it is on a read-only file system"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write in '{existing}'"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    return err.strerror or str(err)


def check_writable(path: str | os.PathLike) -> Path:
    """Create the run directory ``path`` and write a probe file in it.

    Raises:
        RunDirError: it cannot be created or written; the message names the path and the reason.
    """
    path = Path(path).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / _PROBE
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise RunDirError(
            f"cannot write the run directory '{path}': {_why_not_writable(path, err)} "
            f"({err.strerror or err}). {_MOVE_IT}"
        ) from err
    return path


def earlier_run_files(out_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike) -> list[Path]:
    """What an earlier run left in ``out_dir``: metrics.csv, checkpoints, wandb's run id.

    ``.hydra/`` and the log file are not counted: Hydra writes them before any training starts.
    """
    out_dir, checkpoint_dir = Path(out_dir), Path(checkpoint_dir)
    found = [out_dir / name for name in ("metrics.csv", "wandb_run_id")]
    found = [p for p in found if p.is_file()]
    if checkpoint_dir.is_dir():
        found += sorted(p for p in checkpoint_dir.glob("*.ckpt") if p.is_file())
    found += sorted(p for p in out_dir.glob("hpc_ckpt_*.ckpt") if p.is_file())
    return found


# Set by torchrun, Lightning's process launcher, SLURM and multi-node launches.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def is_first_process(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is global rank 0 (every rank variable that is set is 0).

    Read from the environment, as Lightning's ``rank_zero_only`` does, since the check runs
    before any process group exists.
    """
    env = os.environ if environ is None else environ
    return all(env.get(key, "0").strip() in ("", "0") for key in _RANK_VARIABLES)


def check_fresh_start(
    out_dir: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    ckpt_path: Any,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Refuse a fresh start (no ``ckpt_path``) where an earlier run's files are.

    Only the first process checks: under DDP the other ranks start when (Lightning's launcher) or
    while (torchrun, srun) the first one writes this run's own files; they write none of them.

    Raises:
        RunDirError: ``ckpt_path`` is empty and ``out_dir`` holds an earlier run; the message
            names what was found, ``ckpt_path=auto`` and how to start a new run instead.
    """
    if ckpt_path not in (None, "") or not is_first_process(environ):
        return
    found = earlier_run_files(out_dir, checkpoint_dir)
    if not found:
        return
    out_dir = Path(out_dir)
    shown = [os.path.relpath(p, out_dir) if p.is_relative_to(out_dir) else str(p) for p in found]
    listed = ", ".join(shown[:4]) + (f" and {len(shown) - 4} more" if len(shown) > 4 else "")
    raise RunDirError(
        f"the run directory '{out_dir}' already holds a run ({listed}); a fresh start there "
        "would overwrite its metrics.csv, checkpoints and config. To continue that run, add "
        "ckpt_path=auto. To start a new run, give another paths.run_name (or hydra.run.dir), or "
        "move that directory away first"
    )


class RunDirCheck(Callback):
    """Hydra callback: both checks, before Hydra makes the run directory or starts its log.

    Hydra turns an exception raised by a callback into a warning and carries on, so a refusal
    ends the process here (``SystemExit`` with the message: printed alone, exit status 1).
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._check(config)
        except RunDirError as err:
            raise SystemExit(str(err)) from None

    @staticmethod
    def _check(config: DictConfig) -> None:
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir"))).expanduser().absolute()
        training = config.get("trainer") is not None and "ckpt_path" in config
        if training:
            cfg = copy.deepcopy(config)
            with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
                cfg.hydra.runtime.output_dir = str(run_dir)  # what run_job sets next
            previous = HydraConfig.instance().cfg
            HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.output_dir} resolves
            try:
                out_dir = Path(str(cfg.paths.output_dir)).expanduser().absolute()
                check_fresh_start(out_dir, checkpoint_dir_of(cfg), cfg.get("ckpt_path"))
            finally:
                HydraConfig.instance().cfg = previous
        check_writable(run_dir)
