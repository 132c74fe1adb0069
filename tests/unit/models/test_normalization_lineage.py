"""Weights carry the normalisation they were trained with, and fine-tuning uses it.

Every format records it (bitrain hyper-parameters, official ``args``, Hugging Face
``preprocessor_config.json``, timm ``pretrained_cfg``) and every loader gives it back; fine-tuning
from a checkpoint pretrained with 0.5 / 0.5 normalises with 0.5 / 0.5 with no override.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from bitrain.checkpoints import (
    load_mim_model,
    recorded_normalization,
    save_classifier,
    save_mim_model,
)
from bitrain.data.preprocessing import from_timm_args
from bitrain.models.classifier import create_classifier
from bitrain.training.runner import use_pretrained_normalization

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("fmt", ["bitrain", "official", "hf"])
@pytest.mark.parametrize("norm", [HALF, IMAGENET], ids=["half", "imagenet"])
def test_every_mim_format_records_and_returns_the_normalization(tmp_path, make_tiny, fmt, norm):
    path = tmp_path / ("mim_hf" if fmt == "hf" else f"mim.{fmt}")
    save_mim_model(make_tiny(), path, fmt, normalization=norm)
    assert recorded_normalization(path) == norm
    assert load_mim_model(path).bitrain_normalization == norm


def test_official_args_say_it_as_unilm_does(tmp_path, make_tiny):
    path = save_mim_model(make_tiny(), tmp_path / "m.pth", "official", normalization=IMAGENET)
    obj = torch.load(path, weights_only=False)
    assert obj["args"].imagenet_default_mean_and_std is True
    # a file with unilm's args only (no bitrain record)
    obj["args"] = argparse.Namespace(model="beit_base", imagenet_default_mean_and_std=False)
    torch.save(obj, tmp_path / "unilm.pth")
    assert recorded_normalization(tmp_path / "unilm.pth") == HALF
    # the released files: no args at all -> nothing recorded
    torch.save({"model": obj["model"]}, tmp_path / "released.pth")
    assert recorded_normalization(tmp_path / "released.pth") is None


def test_classifier_formats_return_their_evaluation_normalization(tmp_path, beit_spec):
    model = create_classifier("beit_base_patch16_224", 3, **beit_spec)
    spec = from_timm_args({"input_size": 32, "mean": HALF[0], "std": HALF[1]})
    for fmt, name in (("bitrain", "c.ckpt"), ("official", "c.pth"), ("timm", "t"), ("hf", "h")):
        path = save_classifier(model, tmp_path / name, fmt, eval_transform=spec)
        got = recorded_normalization(path)
        assert got[0] == pytest.approx(HALF[0]) and got[1] == pytest.approx(HALF[1]), fmt


def test_pretraining_records_its_patch_view_normalization():
    from omegaconf import OmegaConf

    cfg = _compose(
        "pretrain", ["data.transform.mean=[0.5,0.5,0.5]", "data.transform.std=[0.5,0.5,0.5]"]
    )
    assert OmegaConf.to_container(cfg.task.normalization, resolve=True) == {
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    cfg = _compose("pretrain", ["data=synthetic"])  # no transform: nothing to record
    assert OmegaConf.to_container(cfg.task.normalization, resolve=True)["mean"] is None


def test_finetuning_normalizes_as_its_pretrained_checkpoint(tmp_path, make_tiny, caplog):
    ckpt = save_mim_model(make_tiny(), tmp_path / "pre.ckpt", normalization=HALF)
    cfg = _compose("finetune", [f"model.pretrained={ckpt}"])  # the demo data says 0.309 / 0.349
    with caplog.at_level(logging.WARNING):
        used = use_pretrained_normalization(cfg)
    assert used == ([0.5] * 3, [0.5] * 3)
    for key in ("transform", "val_transform"):
        assert list(cfg.data[key].mean) == [0.5] * 3 and list(cfg.data[key].std) == [0.5] * 3
    assert "0.309" in caplog.text and "0.5" in caplog.text  # both values named
    # the evaluation transform kept in the fine-tuning checkpoint follows
    from omegaconf import OmegaConf

    from bitrain.tasks.classification import eval_preprocessing_record

    node = OmegaConf.to_container(cfg.task.eval_transform, resolve=True)
    assert eval_preprocessing_record(node)["mean"] == [0.5] * 3


def test_config_can_keep_its_own_normalization_and_unrecorded_files_change_nothing(
    tmp_path, make_tiny
):
    ckpt = save_mim_model(make_tiny(), tmp_path / "pre.ckpt", normalization=HALF)
    cfg = _compose("finetune", [f"model.pretrained={ckpt}", "normalize_as_pretrained=false"])
    assert use_pretrained_normalization(cfg) is None
    assert list(cfg.data.transform.mean) == [0.309] * 3
    bare = save_mim_model(make_tiny(), tmp_path / "bare.ckpt")  # records nothing
    cfg = _compose("finetune", [f"model.pretrained={bare}"])
    assert use_pretrained_normalization(cfg) is None
    assert list(cfg.data.val_transform.std) == [0.349] * 3
