"""The fast two-view pipeline against the official one, statistically (issue 17).

bitrain's ``TwoViewTransform`` draws the crop from the image header, decodes JPEGs at a reduced DCT
scale when the crop allows it, resizes with torch's uint8 bicubic and jitters the small views;
the official pipeline (``scripts/bench_data.py`` ``official_views``, a re-statement of unilm's
``DataAugmentationForBEiT``) jitters the whole decoded image, flips, crops and resizes with PIL.
The samples differ one by one (other random draws); their distributions must not. Each statistic
is compared with a two-sample Kolmogorov-Smirnov test at level 0.001 over ``N`` samples per side:

* crop area and aspect ratio, read back from the views of a coordinate image (red = x, green = y),
  a 480x360 JPEG, so crops of 112 px and more are decoded at 1/2 and 224 px and more at 1/4;
* flip rate;
* per-channel mean and standard deviation of both views, and each view's sharpness (mean
  absolute difference of neighbouring pixels), on JPEGs cut from real photographs, with jitter;
* the masks of the data module's batches against the mask generator's own.

The views are 56 and 28 px (BEiT's 224 and 112 scaled by 1/4, images scaled alike) so the test
runs in seconds; ``test_a_wrong_pipeline_is_caught`` shows the comparisons fail for a wrong crop
scale, a missing jitter and a blurrier resampling.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bitrain.data.datamodule import PretrainDataModule
from bitrain.data.masking import BlockwiseMaskGenerator
from bitrain.data.sources import ImageFolderSource
from bitrain.data.transforms import TwoViewTransform

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"
N = 600  # samples per side
SIZE, SECOND = 56, 28
ALPHA_C = 1.949  # Kolmogorov-Smirnov c(alpha) for alpha = 0.001


def _bench_data():
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("bench_data", SCRIPTS / "bench_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ks_rejects(a: np.ndarray, b: np.ndarray) -> tuple[bool, float]:
    """Two-sample Kolmogorov-Smirnov at level 0.001: (different?, D / critical D)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    d = np.max(
        np.abs(
            np.searchsorted(a, grid, "right") / a.size - np.searchsorted(b, grid, "right") / b.size
        )
    )
    critical = ALPHA_C * np.sqrt((a.size + b.size) / (a.size * b.size))
    return bool(d > critical), float(d / critical)


@pytest.fixture(scope="module")
def coordinate_folder(tmp_path_factory) -> Path:
    """One 480x360 JPEG whose red channel is x and green channel is y (blue constant)."""
    root = tmp_path_factory.mktemp("coords")
    w, h = 480, 360
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    img = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    Image.fromarray(img).save(root / "coords.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """48 JPEGs (240x180, quality 90) cut from scikit-image's photographs."""
    return _bench_data().make_images(tmp_path_factory.mktemp("photos"), 48, (240, 180))


def _ours(folder: Path, n: int, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Views from bitrain's path: the source defers decoding, the transform decodes the crop."""
    source = ImageFolderSource(folder)
    transform = TwoViewTransform(SIZE, SECOND, **kwargs)
    PretrainDataModule(source, transform, BlockwiseMaskGenerator(4, 6, min_num_patches=2))
    assert source.deferred_decode  # the data module turned deferred decoding on
    # The default uint8 views, made float as the MIM task does on its device (patch view
    # normalised with the transform's mean/std, token view / 255): the 8-bit rounding is tested too.
    assert transform.output_dtype == "uint8"
    mean = torch.tensor(transform.mean).view(3, 1, 1)
    std = torch.tensor(transform.std).view(3, 1, 1)
    out = []
    for i in range(n):
        torch.manual_seed(i)
        patch, token = transform(source[i % len(source)])
        out.append(((patch.float() / 255 - mean) / std, token.float() / 255))
    return out


def _official(folder: Path, n: int, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    official_views = _bench_data().official_views
    files = [folder / f for f in ImageFolderSource(folder).files]
    images = [Image.open(f).convert("RGB") for f in files]
    out = []
    for i in range(n):
        torch.manual_seed(10_000 + i)
        out.append(official_views(images[i % len(images)], SIZE, SECOND, **kwargs))
    return out


def _boxes(views, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> dict[str, np.ndarray]:
    """Crop area fraction, log aspect ratio and flip, read back from coordinate-image views."""
    area, aspect, flipped = [], [], []
    for patch, _ in views:
        red, green = patch[0].numpy(), patch[1].numpy()  # in [0, 1] (mean 0, std 1)
        first, last = red[:, 0].mean(), red[:, -1].mean()
        top, bottom = green[0].mean(), green[-1].mean()
        width = abs(last - first) * SIZE / (SIZE - 1)
        height = (bottom - top) * SIZE / (SIZE - 1)
        area.append(width * height)
        aspect.append(np.log(width * 480 / (height * 360)))
        flipped.append(first > last)
    return {"area": np.array(area), "aspect": np.array(aspect), "flip": np.array(flipped)}


def _view_stats(views) -> dict[str, np.ndarray]:
    stats: dict[str, list] = {}
    for patch, token in views:
        for name, v in (("patch", patch), ("token", token)):
            for c in range(3):
                stats.setdefault(f"{name}_mean_{c}", []).append(float(v[c].mean()))
                stats.setdefault(f"{name}_std_{c}", []).append(float(v[c].std()))
        for name, v in (("patch", patch), ("token", token)):
            grey = v.mean(0)
            stats.setdefault(f"{name}_sharpness", []).append(
                float((grey[:, 1:] - grey[:, :-1]).abs().mean())
            )
    return {k: np.array(v) for k, v in stats.items()}


def _differences(ours: dict, official: dict) -> dict[str, float]:
    """Statistics whose distributions differ: name -> D / critical D (> 1)."""
    out = {}
    for key in official:
        if key == "flip":
            continue
        rejected, ratio = ks_rejects(ours[key], official[key])
        if rejected:
            out[key] = ratio
    return out


CROP = {"color_jitter": 0.0, "mean": (0, 0, 0), "std": (1, 1, 1)}


@pytest.fixture(scope="module")
def official_boxes(coordinate_folder) -> dict[str, np.ndarray]:
    return _boxes(_official(coordinate_folder, N, **CROP))


@pytest.fixture(scope="module")
def official_stats(photo_folder) -> dict[str, np.ndarray]:
    return _view_stats(_official(photo_folder, N))


def test_crop_area_aspect_and_flip_match_the_official_pipeline(coordinate_folder, official_boxes):
    ours = _boxes(_ours(coordinate_folder, N, **CROP))
    official = official_boxes
    assert _differences(ours, official) == {}
    # The read-back is sound: areas in the configured range, both flip rates near 0.5.
    assert 0.07 < ours["area"].min() and ours["area"].max() < 1.02
    for flips in (ours["flip"], official["flip"]):
        assert abs(flips.mean() - 0.5) < 4 * np.sqrt(0.25 / N)


def test_view_colours_and_sharpness_match_the_official_pipeline(photo_folder, official_stats):
    ours = _view_stats(_ours(photo_folder, N))
    official = official_stats
    assert _differences(ours, official) == {}
    # And the averages agree within 4 standard errors of their difference.
    for key in official:
        se = np.sqrt((ours[key].var() + official[key].var()) / N)
        assert abs(ours[key].mean() - official[key].mean()) < 4 * se, key


@pytest.mark.parametrize("case", ["crop scale (0.25, 1)", "no colour jitter", "too coarse decode"])
def test_a_wrong_pipeline_is_caught(
    case, coordinate_folder, photo_folder, official_boxes, official_stats, monkeypatch
):
    """The comparisons above can fail: each deliberate mistake is detected."""
    if case == "crop scale (0.25, 1)":
        ours = _boxes(_ours(coordinate_folder, N, scale=(0.25, 1.0), **CROP))
        assert "area" in _differences(ours, official_boxes)
        return
    kwargs = {}
    if case == "no colour jitter":
        kwargs["color_jitter"] = 0.0
    else:  # decode at a DCT scale that leaves the crop only a quarter of the view's pixels
        import bitrain.data.transforms as transforms

        exact = transforms.dct_reduction
        monkeypatch.setattr(transforms, "dct_reduction", lambda w, h, size: exact(w, h, size // 4))
    differences = _differences(_view_stats(_ours(photo_folder, N, **kwargs)), official_stats)
    if case == "no colour jitter":
        assert any(k.startswith(("patch_std", "token_std", "patch_mean")) for k in differences)
    else:
        assert "patch_sharpness" in differences


def test_masks_of_the_fast_pipeline_are_the_generators(photo_folder):
    """Data-module masks (per-sample seeded) have the generator's exact count and statistics."""
    generator = BlockwiseMaskGenerator((14, 14), 75)
    dm = PretrainDataModule(
        ImageFolderSource(photo_folder), TwoViewTransform(SIZE, SECOND), generator,
        batch_size=16, num_workers=0, pin_memory=False,
    )  # fmt: skip
    masks = []
    for epoch in range(8):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        masks += [b["mask"] for b in loader]
    ours = torch.cat(masks).flatten(1).float()
    g = torch.Generator().manual_seed(0)
    direct = torch.stack([generator(g) for _ in range(len(ours))]).flatten(1).float()
    assert (ours.sum(1) == 75).all()
    for stat in (
        lambda m: m.view(-1, 14, 14).sum(2).argmax(1),
        lambda m: m.view(-1, 14, 14).sum(1).argmax(1),
    ):
        rejected, _ = ks_rejects(stat(ours).numpy(), stat(direct).numpy())
        assert not rejected
