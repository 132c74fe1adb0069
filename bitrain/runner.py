"""What every entry point shares: seeding, building objects from the config, the Trainer, resume.

An entry point composes its Hydra config and calls :func:`train`; everything else happens here, so
``pretrain.py`` and ``train_tokenizer.py`` stay a few lines long (as lightning-hydra-template).

* ``cfg.data`` builds a ``LightningDataModule``; when the config has a ``masking`` group, the mask
  generator is built from it and handed to the data module (data never imports a model).
* ``cfg.task`` builds the ``LightningModule`` (``_recursive_: false``: it receives plain configs of
  its model, tokenizer and optimizer and records them as hyper-parameters).
* ``cfg.callbacks`` and ``cfg.logger`` are mappings of nodes with ``_target_``.
* Checkpoints are written atomically, read with ``weights_only=True`` (:class:`SafeCheckpointIO`).
* The run directory is checked first (:mod:`bitrain.rundir`): writable, and no fresh start over
  an earlier run's files.
* ``ckpt_path=auto`` resumes from the newest readable checkpoint of the run's checkpoint directory
  (:func:`resolve_ckpt_path`): ``last.ckpt``, else ``step_*.ckpt`` by step; none: a fresh start.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from hydra.errors import InstantiationException
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from bitrain.checkpoints.normalization import recorded_normalization
from bitrain.cluster import (
    PreemptionCheckpoint,
    apply_global_batch,
    check_devices,
    exit_code_for,
)
from bitrain.hyperrule import apply_hyperrule
from bitrain.io import CheckpointError, atomic_save, load_torch_file
from bitrain.rundir import check_fresh_start, check_writable, checkpoint_dir_of

log = logging.getLogger(__name__)

# ${div:a,b} -> a // b (grid size from image and patch size in configs).
OmegaConf.register_new_resolver("div", lambda a, b: int(a) // int(b), replace=True)


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


# ${latest_checkpoint:pretrain} -> the newest outputs/pretrain/<run>/checkpoints/last.ckpt.
OmegaConf.register_new_resolver(
    "latest_checkpoint",
    lambda task, *, _root_: latest_checkpoint(task, _root_.paths.log_dir),
    replace=True,
)


def _required(what: str) -> str:
    raise ValueError(f"missing a value this config needs: give {what}")


# ${required:KEY=WHAT} fails with a message naming the key when it is not overridden.
OmegaConf.register_new_resolver("required", _required, replace=True)

# Map-style training data resumes mid-epoch exactly (the data module's state + EpochSampler skip
# the consumed samples), so Lightning's generic warning about non-resumable loaders is wrong here;
# iterable sources warn on their own (bitrain.data.datamodule).
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")


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
        built = hydra.utils.instantiate(node)
        if built is not None:  # a factory may decline (the progress bar when it is disabled)
            out.append(built)
    return out


def check_output_dir(path: str | os.PathLike, min_free_gb: float = 0.0) -> Path:
    """Create the run directory and fail early, naming it, if it is not writable or too full."""
    path = check_writable(path)
    free_gb = shutil.disk_usage(path).free / 2**30
    if free_gb < min_free_gb:
        raise OSError(
            f"only {free_gb:.1f} GiB free under '{path}', need paths.min_free_gb={min_free_gb}"
        )
    return path


AUTO = "auto"
_STEP_FILE = re.compile(r"step_(\d+)")
_LAST_FILE = re.compile(r"last(-v\d+)?\.ckpt")
_HPC_FILE = re.compile(r"hpc_ckpt_\d+\.ckpt")


def _readable_checkpoint(path: Path) -> None:
    """Load ``path`` as a training checkpoint; :class:`CheckpointError` if it is not one."""
    ckpt = load_torch_file(path, map_location="cpu", what="training checkpoint")
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


class StartupError(RuntimeError):
    """More than one part of a run cannot be built; the message lists every one."""


def _mask_generator(cfg: DictConfig) -> Any:
    mask_generator = hydra.utils.instantiate(cfg)
    if getattr(mask_generator, "num_masking_patches", None) == 0:
        raise ValueError(
            "masking.num_masking_patches=0 masks no patch: masked image modeling predicts "
            "the tokens of the masked patches, so every loss would be NaN and every step "
            "skipped. Mask at least one patch (BEiT: 75 of 196, about 40% of the grid)"
        )
    return mask_generator


def _root_message(err: BaseException) -> str:
    """The innermost error's message (Hydra wraps a constructor's error in its own)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return " ".join(str(err).split()) or type(err).__name__


def _key_of(group: str, err: BaseException) -> str:
    """The config key that failed (Hydra's ``full_key``), else the group."""
    match = re.search(r"full_key: (\S+)", str(err))
    return match.group(1) if match else group


def _raise_problems(problems: list[tuple[str, Exception]]) -> None:
    """One problem: its own exception. Several: a :class:`StartupError` naming each one."""
    if len(problems) == 1:
        raise problems[0][1]
    if problems:
        lines = "\n".join(
            f"  - {_key_of(what, err)}: {_root_message(err)}" for what, err in problems
        )
        raise StartupError(
            f"{len(problems)} problems stop this run before it starts:\n{lines}\n"
            "(`python -m bitrain.doctor` with the same overrides checks the tokenizer, data, "
            "devices and output directory without starting a run)"
        ) from problems[0][1]


def use_pretrained_normalization(cfg: DictConfig) -> tuple | None:
    """Fine-tuning: normalise pixels as the checkpoint in ``model.pretrained`` was trained to.

    When the checkpoint records its normalisation (:mod:`bitrain.checkpoints.normalization`), it
    replaces ``data.transform`` / ``data.val_transform``'s ``mean`` and ``std``, with a warning
    naming both values where the config said otherwise; a checkpoint that records none (a released
    official ``.pth``) leaves the experiment's values. ``normalize_as_pretrained: false`` keeps the
    config's. Returns the ``(mean, std)`` used from the checkpoint, or None.
    """
    pretrained = OmegaConf.select(cfg, "model.pretrained")
    if not pretrained or not cfg.get("normalize_as_pretrained", True):
        return None
    path = Path(str(pretrained)).expanduser()
    if not path.exists():
        return None  # the model's own loading says what is missing
    try:
        recorded = recorded_normalization(path)
    except (CheckpointError, FileNotFoundError):
        return None  # unreadable or refused: the model's own loading reports it, once
    if recorded is None:
        log.info("%s records no normalisation: the config's mean/std are used", path)
        return None
    mean, std = (list(v) for v in recorded)
    for key in ("data.transform", "data.val_transform"):
        node = OmegaConf.select(cfg, key)
        if not isinstance(node, DictConfig) or "mean" not in node or "std" not in node:
            continue
        have = [float(v) for v in node.mean], [float(v) for v in node.std]
        same = len(have[0]) == len(mean) and len(have[1]) == len(std)
        same = same and all(
            math.isclose(a, b, rel_tol=1e-6) for a, b in zip([*have[0], *have[1]], [*mean, *std])
        )
        if not same:
            log.warning(
                "%s.mean/std = %s / %s, but %s was trained with mean %s / std %s: fine-tuning "
                "normalises as pretraining did (normalize_as_pretrained=false keeps the config's)",
                key, have[0], have[1], path, mean, std,
            )  # fmt: skip
        with open_dict(node):
            node.mean, node.std = mean, std
    return mean, std


def build(
    cfg: DictConfig, callbacks: Sequence[L.Callback] = ()
) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Build data module, task and Trainer from a composed config (no training yet).

    Args:
        cfg: the composed config.
        callbacks: callbacks to add to those of ``cfg.callbacks`` (a launcher's, a test's).
    """
    problems: list[tuple[str, Exception]] = []  # named all at once (a run has many inputs)

    def attempt(what: str, make: Callable[[], Any]) -> Any:
        try:
            return make()
        except Exception as err:  # collected, then raised together below
            problems.append((what, err))
            return None

    attempt("trainer", lambda: check_devices(cfg.trainer))  # GPUs there; CPU processes (warning)
    apply_hyperrule(cfg)  # hyperrule: true -> BiT-HyperRule schedule, resolution, Mixup
    apply_global_batch(cfg)  # data.global_batch_size -> per-device batch + accumulation
    attempt("data", lambda: use_pretrained_normalization(cfg))
    datamodule = None
    if "masking" in cfg and cfg.masking is not None:
        mask_generator = attempt("masking", lambda: _mask_generator(cfg.masking))
        if mask_generator is not None:
            datamodule = attempt(
                "data", lambda: hydra.utils.instantiate(cfg.data, mask_generator=mask_generator)
            )
    else:
        datamodule = attempt("data", lambda: hydra.utils.instantiate(cfg.data))
    task = attempt("task", lambda: hydra.utils.instantiate(cfg.task))
    _raise_problems(problems)
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=[
            *instantiate_group(cfg.get("callbacks")),
            RNGStateCheckpoint(),
            PreemptionCheckpoint(checkpoint_dir_of(cfg)),
            *callbacks,
        ],
        logger=instantiate_group(cfg.get("logger")) or False,
        plugins=[SafeCheckpointIO()],
    )
    return datamodule, task, trainer


def train_cli(cfg: DictConfig, command: str) -> dict[str, Any]:
    """:func:`train` for the entry points: input problems end the command with their message.

    A refused or unreadable file, a missing input, or several start-up problems print what is
    wrong and exit 1, without a traceback (whose chained text could repeat torch's advice to
    load with ``weights_only=False``); ``HYDRA_FULL_ERROR=1`` shows the traceback. Any other
    error keeps its traceback.
    """
    try:
        return train(cfg)
    except (CheckpointError, FileNotFoundError, StartupError, InstantiationException) as err:
        root = err
        while root.__cause__ is not None:
            root = root.__cause__
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not isinstance(
            root, CheckpointError | FileNotFoundError | StartupError
        ):
            raise
        message = str(err) if isinstance(err, StartupError) else _root_message(err)
        raise SystemExit(f"{command}: {message}") from None


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Fit the configured task; return a summary (output dir, last checkpoint, final metrics)."""
    out_dir = check_output_dir(cfg.paths.output_dir, cfg.paths.get("min_free_gb", 0.0))
    check_fresh_start(out_dir, checkpoint_dir_of(cfg), cfg.get("ckpt_path"))
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir_of(cfg))
    datamodule, task, trainer = build(cfg, callbacks)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    except SystemExit as err:  # SIGTERM/Ctrl-C: checkpoint written (PreemptionCheckpoint)
        stop = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
        code = exit_code_for(err, stop.signum if stop is not None else None)
        if code is None:
            raise
        raise SystemExit(code) from err
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    last = out_dir / "checkpoints" / "last.ckpt"
    return {
        "output_dir": str(out_dir),
        "last_checkpoint": str(last) if last.exists() else None,
        "global_step": trainer.global_step,
        "metrics": metrics,
    }
