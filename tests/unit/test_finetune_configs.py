"""Fine-tuning configs: the recipes' numbers, and one real training step of every model family."""

from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bitrain import runner
from bitrain.hyperrule import hyperrule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CKPT = "/nonexistent/pretrained.ckpt"


def _compose(overrides, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("finetune", overrides=[*overrides, f"paths.output_dir={tmp_path}"])


def test_beit_recipes(tmp_path):
    ft1k = _compose(["+experiment=beit_base_ft1k", f"model.pretrained={CKPT}"], tmp_path)
    OmegaConf.resolve(ft1k)
    assert (ft1k.optim.lr, ft1k.optim.layer_decay, ft1k.optim.warmup_epochs) == (4e-3, 0.65, 20)
    assert ft1k.trainer.max_epochs == 100 and ft1k.data.global_batch_size == 1024
    assert ft1k.mixup.mixup_alpha == 0.8 and ft1k.mixup.cutmix_alpha == 1.0
    assert ft1k.task.label_smoothing == 0.1 and ft1k.model.drop_path_rate == 0.1
    assert ft1k.data.transform.auto_augment == "rand-m9-mstd0.5-inc1"
    assert ft1k.data.transform.re_prob == 0.25 and ft1k.data.val_transform.crop_pct == 0.875
    assert ft1k.model.global_pool == "avg" and ft1k.model.head_init_scale == 0.001
    ft21k = _compose(["+experiment=beit_base_ft21k", f"model.pretrained={CKPT}"], tmp_path)
    assert ft21k.data.num_classes == 21841 and ft21k.model.num_classes == 21841
    assert (ft21k.optim.lr, ft21k.trainer.max_epochs, ft21k.model.drop_path_rate) == (3e-3, 90, 0.2)
    assert ft21k.data.global_batch_size == 4096 and ft21k.trainer.gradient_clip_val == 3.0
    to1k = _compose(["+experiment=beit_base_ft21k_to1k", f"model.pretrained={CKPT}"], tmp_path)
    assert (to1k.optim.lr, to1k.optim.layer_decay, to1k.optim.weight_decay) == (2e-5, 0.85, 1e-8)
    assert to1k.trainer.max_epochs == 30 and to1k.data.global_batch_size == 512
    assert to1k.mixup.mixup_alpha == 0.0 and to1k.mixup.cutmix_alpha == 0.0


def test_pretrained_is_required_by_the_real_recipes(tmp_path):
    for experiment in ("beit_base_ft1k", "vit_b32_in21k_ft1k", "bit_r50x1_hyperrule"):
        cfg = _compose([f"+experiment={experiment}"], tmp_path)
        with pytest.raises(Exception, match=r"give model.pretrained=PATH"):
            OmegaConf.resolve(cfg)


def test_hyperrule():
    small = hyperrule(5_000, (32, 32))
    assert (small.steps, small.warmup_steps, small.decay_steps) == (500, 100, (200, 300, 400))
    assert (small.resize, small.crop, small.mixup_alpha) == (160, 128, 0.0)
    medium = hyperrule(100_000, (500, 375))
    assert (medium.steps, medium.decay_steps, medium.crop, medium.mixup_alpha) == (
        10_000,
        (3000, 6000, 9000),
        480,
        0.1,
    )
    assert hyperrule(1_281_167, (500, 375)).steps == 20_000


TINY = {
    "beit_base_ft1k": [
        "model.img_size=32", "+model.patch_size=8", "+model.embed_dim=48", "+model.depth=2",
        "+model.num_heads=3",
    ],
    "vit_b32_in21k_ft1k": [
        "model.img_size=32", "+model.patch_size=8", "+model.embed_dim=48", "+model.depth=2",
        "+model.num_heads=3",
    ],
    "bit_r50x1_hyperrule": [],
}  # fmt: skip


class _StopAfterOne(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= 1:
            trainer.should_stop = True


@pytest.mark.parametrize("experiment", sorted(TINY))
def test_every_model_family_trains_one_step(experiment, tmp_path):
    cfg = _compose(
        [
            f"+experiment={experiment}",
            "data=cls/demo",
            "model.pretrained=null",
            "trainer=cpu",
            "trainer.precision=32-true",
            "data.global_batch_size=4",
            "data.max_batch_per_device=4",
            "trainer.max_steps=1",
            "+trainer.limit_val_batches=0",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            *TINY[experiment],
        ],
        tmp_path,
    )
    datamodule, task, trainer = runner.build(cfg, callbacks=[_StopAfterOne()])
    if experiment == "bit_r50x1_hyperrule":  # 130 demo images of 32 px: 500 steps, crop 128
        assert cfg.trainer.max_steps == 500 and cfg.model.img_size == 128
        assert list(cfg.optim.milestones) == [0.4, 0.6, 0.8]
    trainer.fit(task, datamodule=datamodule)
    assert trainer.global_step == 1
