"""python -m bitrain.evaluate (bitrain.evaluation.validation): the fine-tuning task's validation.

A tiny random BEiT classifier saved as a bitrain checkpoint, evaluated on the demo's 500 test
digits: the metrics are the task's own ``val/*`` (the same numbers ``Trainer.validate`` gives for
the task that holds the model), per-class counts add up to them, progress lines are logged, and a
model with fewer classes than the data is refused with the label that does not fit.
"""

import csv
import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from bitrain.checkpoints import load_classifier, save_classifier
from bitrain.evaluation.validation import evaluate
from bitrain.models.classifier import create_classifier
from bitrain.tasks.classification import ImageClassification

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = dict(
    img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, init_values=0.1,
    use_abs_pos_emb=False, use_rel_pos_bias=True, global_pool="avg",
)  # fmt: skip


def _ckpt(path: Path, num_classes: int = 10) -> Path:
    torch.manual_seed(0)
    model = create_classifier("beit_base_patch16_224", num_classes, **TINY).eval()
    names = [f"digit {i}" for i in range(num_classes)]
    return save_classifier(model, path, "bitrain", label_names=names)


def _cfg(ckpt: Path, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            "evaluate",
            overrides=[f"ckpt_path={ckpt}", f"paths.output_dir={out}", "device=cpu", *overrides],
        )


def test_evaluate_reports_the_tasks_validation_and_per_class_counts(tmp_path, caplog):
    ckpt = _ckpt(tmp_path / "cls.ckpt")
    with caplog.at_level(logging.INFO, logger="bitrain.evaluation.validation"):
        metrics = evaluate(_cfg(ckpt, tmp_path / "eval", "log_every_n_batches=5"))
    assert "batch 5/16: 160 images, running top-1" in caplog.text
    # What Trainer.validate gives for the fine-tuning task holding the same model, same data.
    cfg = _cfg(ckpt, tmp_path / "ref")
    model = load_classifier(ckpt)
    cfg.model = dict(model.bitrain_spec)
    from hydra.utils import instantiate

    data = instantiate(cfg.data)  # the checkpoint records no preprocessing: the data config's
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    (want,) = trainer.validate(ImageClassification.from_model(model), data, verbose=False)
    assert (metrics["top1"], metrics["top5"], metrics["loss"]) == (
        want["val/top1"],
        want["val/top5"],
        want["val/loss"],
    )
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["images"] == 500 and saved["precision"] == "32-true"
    assert saved["top1"] == metrics["top1"] and saved["images_per_sec"] > 0
    with open(tmp_path / "eval" / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [f"digit {i}" for i in range(10)]  # the checkpoint's
    assert sum(int(r["count"]) for r in rows) == 500
    assert sum(int(r["correct"]) for r in rows) == round(metrics["top1"] * 500)


def test_evaluate_refuses_labels_the_model_does_not_have(tmp_path):
    ckpt = _ckpt(tmp_path / "cls5.ckpt", num_classes=5)
    with pytest.raises(ValueError, match=r"label \d in the data but the model has 5 classes"):
        evaluate(_cfg(ckpt, tmp_path / "eval"))
    assert not (tmp_path / "eval" / "metrics.json").exists()


@pytest.mark.parametrize("fmt", ["timm", "hf", "official"])
def test_evaluate_takes_every_classifier_format(tmp_path, fmt):
    """The same weights as a timm folder, a Hugging Face folder, an official .pth: same metrics."""
    ckpt = _ckpt(tmp_path / "cls.ckpt")
    model = load_classifier(ckpt)
    other = save_classifier(model, tmp_path / f"cls_{fmt}", fmt)
    common = ("preprocessing=config", "+data.val_source.labels_per_class=10")
    want = evaluate(_cfg(ckpt, tmp_path / "eval", *common))
    got = evaluate(_cfg(other, tmp_path / f"eval_{fmt}", *common))
    assert got["images"] == want["images"] == 100
    assert (got["top1"], got["top5"]) == (want["top1"], want["top5"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_device_names_map_to_the_trainers_accelerator():
    from bitrain.evaluation.validation import _trainer_device

    assert _trainer_device(torch.device("cpu")) == ("cpu", 1)
    assert _trainer_device(torch.device("cuda")) == ("gpu", [0])
    assert _trainer_device(torch.device("cuda:1")) == ("gpu", [1])
