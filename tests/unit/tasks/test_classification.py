"""ImageClassification: steps, layer-wise lr decay applied for real, Mixup, EMA, checkpoints."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from bitrain.tasks.classification import ImageClassification

MODEL = {
    "_target_": "bitrain.models.classifier.create_classifier",
    "model_name": "beit_base_patch16_224",
    "num_classes": 5,
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 48,
    "depth": 3,
    "num_heads": 3,
    "init_values": 0.1,
    "use_abs_pos_emb": False,
    "use_rel_pos_bias": True,
    "global_pool": "avg",
}
OPTIM = {"lr": 1e-3, "warmup_steps": 0, "layer_decay": 0.65, "min_lr": 1e-5}


class _Data(L.LightningDataModule):
    label_names = ["a", "b", "c", "d", "e"]

    def __init__(self, n=32, batch_size=8, nan=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.items = [
            {"images": torch.randn(3, 32, 32, generator=g), "labels": torch.tensor(i % 5)}
            for i in range(n)
        ]
        if nan:
            self.items[0]["images"][0, 0, 0] = float("nan")
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.items, batch_size=self.batch_size, shuffle=False, drop_last=True)

    def val_dataloader(self):
        return DataLoader(self.items[:16], batch_size=8)


def _fit(task, tmp_path, steps, **kwargs):
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        **kwargs,
    )
    trainer.fit(task, datamodule=kwargs.pop("datamodule", None) or _Data())
    return trainer


def test_layer_decay_is_applied_to_the_optimizer_lrs(tmp_path):
    task = ImageClassification(MODEL, OPTIM)
    trainer = _fit(task, tmp_path, steps=3, limit_val_batches=0)
    groups = trainer.optimizers[0].param_groups
    depth = MODEL["depth"]
    head_lr = max(g["lr"] for g in groups)
    # The scheduler has stepped 3 times: the cosine is at its end, min_lr, for the head's group.
    assert head_lr == pytest.approx(OPTIM["min_lr"], rel=1e-6)
    seen = set()
    for g in groups:
        layer = int(g["name"].split("_")[1])  # "layer_<id>_decay" / "layer_<id>_no_decay"
        seen.add(layer)
        assert g["lr"] / head_lr == pytest.approx(0.65 ** (depth + 1 - layer), rel=1e-6), g["name"]
    assert seen == set(range(depth + 2))  # embeddings 0, blocks 1..L, head L+1
    # The names map to the unilm layer ids: patch_embed/cls_token 0, blocks.i i+1, fc_norm/head L+1.
    by_param = {id(p): g["name"] for g in groups for p in g["params"]}
    named = dict(task.model.named_parameters())
    assert by_param[id(named["cls_token"])].startswith("layer_0_")
    assert by_param[id(named["patch_embed.proj.weight"])] == "layer_0_decay"
    assert by_param[id(named["blocks.1.mlp.fc1.weight"])] == "layer_2_decay"
    assert by_param[id(named["head.weight"])] == f"layer_{depth + 1}_decay"
    assert by_param[id(named["fc_norm.weight"])] == f"layer_{depth + 1}_no_decay"


def test_training_lowers_the_loss_and_checkpoint_keeps_label_names(tmp_path):
    torch.manual_seed(0)
    task = ImageClassification(MODEL, {**OPTIM, "lr": 3e-3, "layer_decay": None})
    data = _Data(n=16)
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(task.eval()(batch["images"]), batch["labels"])
    trainer = _fit(task, tmp_path, steps=30, limit_val_batches=1)
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(task.eval()(batch["images"]), batch["labels"])
    assert after < before * 0.7
    assert "val/top1" in trainer.callback_metrics and "val/top5" in trainer.callback_metrics
    trainer.save_checkpoint(tmp_path / "ft.ckpt")
    ckpt = torch.load(tmp_path / "ft.ckpt", weights_only=True)
    assert ckpt["label_names"] == ["a", "b", "c", "d", "e"]
    assert ckpt["hyper_parameters"]["model"]["_target_"].endswith("create_classifier")
    assert all(k.startswith(("model.", "val_", "ema_")) for k in ckpt["state_dict"])


def test_mixup_and_ema(tmp_path):
    mixup = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5}
    task = ImageClassification(MODEL, OPTIM, mixup=mixup, label_smoothing=0.1, ema={"decay": 0.5})
    assert task.mixup_fn is not None
    trainer = _fit(task, tmp_path, steps=4, limit_val_batches=1)
    assert "val/ema_top1" in trainer.callback_metrics
    ema_w, w = task.ema.module.head.weight, task.model.head.weight
    assert not torch.equal(ema_w, w)  # an average, not a copy
    state = task.state_dict()
    assert any(k.startswith("ema.module.") for k in state)
    odd = {"images": torch.randn(3, 3, 32, 32), "labels": torch.tensor([0, 1, 2])}
    with pytest.raises(ValueError, match="even batch size"):
        task.training_step(odd, 0)


def test_no_mixup_when_alphas_are_zero():
    task = ImageClassification(MODEL, OPTIM, mixup={"mixup_alpha": 0.0, "cutmix_alpha": 0.0})
    assert task.mixup_fn is None
    with pytest.raises(ValueError, match="label_smoothing"):
        ImageClassification(MODEL, OPTIM, label_smoothing=1.0)


def test_nonfinite_batches_are_skipped_and_counted(tmp_path):
    task = ImageClassification(MODEL, OPTIM, max_nonfinite_steps=5)
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(task, datamodule=_Data(nan=True))
    assert task.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in task.model.parameters())


def test_class_count_mismatch_with_the_data_is_an_error(tmp_path):
    task = ImageClassification({**MODEL, "num_classes": 7}, OPTIM)
    with pytest.raises(ValueError, match="5 classes but model.num_classes=7"):
        _fit(task, tmp_path, steps=1, limit_val_batches=0)


def test_unknown_nonfinite_check_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"task.nonfinite_check must be one of .*'never'"):
        ImageClassification(MODEL, OPTIM, nonfinite_check="never")


def test_from_model_validates_a_built_model_as_the_configured_task_does(tmp_path):
    """bitrain.evaluate's wrapper: the same validation_step and metrics, on a built model."""
    torch.manual_seed(0)
    task = ImageClassification(MODEL, OPTIM, ema={"decay": 0.5})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    (want,) = trainer.validate(task, _Data(), verbose=False)
    wrapped = ImageClassification.from_model(task.model, label_names=_Data.label_names)
    (got,) = trainer.validate(wrapped, _Data(), verbose=False)
    assert {k: got[k] for k in ("val/loss", "val/top1", "val/top5")} == {
        k: want[k] for k in ("val/loss", "val/top1", "val/top5")
    }
    # The EMA weights as the model give the task's val/ema_* (bitrain.evaluate use_ema=true).
    ema_task = ImageClassification.from_model(task.ema.module)
    (ema,) = trainer.validate(ema_task, _Data(), verbose=False)
    assert (ema["val/top1"], ema["val/top5"]) == (want["val/ema_top1"], want["val/ema_top5"])
    assert wrapped.model is task.model and wrapped.num_classes == 5 and wrapped.ema is None
    with pytest.raises(ValueError, match="from_model, for validation only"):
        wrapped.configure_optimizers()
    with pytest.raises(TypeError, match="no positive integer num_classes"):
        ImageClassification.from_model(torch.nn.Linear(3, 5))
