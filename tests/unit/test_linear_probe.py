"""Linear probe (python -m bitrain.evaluate task=linear_probe): layers, features, end to end."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.optim.optimizer import register_optimizer_step_pre_hook

from bitrain.checkpoints import save_mim_model
from bitrain.evaluation.linear_probe import (
    linear_probe,
    load_frozen_encoder,
    pooled_features,
    resolve_layers,
)
from bitrain.io import CheckpointError
from bitrain.models.beit import BeitMIM
from bitrain.tasks.optim import cosine_multiplier

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = dict(
    img_size=32, patch_size=4, vocab_size=512, embed_dim=64, depth=3, num_heads=2,
    use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
    init_values=0.1, drop_path_rate=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def mim_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_mim_model(BeitMIM(**TINY), tmp_path_factory.mktemp("mim") / "mim.ckpt")


def _cfg(ckpt, out, *overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            "evaluate",
            overrides=[
                "task=linear_probe", f"ckpt_path={ckpt}", f"paths.output_dir={out}",
                "data.source.labels_per_class=20", "device=cpu", *overrides,
            ],
        )  # fmt: skip


def test_resolve_layers():
    assert resolve_layers("all", 4) == [1, 2, 3, 4]
    assert resolve_layers(-1, 12) == [12]
    assert resolve_layers([9, -1, 9], 12) == [9, 12]
    with pytest.raises(ValueError, match="outside 1..4"):
        resolve_layers([5], 4)
    with pytest.raises(ValueError, match="'all'"):
        resolve_layers("last", 4)


def test_pooled_features_are_the_mean_of_a_blocks_patch_tokens():
    torch.manual_seed(0)
    model = BeitMIM(**TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.patch_embed(x)
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), tokens], dim=1)
        bias = model.rel_pos_bias()
        per_block = []
        for blk in model.blocks:
            tokens = blk(tokens, shared_rel_pos_bias=bias)
            per_block.append(tokens)
        feats = pooled_features(model, x, [1, 3])
        both = pooled_features(model, x, [2], with_cls=True)
    torch.testing.assert_close(feats[0], per_block[0][:, 1:].mean(1))
    torch.testing.assert_close(feats[1], per_block[2][:, 1:].mean(1))
    torch.testing.assert_close(
        both[0], torch.cat([per_block[1][:, 0], per_block[1][:, 1:].mean(1)], 1)
    )


def test_linear_probe_every_layer_of_a_pretraining_checkpoint(mim_ckpt, tmp_path):
    out = tmp_path / "probe"
    metrics = linear_probe(
        _cfg(mim_ckpt, out, "task.layers=all", "task.epochs=60", "task.batch_size=32")
    )
    assert set(metrics["layers"]) == {"1", "2", "3"}
    assert metrics["encoder"] == "mim" and metrics["train_images"] == 200
    assert metrics["val_images"] == 500
    # Even a random tiny encoder's mean-pooled features separate the digits above chance (10%):
    # 0.32 measured at 100 epochs (0.10 when the probe trains too few steps).
    assert metrics["best_top1"] > 0.2, metrics
    saved = json.loads((out / "linear_probe.json").read_text())
    assert saved["best_layer"] == metrics["best_layer"]
    assert (out / "per_layer.csv").read_text().splitlines()[0] == "layer,top1,top5,loss"


def test_random_init_probes_other_weights_and_augment_runs(mim_ckpt, tmp_path):
    trained, spec, kind = load_frozen_encoder(mim_ckpt)
    fresh, _, _ = load_frozen_encoder(mim_ckpt, random_init=True, seed=1)
    assert kind == "mim" and spec["depth"] == 3
    assert not torch.equal(trained.blocks[0].mlp.fc1.weight, fresh.blocks[0].mlp.fc1.weight)
    assert not any(p.requires_grad for p in trained.parameters())
    metrics = linear_probe(
        _cfg(mim_ckpt, tmp_path, "task.random_init=true", "task.augment=true", "task.epochs=1",
             "data.batch_size=50", "task.features=cls_mean")
    )  # fmt: skip
    assert metrics["random_init"] and metrics["augment"] and metrics["features"] == "cls_mean"
    assert list(metrics["layers"]) == ["3"]


def test_linear_probe_errors(mim_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="linear probe: checkpoint not found"):
        load_frozen_encoder(tmp_path / "nope.ckpt")
    torch.save({"something": 1}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="is not a model checkpoint"):
        load_frozen_encoder(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="outside 1..3"):
        linear_probe(_cfg(mim_ckpt, tmp_path, "task.layers=[7]"))


@pytest.mark.parametrize(("epochs", "warmup_epochs"), [(3, 1), (2, 5)])
def test_probe_lr_per_step_is_the_shared_schedule(mim_ckpt, tmp_path, epochs, warmup_epochs):
    """Every optimizer step of the probe: lr = task.lr x optim.cosine_multiplier, decay on all."""
    seen = []

    def record(optimizer, args, kwargs):
        seen.append([(g["lr"], g["weight_decay"]) for g in optimizer.param_groups])

    handle = register_optimizer_step_pre_hook(record)
    try:
        linear_probe(
            _cfg(mim_ckpt, tmp_path, f"task.epochs={epochs}", f"task.warmup_epochs={warmup_epochs}",
                 "task.batch_size=64", "+data.val_source.labels_per_class=5")
        )  # fmt: skip
    finally:
        handle.remove()
    steps_per_epoch = 4  # 200 cached training features at batch 64: 64, 64, 64, 8
    total = epochs * steps_per_epoch
    warmup = min(warmup_epochs * steps_per_epoch, total)  # optim.build's warmup_epochs
    want = [4e-3 * cosine_multiplier(step, total, warmup, 0.0) for step in range(total)]
    assert len(seen) == total
    for step, groups in enumerate(seen):
        # The official probe (run_linear_eval.py) decays every parameter, biases too.
        assert groups == [(pytest.approx(want[step], rel=1e-12, abs=0), 1e-4)] * len(groups), step
