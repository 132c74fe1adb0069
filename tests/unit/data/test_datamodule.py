"""Data modules: batch contract, reproducible masks and crops, bad samples, labels, validation."""

import os

import pytest
import torch
from torch.utils.data import Dataset

from bitrain.data.datamodule import ImageDataModule, PretrainDataModule, collate_drop_none
from bitrain.data.demo import DemoSource
from bitrain.data.masking import BlockwiseMaskGenerator
from bitrain.data.sources import ImageFolderSource, SyntheticSource, WebDatasetSource
from bitrain.data.transforms import SingleViewTransform, TwoViewTransform


class Subset(Dataset):
    """The first ``n`` items of a source (keeps worker tests fast)."""

    def __init__(self, source, n):
        self.source, self.n = source, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.source[i]


def _pretrain_dm(source=None, **kwargs):
    source = source if source is not None else Subset(DemoSource(), 64)
    defaults = {"batch_size": 16, "num_workers": 0, "seed": 0}
    return PretrainDataModule(
        source,
        TwoViewTransform(32, 16, scale=(0.5, 1.0)),
        BlockwiseMaskGenerator(8, 26, 4),
        **{**defaults, **kwargs},
    )


def _batches(dm, n=None, val=False):
    loader = dm.val_dataloader() if val else dm.train_dataloader()
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def test_pretrain_batch_contract():
    (batch,) = _batches(_pretrain_dm(), 1)
    assert set(batch) == {"images", "tokenizer_images", "mask"}
    # uint8 pixels (TwoViewTransform's default): the task normalises them on its device.
    assert batch["images"].shape == (16, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["tokenizer_images"].shape == (16, 3, 16, 16)
    assert batch["tokenizer_images"].dtype == torch.uint8
    assert int(batch["images"].max()) > 128 and int(batch["tokenizer_images"].max()) > 128
    assert batch["mask"].shape == (16, 8, 8) and batch["mask"].dtype == torch.bool
    assert (batch["mask"].flatten(1).sum(1) == 26).all()
    assert len({m.numpy().tobytes() for m in batch["mask"]}) > 12  # masks differ per sample


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_batches_different_seed_different(workers):
    def epoch(seed):
        torch.manual_seed(
            123
        )  # the main-process RNG (crops with num_workers=0), as seed_everything
        return _batches(_pretrain_dm(seed=seed, num_workers=workers, persistent_workers=False))

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert len(a) == 4
    for key in ("images", "tokenizer_images", "mask"):
        assert all(torch.equal(x[key], y[key]) for x, y in zip(a, b)), key
    assert not torch.equal(a[0]["mask"], c[0]["mask"])
    assert not torch.equal(a[0]["images"], c[0]["images"])  # other order and crops


def test_batches_do_not_depend_on_the_number_of_workers():
    torch.manual_seed(5)
    a = _batches(_pretrain_dm(num_workers=0))
    torch.manual_seed(6)  # nor on the main process's RNG
    b = _batches(_pretrain_dm(num_workers=2, persistent_workers=False))
    assert len(a) == len(b) == 4
    for key in ("images", "tokenizer_images", "mask"):
        assert all(torch.equal(x[key], y[key]) for x, y in zip(a, b)), key


def test_masks_and_order_change_between_epochs():
    dm = _pretrain_dm()
    loader = dm.train_dataloader()
    first = next(iter(loader))
    again = next(iter(loader))
    loader.sampler.set_epoch(1)  # Lightning calls this at every epoch start
    second = next(iter(loader))
    for key in ("images", "tokenizer_images", "mask"):  # same epoch -> same data
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(first["mask"], second["mask"])
    assert not torch.equal(first["images"], second["images"])


def test_an_epoch_is_a_function_of_seed_and_epoch_only():
    """A loader built later (a resumed run) gives epoch e the same batches as the original."""
    straight = _pretrain_dm().train_dataloader()
    straight.sampler.set_epoch(3)
    resumed = _pretrain_dm().train_dataloader()
    torch.manual_seed(1234)  # global RNG state must not matter
    resumed.sampler.set_epoch(3)
    a, b = next(iter(straight)), next(iter(resumed))
    for key in ("images", "tokenizer_images", "mask"):
        assert torch.equal(a[key], b[key]), key


def test_seeded_samples_leave_the_global_generators_alone(monkeypatch):
    """Per-sample seeding touches only a forked CPU generator: the main process's torch RNG
    (model init, dropout) continues where it was, and no accelerator generator is reseeded
    (torch.manual_seed would queue CUDA/XPU/MTIA seeds on every sample)."""
    loader = _pretrain_dm().train_dataloader()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    next(iter(loader))
    assert torch.equal(torch.rand(3), expected)
    assert reseeded == []


def test_no_shuffle_keeps_order():
    dm = _pretrain_dm(shuffle=False, batch_size=4)
    loader = dm.train_dataloader()
    a = next(iter(loader))
    loader.sampler.set_epoch(1)
    b = next(iter(loader))
    assert [k for _, k in list(iter(loader.sampler))[:4]] == [0, 1, 2, 3]  # same samples, in order
    assert not torch.equal(a["mask"], b["mask"])  # new epoch: new crops and masks


def test_validation_is_identical_every_epoch_and_keeps_the_last_batch():
    dm = _pretrain_dm(val_source=Subset(DemoSource("test"), 20), num_workers=0)
    first, second = _batches(dm, val=True), _batches(dm, val=True)
    assert [len(b["mask"]) for b in first] == [16, 4]
    for x, y in zip(first, second):
        assert torch.equal(x["mask"], y["mask"]) and torch.equal(x["images"], y["images"])
    assert _pretrain_dm().val_dataloader() == []


def test_synthetic_source_skips_transform():
    src = SyntheticSource(length=32, input_size=32, second_input_size=16)
    dm = PretrainDataModule(src, None, BlockwiseMaskGenerator(8, 26, 4), 8, num_workers=0)
    (batch,) = _batches(dm, 1)
    assert batch["images"].shape == (8, 3, 32, 32) and batch["tokenizer_images"].shape[-1] == 16
    assert (batch["mask"].flatten(1).sum(1) == 26).all()


def test_bad_samples_are_replaced_and_counted(image_folder):
    src = ImageFolderSource(image_folder)
    dm = _pretrain_dm(src, batch_size=7, drop_last=False)
    batches = _batches(dm)
    assert [len(b["images"]) for b in batches] == [7, 7]  # 14 files, 3 bad: substitutes fill in
    assert dm.num_bad_samples >= 3


def test_collate_drops_none_and_rejects_all_bad():
    batch = collate_drop_none([None, {"x": torch.ones(2)}, None])
    assert batch["x"].shape == (1, 2)
    with pytest.raises(RuntimeError, match="every sample"):
        collate_drop_none([None, None])


def test_empty_source_is_a_clear_error():
    empty = Subset(DemoSource(), 0)
    with pytest.raises(ValueError, match="empty.*Subset|Subset.*empty"):
        _pretrain_dm(empty).train_dataloader()
    with pytest.raises(ValueError, match="mask_generator"):
        PretrainDataModule(DemoSource(), None, None)
    with pytest.raises(ValueError, match="batch_size"):
        _pretrain_dm(batch_size=0)


def test_image_datamodule_single_view_and_labels():
    dm = ImageDataModule(DemoSource("train"), SingleViewTransform(16), batch_size=8, num_workers=0)
    (batch,) = _batches(dm, 1)
    assert set(batch) == {"images", "labels"}
    assert batch["images"].shape == (8, 3, 16, 16) and batch["labels"].dtype == torch.long
    dm = ImageDataModule(DemoSource("pretrain"), SingleViewTransform(16), 8, num_workers=0)
    (batch,) = _batches(dm, 1)
    assert set(batch) == {"images"} and 0 <= float(batch["images"].min())


def test_iterable_source(shards):
    src = WebDatasetSource([str(p) for p in shards], shuffle=4)
    dm = _pretrain_dm(src, batch_size=4, drop_last=True)
    batches = _batches(dm)
    assert len(batches) == 2 and src.num_bad == 1  # 11 good samples -> 2 full batches of 4
    assert batches[0]["mask"].shape == (4, 8, 8)


def test_persistent_workers_only_with_workers():
    loader = _pretrain_dm(num_workers=0, persistent_workers=True).train_dataloader()
    assert loader.persistent_workers is False and loader.pin_memory is False


def test_runs_under_lightning_trainer(tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.masks = []

        def training_step(self, batch, idx):
            self.masks.append(batch["mask"].clone())
            return (self.w * batch["images"].float().mean()).sum() + self.w.square().sum()

        def validation_step(self, batch, idx):
            assert batch["mask"].shape[1:] == (8, 8)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit():
        L.seed_everything(0, workers=True, verbose=False)
        probe = Probe()
        trainer = L.Trainer(
            max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
            limit_val_batches=1, val_check_interval=2,
        )  # fmt: skip
        dm = _pretrain_dm(val_source=Subset(DemoSource("test"), 16), batch_size=8)
        trainer.fit(probe, datamodule=dm)
        return torch.stack(probe.masks)

    first, second = fit(), fit()
    assert first.shape == (3, 8, 8, 8) and torch.equal(first, second)


def test_pretraining_defers_decoding_and_counts_files_that_fail_late(image_folder, caplog):
    """Truncated JPEGs pass the header read and fail in the transform: counted and replaced."""
    src = ImageFolderSource(image_folder)
    dm = _pretrain_dm(src, batch_size=7, drop_last=False)
    assert src.deferred_decode  # TwoViewTransform decodes what its crop needs
    from bitrain.data.decode import EncodedImage

    assert isinstance(src[src.files.index("cat/rgb.jpg")], EncodedImage)
    with caplog.at_level("WARNING"):
        batches = _batches(dm)
    assert [len(b["images"]) for b in batches] == [7, 7]
    assert dm.num_bad_samples == 3  # truncated.jpg (late, in the transform), empty.png, text.jpg
    assert any("truncated.jpg" in r.getMessage() for r in caplog.records)
    # Fine-tuning sources stay eager: ImageDataModule does not defer.
    eager = ImageFolderSource(image_folder)
    ImageDataModule(eager, SingleViewTransform(16), batch_size=2)
    assert not eager.deferred_decode


def test_unset_num_workers_follow_the_cpus_per_device(monkeypatch):
    from bitrain.data.datamodule import default_num_workers

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert default_num_workers(8) == 3  # 32 CPUs / 8 devices - 1 for the training process
    assert default_num_workers(1) == 31
    assert default_num_workers(64) == 1  # never 0: at least one worker
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "32")  # srun gave this task its own 32 CPUs
    assert default_num_workers(8) == 31
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    dm = _pretrain_dm(num_workers=None, prefetch_factor=3, persistent_workers=True)
    loader = dm.train_dataloader()
    assert loader.num_workers == default_num_workers() == 31  # no CUDA here: one device
    assert loader.persistent_workers and loader.prefetch_factor == 3
    with pytest.raises(ValueError, match="num_workers must be >= 0, or null"):
        _pretrain_dm(num_workers=-1)
    with pytest.raises(ValueError, match="prefetch_factor"):
        _pretrain_dm(prefetch_factor=0)


def test_gpu_data_configs_leave_num_workers_to_the_cpus():
    from omegaconf import OmegaConf

    root = __import__("pathlib").Path(__file__).resolve().parents[3] / "configs" / "data"
    for name in ("imagenet", "image_folder", "webdataset"):
        cfg = OmegaConf.load(root / f"{name}.yaml")
        assert cfg.num_workers is None and cfg.persistent_workers and cfg.pin_memory, name


def test_deferred_decoding_keeps_data_a_function_of_seed_epoch_and_index(tmp_path):
    """JPEGs decoded by the transform (crop first, reduced DCT scale): same batches with 0 or 2
    workers, and for a data module built later (a resume) at the same epoch."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for i in range(24):  # 160x120: crops of 64 px and more are decoded at 1/2 or 1/4
        pixels = (torch.rand(3, 15, 20, generator=rng) * 255).to(torch.uint8)
        img = Image.fromarray(pixels.permute(1, 2, 0).numpy()).resize((160, 120), Image.BICUBIC)
        img.save(tmp_path / f"{i:02d}.jpg", quality=90)

    def loader(workers):
        dm = PretrainDataModule(
            ImageFolderSource(tmp_path), TwoViewTransform(32, 16), BlockwiseMaskGenerator(8, 26, 4),
            batch_size=8, num_workers=workers, persistent_workers=False, seed=3,
        )  # fmt: skip
        return dm.train_dataloader()

    first = loader(0)
    first.sampler.set_epoch(2)
    torch.manual_seed(99)
    later = loader(2)
    later.sampler.set_epoch(2)
    a, b = list(first), list(later)
    assert len(a) == len(b) == 3
    for key in ("images", "tokenizer_images", "mask"):
        assert all(torch.equal(x[key], y[key]) for x, y in zip(a, b)), key
    other = loader(0)
    other.sampler.set_epoch(3)
    assert not torch.equal(next(iter(other))["images"], a[0]["images"])


class _PythonAndNumpyNoise:
    """A transform drawing from Python's random and NumPy (as timm's do), declaring nothing."""

    def __call__(self, image):
        import random

        import numpy as np

        noise = random.random() + float(np.random.rand())
        return torch.full((3, 4, 4), noise), torch.full((3, 2, 2), noise)


def test_only_declared_random_sources_are_reseeded(monkeypatch):
    """bitrain's transforms draw from torch only and say so: random and NumPy are left alone
    (~0.2 ms a sample); a transform that declares nothing still gets all three seeded."""
    import random

    import numpy as np

    assert TwoViewTransform.random_sources == frozenset({"torch"})
    calls = []
    monkeypatch.setattr(random, "seed", lambda *a, **k: calls.append("random"))
    monkeypatch.setattr(np.random, "seed", lambda *a, **k: calls.append("numpy"))
    _batches(_pretrain_dm(), n=1)
    assert calls == []
    monkeypatch.undo()

    def noise(workers, global_seed):
        random.seed(global_seed)
        np.random.seed(global_seed)
        dm = PretrainDataModule(
            Subset(DemoSource(), 16), _PythonAndNumpyNoise(), BlockwiseMaskGenerator(8, 26, 4),
            batch_size=8, num_workers=workers, persistent_workers=False,
        )  # fmt: skip
        return [b["images"] for b in dm.train_dataloader()]

    a, b = noise(0, 1), noise(2, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len({float(x[i, 0, 0, 0]) for x in a for i in range(8)}) == 16  # per-sample seeds
