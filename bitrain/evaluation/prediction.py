"""Top-k predictions of a classifier for image files (``python -m bitrain.predict``).

The images are preprocessed with the checkpoint's own evaluation transform (kept by fine-tuning in
``hyper_parameters["eval_transform"]``; a Hugging Face folder's ``preprocessor_config.json``; a timm
folder's ``pretrained_cfg``: see ``load_classifier``), else with timm's data config of the model.
Class names come from the checkpoint (``label_names``), else from timm's ImageNet class lists when
the model has 1000 or 21,841 classes, else they are the class indices. A file that cannot be
decoded gets an ``error`` entry; the others are still predicted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from timm.data import create_transform, resolve_input_data_config

from bitrain.checkpoints import load_classifier
from bitrain.data.decode import BadImageError, decode_image
from bitrain.data.sources import IMAGE_EXTENSIONS
from bitrain.io import atomic_write_bytes

__all__ = ["class_names", "list_images", "predict"]

log = logging.getLogger(__name__)


def list_images(path: str | os.PathLike) -> list[Path]:
    """``path`` itself if it is a file, else every image file under it (recursive, sorted)."""
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"images='{root}' is neither an image file nor a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files


def class_names(model: torch.nn.Module, num_classes: int) -> list[str]:
    """Checkpoint names, else timm's ImageNet names (1000 / 21,841 classes), else indices."""
    names = getattr(model, "label_names", None)
    if names:
        return [str(n) for n in names]
    subsets = {1000: "imagenet-1k", 21841: "imagenet-22k"}
    if num_classes in subsets:
        from timm.data import ImageNetInfo

        info = ImageNetInfo(subsets[num_classes])
        return [info.index_to_description(i) for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


def _transform(model: torch.nn.Module):
    """The checkpoint's evaluation preprocessing, else timm's default data config of the model.

    The preprocessing is data that ``load_classifier`` read and validated; nothing is built from a
    code path in the file.
    """
    spec = getattr(model, "bitrain_eval_transform", None)
    if spec is not None:
        return spec.build()
    return create_transform(**resolve_input_data_config(model))


@torch.inference_mode()
def predict(
    ckpt_path: str | os.PathLike,
    images: str | os.PathLike,
    top_k: int = 5,
    use_ema: bool = False,
    device: str = "auto",
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Top-``k`` labels with probabilities for every image file at ``images``.

    Raises:
        ValueError: ``top_k`` or ``batch_size`` below 1, or no images at ``images``.
        FileNotFoundError / CheckpointError: no readable classifier at ``ckpt_path``.
    """
    for name, value in (("top_k", top_k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: give a whole number >= 1")
    ckpt = Path(ckpt_path).expanduser()
    model = load_classifier(ckpt, use_ema=use_ema)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)  # fmt: skip
    model.to(dev)
    num_classes = int(model.bitrain_spec["num_classes"])
    names = class_names(model, num_classes)
    transform = _transform(model)
    k = max(1, min(int(top_k), num_classes))
    results: list[dict[str, Any]] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([t for _, t in pending]).to(dev)
        probs = model(batch).float().softmax(-1)
        top = probs.topk(k, dim=-1)
        for (i, _), p, idx in zip(pending, top.values.tolist(), top.indices.tolist()):
            results[i]["top"] = [
                {"label": names[c], "index": c, "prob": float(q)} for c, q in zip(idx, p)
            ]
        pending.clear()

    for path in list_images(images):
        entry: dict[str, Any] = {"image": str(path)}
        results.append(entry)
        try:
            pending.append((len(results) - 1, transform(decode_image(str(path), name=str(path)))))
        except (BadImageError, OSError) as err:
            entry["error"] = str(err)
            log.warning("%s: %s", path, err)
        if len(pending) >= batch_size:
            flush()
    flush()
    return results


def format_results(results: Sequence[dict[str, Any]]) -> str:
    """One line per image: ``path: label (0.912), label (0.031), ...`` or ``path: ERROR ...``."""
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['image']}: ERROR {r['error']}")
        else:
            top = ", ".join(f"{t['label']} ({t['prob']:.3f})" for t in r["top"])
            lines.append(f"{r['image']}: {top}")
    return "\n".join(lines)


def check_output(output: str | os.PathLike) -> Path:
    """Fail now, before any inference, if the JSON output cannot be written at ``output``.

    Raises:
        ValueError: ``output`` is a directory, lies under a file, or its folder is not writable.
    """
    path = Path(output).expanduser().absolute()
    if path.is_dir():
        raise ValueError(f"output={output}: '{path}' is a directory; give a file name (preds.json)")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(
            f"output={output}: cannot create '{path.parent}' because '{ancestor}' is a file"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK) or (
        path.exists() and not os.access(path, os.W_OK)
    ):
        raise ValueError(f"output={output}: '{ancestor}' is not writable")
    return path


def write_json(results: Sequence[dict[str, Any]], output: str | os.PathLike) -> Path:
    """Write the results as JSON (atomically: an earlier file stays whole until replaced)."""
    path = check_output(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, (json.dumps(list(results), indent=2) + "\n").encode())
