"""Convert BEiT pretraining weights or fine-tuned classifiers between checkpoint formats.

Formats (see docs/checkpoints.md):

* ``bitrain``  -- a Lightning-layout ``.ckpt``: ``{"state_dict": {"model.<key>": ...},
  "hyper_parameters": {"model": {"_target_": ..., ...}}}``. As a source, any ``.ckpt`` written by
  ``bitrain.pretrain`` or ``bitrain.finetune`` works too.
* ``official`` -- a ``.pth`` as unilm's ``run_beit_pretraining.py`` / ``run_class_finetuning.py``
  save it (``{"model": ..., "args": Namespace}``); classifiers: BEiT only.
* ``hf``       -- a Hugging Face folder (``config.json`` + ``model.safetensors``):
  ``BeitForMaskedImageModeling`` for pretraining weights; ``BeitForImageClassification``,
  ``ViTForImageClassification`` or ``BitForImageClassification`` (+ ``preprocessor_config.json``)
  for classifiers.
* ``timm``     -- classifiers only: a timm hub folder (``config.json`` with ``architecture`` +
  ``model.safetensors``), as ``timm.models.push_to_hf_hub`` writes it. As a source, a bare timm
  state dict (``.pth``/``.safetensors``) works too, with ``--model-name`` (and ``--model-kwargs``).

The source kind is detected: a masked-image-modeling (pretraining) checkpoint is converted as a
``BeitMIM`` (``bitrain``/``official``/``hf``), anything else as a classifier
(:func:`bitrain.models.classifier_io.load_classifier` / ``save_classifier``; label names and the
evaluation preprocessing travel with it).

Examples::

    python scripts/convert_checkpoint.py --src beit_base_patch16_224_pt22k.pth
        --dst out/beit-base-mim --dst-format hf      (one line)
    python scripts/convert_checkpoint.py --src outputs/finetune/<run>/checkpoints/last.ckpt
        --dst out/beit-cls-hf --dst-format hf        (one line)

Every input is read weights-only; a record in it that names code to run (a Hydra ``_target_``)
is refused. The conversion is written to a temporary file or folder beside ``--dst``, verified
there (unless ``--no-verify``: reloaded and compared with the source, a pretraining model tensor by
tensor, bit exact, a classifier by its logits on a random batch, max abs difference <= 1e-5, and its
label names) and only then moved to ``--dst``: a failed conversion leaves ``--dst`` as it was. An
existing ``--dst``, or one that is the source (or holds it, or lies in it), is refused unless
``--force``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from bitrain.io import CheckpointError, load_torch_file
from bitrain.models.checkpoints import (
    FORMATS,
    build_mim_model,
    load_mim_model,
    load_mim_state,
    save_mim_model,
)
from bitrain.models.classifier_io import CLASSIFIER_FORMATS, load_classifier, save_classifier

log = logging.getLogger("convert_checkpoint")

ALL_FORMATS = tuple(dict.fromkeys((*FORMATS, *CLASSIFIER_FORMATS)))
LOGIT_TOL = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="source file or model folder")
    parser.add_argument(
        "--src-format", choices=ALL_FORMATS, default=None, help="source format (default: detect)"
    )
    parser.add_argument("--dst", required=True, help="destination file (or folder: hf, timm)")
    parser.add_argument(
        "--dst-format", choices=ALL_FORMATS, required=True, help="destination format"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip reloading the destination to compare"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --dst (also the source itself), once the conversion is verified",
    )
    parser.add_argument(
        "--use-ema", action="store_true", help="classifiers: convert the EMA weights"
    )
    parser.add_argument(
        "--model-name",
        default=None,
        help="classifiers: timm architecture of a bare state dict (e.g. beit_base_patch16_224)",
    )
    parser.add_argument(
        "--model-kwargs",
        default=None,
        help="classifiers: JSON of further create_classifier arguments, e.g. '{\"img_size\": 384}'",
    )
    return parser.parse_args(argv)


def is_mim_source(path: str | Path) -> bool:
    """Whether ``path`` holds BEiT masked-image-modeling (pretraining) weights."""
    from bitrain.models.checkpoints import BEIT_MIM_TARGET

    path = Path(path).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            return False
        try:
            config = json.loads(cfg.read_text())
        except json.JSONDecodeError:
            return False
        architectures = config.get("architectures") or []
        return any(str(a).endswith("ForMaskedImageModeling") for a in architectures)
    if not path.is_file() or path.suffix == ".safetensors":
        return False
    obj = load_torch_file(path, allow_namespace=True)
    if not isinstance(obj, Mapping):
        return False
    if "state_dict" in obj and "hyper_parameters" in obj:
        model_cfg = (obj.get("hyper_parameters") or {}).get("model") or {}
        return isinstance(model_cfg, Mapping) and model_cfg.get("_target_") == BEIT_MIM_TARGET
    state = next((obj[k] for k in ("model", "module") if isinstance(obj.get(k), Mapping)), obj)
    keys = {str(k).removeprefix("module.") for k in state}
    return "lm_head.weight" in keys


def _convert_mim(args: argparse.Namespace) -> int:
    if args.dst_format not in FORMATS:
        log.error(
            "--src %s holds pretraining (MIM) weights; --dst-format must be one of %s (%s is for "
            "classifiers)",
            args.src,
            FORMATS,
            args.dst_format,
        )
        return 2
    state, kwargs, found = load_mim_state(args.src)
    if args.src_format is not None and found != args.src_format:
        log.error("--src %s is a %s checkpoint, not %s", args.src, found, args.src_format)
        return 2
    model = build_mim_model(state, kwargs, where=f"{found} checkpoint '{args.src}'")

    def verify(out: Path) -> bool:
        back = load_mim_model(out).state_dict()
        for key, value in model.state_dict().items():
            if not torch.equal(back[key], value):
                log.error("verification failed: %s differs after the round trip", key)
                return False
        log.info("verified: %d tensors identical after reloading the conversion", len(back))
        return True

    return _write(args, lambda out: save_mim_model(model, out, args.dst_format), verify, found)


def _input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    spec = getattr(model, "bitrain_spec", {}) or {}
    size = spec.get("img_size") or getattr(model, "img_size", None)
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[1:]
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    return int(spec.get("in_chans", 3)), int(h), int(w)


def _convert_classifier(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {}
    if args.model_kwargs:
        try:
            extra = json.loads(args.model_kwargs)
        except json.JSONDecodeError as err:
            log.error("--model-kwargs is not valid JSON: %s", err)
            return 2
        if not isinstance(extra, dict):
            log.error("--model-kwargs must be a JSON object, got %s", args.model_kwargs)
            return 2
    if extra and not args.model_name:
        log.error("--model-kwargs needs --model-name")
        return 2
    kwargs = {"model_name": args.model_name, **extra} if args.model_name else {}
    model = load_classifier(args.src, use_ema=args.use_ema, **kwargs)
    found = model.bitrain_source_format
    if args.src_format is not None and found != args.src_format:
        log.error("--src %s is a %s checkpoint, not %s", args.src, found, args.src_format)
        return 2

    def verify(out: Path) -> bool:
        back = load_classifier(out)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, *_input_shape(model), generator=gen)
        with torch.inference_mode():
            diff = (back(x).float() - model(x).float()).abs().max().item()
        if not diff <= LOGIT_TOL:
            log.error(
                "verification failed: logits differ by %.3g (> %g) after reloading", diff, LOGIT_TOL
            )
            return False
        if back.label_names != model.label_names:
            log.error(
                "verification failed: label names %s after reloading, %s before",
                (back.label_names or [])[:5],
                (model.label_names or [])[:5],
            )
            return False
        log.info("verified: logits equal within %.3g and label names kept after reloading", diff)
        return True

    save = lambda out: save_classifier(model, out, args.dst_format)  # noqa: E731
    return _write(args, save, verify, f"{found} classifier")


def check_destination(src: str | Path, dst: str | Path, force: bool) -> str | None:
    """Why writing ``dst`` is refused (None when it is not): it exists, or it is the source.

    The source counts as overwritten when ``dst`` is the same file or folder, a folder that holds
    the source, or a path inside a source folder. ``force`` allows all of these: the conversion is
    complete and verified in memory and on disk before anything is replaced.
    """
    src_path, dst_path = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    if force:
        return None
    if src_path == dst_path or src_path in dst_path.parents or dst_path in src_path.parents:
        return (
            f"--dst {dst} would overwrite the source --src {src}; choose another --dst (or pass "
            "--force to replace the source with its conversion)"
        )
    if dst_path.exists() or dst_path.is_symlink():
        return f"--dst {dst} exists; choose another --dst, or pass --force to replace it"
    return None


def _write(
    args: argparse.Namespace,
    save: Callable[[Path], Path],
    verify: Callable[[Path], bool],
    what: str,
) -> int:
    """Save into a temporary path beside ``--dst``, verify it there, then move it into place."""
    dst = Path(args.dst).expanduser()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".converting", dir=dst.parent))
    try:
        staged = save(tmp / dst.name)
        if not args.no_verify and not verify(staged):
            log.error("the conversion failed its check: %s was left as it was", dst)
            return 1
        _replace(staged, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s (%s) -> %s (%s)", args.src, what, dst, args.dst_format)
    return 0


def _replace(staged: Path, dst: Path) -> None:
    """Move ``staged`` to ``dst``; an existing ``dst`` (``--force``) is removed only afterwards."""
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


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the process exit code (0 on success)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    refused = check_destination(args.src, args.dst, args.force)
    if refused:
        log.error("%s", refused)
        return 2
    try:
        if is_mim_source(args.src):
            return _convert_mim(args)
        return _convert_classifier(args)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
