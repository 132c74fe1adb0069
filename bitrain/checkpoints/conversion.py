"""Convert a checkpoint between formats, verified, without ever destroying the source or a file.

:func:`convert` writes the conversion beside ``dst``, reloads it and compares it with the source (a
pretraining model tensor by tensor, bit exact; a classifier by its logits on a random batch within
:data:`LOGIT_TOL`, and its label names), and only then moves it to ``dst``. A ``dst`` that exists or
is (holds, lies in) the source is refused unless ``force``. ``scripts/convert_checkpoint.py`` is
its command line.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import resolve_input_data_config

from bitrain.checkpoints import formats
from bitrain.checkpoints.sniff import sniff
from bitrain.io import CheckpointError

ALL_FORMATS: tuple[str, ...] = tuple(dict.fromkeys((*formats.FORMATS, *formats.CLASSIFIER_FORMATS)))
LOGIT_TOL = 1e-5


class ConversionError(CheckpointError):
    """The conversion was written but did not reload equal to its source; ``dst`` is untouched."""


@dataclass(frozen=True)
class Converted:
    """What :func:`convert` did: paths, formats, kind (``mim`` / ``classifier``), the check."""

    src: Path
    dst: Path
    src_format: str
    dst_format: str
    kind: str
    check: str


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dst_format: str,
    *,
    src_format: str | None = None,
    force: bool = False,
    verify: bool = True,
    use_ema: bool = False,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Converted:
    """Convert the checkpoint at ``src`` to ``dst_format`` at ``dst`` (see the module docstring).

    ``dst`` is a file (``bitrain``, ``official``) or a folder (``hf``, ``timm``: classifiers only).
    ``src_format``: the detected format must be this one; ``verify=False`` skips the check.
    Classifiers: ``use_ema``, and ``model_name`` / ``model_kwargs`` for a bare state dict.

    Raises:
        FileExistsError: ``dst`` exists or is (holds, lies in) the source, and not ``force``.
        CheckpointError: an unreadable or unsafe source, a format mismatch, a destination format
            that cannot hold the model; :class:`ConversionError` when the check failed.
        ValueError: an unknown format, or ``model_kwargs`` without ``model_name``.
    """
    if dst_format not in ALL_FORMATS:
        raise ValueError(f"unknown format {dst_format!r}; choose one of {ALL_FORMATS}")
    src_path, dst_path = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    if force:
        pass  # replaced only once the conversion passed its check
    elif src_path == dst_path or src_path in dst_path.parents or dst_path in src_path.parents:
        raise FileExistsError(
            f"--dst {dst} would overwrite the source --src {src}; choose another --dst (or pass "
            "--force to replace the source with its conversion)"
        )
    elif dst_path.exists() or dst_path.is_symlink():
        raise FileExistsError(
            f"--dst {dst} exists; choose another --dst, or pass --force to replace it"
        )
    if model_kwargs and not model_name:
        raise ValueError("model_kwargs needs model_name")
    found = sniff(src)
    if found.kind == "mim":
        if dst_format not in formats.FORMATS:
            raise CheckpointError(
                f"'{src}' holds pretraining (MIM) weights; the destination format must be one of "
                f"{formats.FORMATS} ({dst_format} is for classifiers)"
            )
        kind, load, save = "mim", formats.load_mim_model, formats.save_mim_model
        model, same = load(found), _same_tensors
    else:
        kind, load, save = "classifier", formats.load_classifier, formats.save_classifier
        extra = {"model_name": model_name, **(model_kwargs or {})} if model_name else {}
        model, same = load(found, use_ema=use_ema, **extra), _same_logits
    fmt = model.bitrain_source_format
    if src_format is not None and fmt != src_format:
        raise CheckpointError(f"'{src}' is a {fmt} checkpoint, not {src_format}")
    check = (lambda out: same(model, load(out))) if verify else None
    result = _write(Path(dst).expanduser(), lambda out: save(model, out, dst_format), check)
    return Converted(Path(src), Path(dst), fmt, dst_format, kind, result)


def _same_tensors(model: torch.nn.Module, back: torch.nn.Module) -> str:
    reloaded = back.state_dict()
    for key, value in model.state_dict().items():
        if not torch.equal(reloaded[key], value):
            raise ConversionError(f"verification failed: {key} differs after the round trip")
    return f"{len(reloaded)} tensors identical after reloading"


def _same_logits(model: torch.nn.Module, back: torch.nn.Module) -> str:
    shape = resolve_input_data_config(model)["input_size"]  # the model's own input, per timm
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        diff = (back(x).float() - model(x).float()).abs().max().item()
    if not diff <= LOGIT_TOL:
        raise ConversionError(
            f"verification failed: logits differ by {diff:.3g} (> {LOGIT_TOL:g}) after reloading"
        )
    if back.label_names != model.label_names:
        raise ConversionError(
            f"verification failed: label names {(back.label_names or [])[:5]} after reloading, "
            f"{(model.label_names or [])[:5]} before"
        )
    return f"logits equal within {diff:.3g} and label names kept after reloading"


def _write(dst: Path, save: Callable[[Path], Path], check: Callable[[Path], str] | None) -> str:
    """Save into a temporary path beside ``dst``, check it there, then move it into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".converting", dir=dst.parent))
    try:
        staged = save(tmp / dst.name)
        result = check(staged) if check is not None else "not verified (--no-verify)"
        _replace(staged, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _replace(staged: Path, dst: Path) -> None:
    """Move ``staged`` to ``dst``; an existing ``dst`` is removed only once the new one is there."""
    old = None
    real_dir = dst.is_dir() and not dst.is_symlink()
    if (dst.exists() or dst.is_symlink()) and (real_dir or staged.is_dir()):
        old = dst.with_name(f".{dst.name}.replaced-{os.getpid()}")
        os.replace(dst, old)
    try:
        os.replace(staged, dst)  # a file over a file is replaced atomically
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
