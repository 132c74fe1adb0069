"""What every entry point shares: seeding, building objects from the config, the Trainer, resume.

An entry point composes its Hydra config and calls :func:`train`; everything else happens here, so
``pretrain.py`` and ``train_tokenizer.py`` stay a few lines long (as lightning-hydra-template).

* ``cfg.data`` builds a ``LightningDataModule``; when the config has a ``masking`` group, the mask
  generator is built from it and handed to the data module (data never imports a model).
* ``cfg.task`` builds the ``LightningModule`` (``_recursive_: false``: it receives plain configs of
  its model, tokenizer and optimizer and records them as hyper-parameters).
* ``cfg.callbacks`` and ``cfg.logger`` are mappings of nodes with ``_target_``.
* Checkpoints are written atomically, read with ``weights_only=True`` (:class:`SafeCheckpointIO`).
* The run directory is checked first (:mod:`bitrain.training.rundir`): writable, and no fresh
  start over an earlier run's files.
* ``ckpt_path=auto`` resumes from the newest readable checkpoint of the run's checkpoint directory
  (:mod:`bitrain.training.resume`); RNG states travel in checkpoints
  (:class:`~bitrain.callbacks.rng_state.RNGStateCheckpoint`), SIGTERM / Ctrl-C write one
  (:class:`~bitrain.callbacks.preemption.PreemptionCheckpoint`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict

from bitrain.callbacks.preemption import PreemptionCheckpoint, exit_code_for
from bitrain.callbacks.rng_state import RNGStateCheckpoint
from bitrain.checkpoints import recorded_normalization
from bitrain.io import CheckpointError
from bitrain.training.devices import apply_global_batch, check_devices
from bitrain.training.hyperrule import apply_hyperrule
from bitrain.training.resume import SafeCheckpointIO, resolve_ckpt_path
from bitrain.training.rundir import check_fresh_start, check_writable, checkpoint_dir_of

log = logging.getLogger(__name__)


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

    When the checkpoint records its normalisation (``checkpoints.recorded_normalization``), it
    replaces ``data.transform`` / ``data.val_transform``'s ``mean`` and ``std``, with a warning
    naming both values where the config said otherwise; a checkpoint that records none (a
    released official ``.pth``) leaves the experiment's values. ``normalize_as_pretrained: false``
    keeps the config's. Returns the ``(mean, std)`` used from the checkpoint, or None.
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
        with warnings.catch_warnings():
            # Map-style training data resumes mid-epoch exactly (the data module's state +
            # EpochSampler skip the consumed samples), so Lightning's generic warning about
            # non-resumable loaders is wrong here; iterable sources warn on their own
            # (bitrain.data.datamodule).
            warnings.filterwarnings(
                "ignore", message="You're resuming from a checkpoint that ended before"
            )
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
