"""Fine-tuning configs: normalisation, Mixup, the BiT / ViT transforms and heads as the official
code; one real training step of every model family. (The recipes' numbers: test_recipes.py.)"""

import logging
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms as T

from bitrain.tasks.classification import _build_mixup
from bitrain.tasks.mim import normalise_pixels
from bitrain.training import runner
from bitrain.training.hyperrule import apply_hyperrule, hyperrule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CKPT = "/nonexistent/pretrained.ckpt"


def _compose(overrides, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("finetune", overrides=[*overrides, f"paths.output_dir={tmp_path}"])


def _pixels(transform, image):
    out = transform(image)
    return out[0] if isinstance(out, tuple) else out  # pretraining: (patch view, token view)


HALF = ["beit_base_ft1k", "beit_base_ft21k", "beit_base_ft21k_to1k"]
IMAGENET = ["beit_base_vanilla_ft1k"]


@pytest.mark.parametrize("experiment", HALF + IMAGENET)
def test_finetuning_normalisation_follows_the_pretraining(experiment, tmp_path):
    """pt22k / ft22k checkpoints were trained on (x - 0.5) / 0.5 (no
    --imagenet_default_mean_and_std): a white pixel is 1.0 in training and evaluation; the
    vanilla ImageNet-1k chain keeps ImageNet's mean/std ((1 - 0.485) / 0.229 = 2.25)."""
    cfg = _compose([f"+experiment={experiment}", f"model.pretrained={CKPT}"], tmp_path)
    white = Image.new("RGB", (300, 260), (255, 255, 255))
    expected = 1.0 if experiment in HALF else (1 - 0.485) / 0.229
    for key in ("transform", "val_transform"):
        if key == "transform":  # no random colour changes (RandAugment, jitter, erasing)
            cfg.data.transform.update(re_prob=0.0, auto_augment=None, color_jitter=0.0)
        pixels = _pixels(hydra.utils.instantiate(cfg.data[key]), white)
        assert pixels[0].mean().item() == pytest.approx(expected, abs=1e-4), key


@pytest.mark.parametrize(
    ("experiment", "expected"),
    [("beit_base_in22k", 1.0), ("beit_base", (1 - 0.485) / 0.229), ("beit_base_vanilla", 2.2489)],
)
def test_pretraining_normalisation(experiment, expected, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("pretrain", [f"+experiment={experiment}", f"paths.output_dir={tmp_path}"])
    white = Image.new("RGB", (300, 260), (255, 255, 255))
    cfg.data.transform.color_jitter = 0.0
    pixels = _pixels(hydra.utils.instantiate(cfg.data.transform), white)
    # uint8 views: the MIM task normalises them with task.normalization (the transform's mean/std).
    assert pixels.dtype == torch.uint8
    norm = OmegaConf.to_container(cfg.task.normalization, resolve=True)
    assert norm == {"mean": list(cfg.data.transform.mean), "std": list(cfg.data.transform.std)}
    pixels = normalise_pixels(pixels, norm)
    assert pixels[0].mean().item() == pytest.approx(expected, abs=1e-3)


def test_22k_intermediate_finetune_has_no_mixup(tmp_path):
    """The official 22k command passes neither --mixup nor --cutmix (both default to 0)."""
    ft21k = _compose(["+experiment=beit_base_ft21k", f"model.pretrained={CKPT}"], tmp_path)
    assert _build_mixup(OmegaConf.to_container(ft21k.mixup), 0.1, 21841) is None
    ft1k = _compose(["+experiment=beit_base_ft1k", f"model.pretrained={CKPT}"], tmp_path)
    assert _build_mixup(OmegaConf.to_container(ft1k.mixup), 0.1, 1000) is not None


def _photo(width=300, height=200):
    """A photo-like RGB image: smooth gradients, a distinct colour at every border."""
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    arr = np.concatenate([x.repeat(height, 0), y.repeat(width, 1), (x * y)], axis=2)
    return Image.fromarray((arr * 255).astype(np.uint8))


def _bit_cfg(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            _photo().save(root / split / cls / "0.png")
    cfg = _compose(
        ["+experiment=bit_r50x1_hyperrule", f"model.pretrained={CKPT}", f"data.root={root}",
         "data.num_classes=2"],
        tmp_path,
    )  # fmt: skip
    rule = apply_hyperrule(cfg)
    assert (rule.resize, rule.crop) == (512, 480)  # 300x200 px images: the large resolution
    return cfg


def test_bit_transforms_equal_big_transfer(tmp_path):
    """big_transfer train.py mktrainval: train Resize((512, 512)) -> RandomCrop(480) -> flip;
    eval Resize((480, 480)), the whole image, no centre crop; (x - 0.5) / 0.5."""
    cfg = _bit_cfg(tmp_path)
    norm = [T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    reference_train = T.Compose(
        [T.Resize((512, 512)), T.RandomCrop((480, 480)), T.RandomHorizontalFlip(), *norm]
    )
    reference_eval = T.Compose([T.Resize((480, 480)), *norm])
    image = _photo()
    ours = hydra.utils.instantiate(cfg.data.val_transform)
    torch.testing.assert_close(ours(image), reference_eval(image), atol=1e-6, rtol=0)
    train = hydra.utils.instantiate(cfg.data.transform)
    for seed in range(4):  # same random draws -> same windows and flips
        torch.manual_seed(seed)
        expected = reference_train(image)
        torch.manual_seed(seed)
        torch.testing.assert_close(train(image), expected, atol=1e-6, rtol=0)
    crop, resize = train.transforms[1], train.transforms[0]
    assert tuple(crop.size) == (480, 480) and tuple(resize.size) == (512, 512)


@pytest.mark.parametrize("experiment", ["bit_r50x1_hyperrule", "vit_b32_in21k_ft1k"])
def test_bit_and_vit_heads_start_at_zero(experiment, tmp_path):
    overrides = TINY[experiment] if experiment.startswith("vit") else []
    cfg = _compose(
        [f"+experiment={experiment}", "model.pretrained=null", "data.num_classes=5", *overrides],
        tmp_path,
    )
    model = hydra.utils.instantiate(cfg.model)
    head = list(model.get_classifier().parameters())
    assert head and all(torch.count_nonzero(p) == 0 for p in head)
    assert model.get_classifier().weight.shape[0] == 5


def test_vit_transforms_equal_vit_jax(tmp_path):
    """vit_jax input_pipeline.py: eval tf.image.resize to 384x384 (no crop), (x - 127.5) / 127.5;
    training crops 5-100% of the area."""
    cfg = _compose(["+experiment=vit_b32_in21k_ft1k", f"model.pretrained={CKPT}"], tmp_path)
    image = _photo()
    reference_eval = T.Compose(
        [T.Resize((384, 384)), T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    )
    ours = hydra.utils.instantiate(cfg.data.val_transform)
    torch.testing.assert_close(ours(image), reference_eval(image), atol=1e-6, rtol=0)
    train = hydra.utils.instantiate(cfg.data.transform)
    crop = train.transforms[0]
    assert tuple(crop.scale) == (0.05, 1.0) and tuple(crop.size) == (384, 384)


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
def test_every_model_family_trains_one_step(experiment, tmp_path, caplog):
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
    with caplog.at_level(logging.WARNING, logger="bitrain.training.hyperrule"):
        datamodule, task, trainer = runner.build(cfg, callbacks=[_StopAfterOne()])
    if experiment == "bit_r50x1_hyperrule":  # 130 demo images of 32 px: 500 steps, crop 128
        assert "not BiT's squash + random crop" in caplog.text  # data=cls/demo's transform
        assert cfg.trainer.max_steps == 500 and cfg.model.img_size == 128
        assert list(cfg.optim.milestones) == [0.4, 0.6, 0.8]
    trainer.fit(task, datamodule=datamodule)
    assert trainer.global_step == 1
