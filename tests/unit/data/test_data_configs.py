"""configs/data/*.yaml and configs/masking/*.yaml instantiate (keys = constructor arguments)."""

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from bitrain.data import BlockwiseMaskGenerator, PretrainDataModule

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def _load(group: str, name: str, tmp_path: Path, **overrides) -> object:
    """The group's YAML under a stub root config (model, tokenizer, seed, paths), resolved."""
    node = OmegaConf.load(CONFIGS / group / f"{name}.yaml")
    demo_model = OmegaConf.load(CONFIGS / "model" / "beit_tiny_mim.yaml")
    root = OmegaConf.create(
        {
            "model": {"img_size": demo_model.img_size, "patch_size": demo_model.patch_size},
            "tokenizer": {"input_size": 16},
            "seed": 0,
            "paths": {"data_dir": str(tmp_path)},
            group: node,
        }
    )
    for key, value in overrides.items():
        OmegaConf.update(root, f"{group}.{key}", value)
    return OmegaConf.to_container(root, resolve=True)[group]


def test_masking_demo_config(tmp_path):
    gen = hydra.utils.instantiate(_load("masking", "demo", tmp_path))
    assert isinstance(gen, BlockwiseMaskGenerator) and gen.grid_size == (4, 4)
    assert int(gen().sum()) == 6 and gen.min_num_patches == 2


def test_blockwise_is_beit_at_224(tmp_path):
    cfg = _load("masking", "blockwise", tmp_path, **{"input_size": "${div:224,16}"})
    gen = hydra.utils.instantiate(cfg)
    assert gen.grid_size == (14, 14) and int(gen().sum()) == 75
    assert gen.num_masking_patches == 75 and gen.min_num_patches == 16
    assert gen.min_aspect == pytest.approx(0.3) and gen.max_aspect == pytest.approx(1 / 0.3)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("demo", {}),
        ("synthetic", {"source.length": 16}),
        ("image_folder", {"source.root": "IMAGES"}),
        ("imagenet", {}),
        ("webdataset", {"source.urls": "SHARDS"}),
    ],
)
def test_data_configs_build_batches(name, overrides, tmp_path, image_folder, shards):
    if name == "imagenet":
        (tmp_path / "imagenet").mkdir()
        (tmp_path / "imagenet" / "train").symlink_to(image_folder)
    subst = {"IMAGES": str(image_folder), "SHARDS": [str(p) for p in shards]}
    overrides = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
    cfg = _load("data", name, tmp_path, batch_size=4, num_workers=0, **overrides)
    mask_generator = BlockwiseMaskGenerator(8, 26, 4)
    dm = hydra.utils.instantiate(cfg, mask_generator=mask_generator)
    assert isinstance(dm, PretrainDataModule)
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, 32, 32)
    assert batch["tokenizer_images"].shape == (4, 3, 16, 16)
    assert batch["mask"].dtype == torch.bool and batch["mask"].shape == (4, 8, 8)


def test_required_paths_are_marked_missing():
    for name, key in (("image_folder", "root"), ("webdataset", "urls")):
        node = OmegaConf.load(CONFIGS / "data" / f"{name}.yaml")
        assert OmegaConf.is_missing(node.source, key)


def test_every_yaml_starts_with_a_comment():
    for path in [*(CONFIGS / "data").glob("*.yaml"), *(CONFIGS / "masking").glob("*.yaml")]:
        assert path.read_text().startswith("#"), path


def test_demo_tokenizer_config(tmp_path):
    from bitrain.data import ImageDataModule

    cfg = _load("data", "demo_tokenizer", tmp_path, batch_size=4)
    dm = hydra.utils.instantiate(cfg)
    assert isinstance(dm, ImageDataModule)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"images"} and batch["images"].shape == (4, 3, 16, 16)
