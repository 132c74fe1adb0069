"""TwoViewTransform / SingleViewTransform: shapes, ranges, one shared crop and flip, determinism."""

import numpy as np
import pytest
import torch
from PIL import Image

from bitrain.data.transforms import SingleViewTransform, TwoViewTransform, interpolation_mode


def _half_image(size=(96, 64)) -> Image.Image:
    """Left half black, right half white (width x height)."""
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[:, size[0] // 2 :] = 255
    return Image.fromarray(arr)


def _gradient_image(w=80, h=60) -> Image.Image:
    """Red grows left -> right, green grows top -> bottom: every crop box looks different."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8))


def test_two_view_shapes_ranges_and_normalization():
    t = TwoViewTransform(
        input_size=32, second_input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3,
        output_dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    images, tok = t(_gradient_image())
    assert images.shape == (3, 32, 32) and tok.shape == (3, 16, 16)
    assert images.dtype == torch.float32 and tok.dtype == torch.float32
    assert 0.0 <= float(tok.min()) and float(tok.max()) <= 1.0
    assert float(images.min()) >= (0 - 0.5) / 0.25 - 1e-5
    assert float(images.max()) <= (1 - 0.5) / 0.25 + 1e-5
    # Undoing the normalization gives pixels in [0, 1] again.
    pixels = images * 0.25 + 0.5
    assert float(pixels.min()) > -1e-5 and float(pixels.max()) < 1 + 1e-5


def test_both_views_come_from_the_same_box_and_flip():
    t = TwoViewTransform(
        input_size=32, second_input_size=16, scale=(0.1, 0.5), color_jitter=0.0,
        mean=(0, 0, 0), std=(1, 1, 1), hflip=0.5, output_dtype="float32",
    )  # fmt: skip
    img = _half_image()
    for seed in range(40):
        torch.manual_seed(seed)
        images, tok = t(img)
        big = images.mean(0)  # [32, 32] in [0, 1]
        small = torch.nn.functional.interpolate(big[None, None], size=16, mode="area")[0, 0]
        # Same box + same flip: the white fraction per column agrees between views.
        assert torch.allclose(small.mean(0), tok.mean(0).mean(0), atol=0.08), seed
        assert abs(float(big.mean()) - float(tok.mean())) < 0.03


def test_flip_is_shared_and_happens():
    t = TwoViewTransform(32, 32, scale=(1.0, 1.0), ratio=(1.5, 1.5), color_jitter=0.0, hflip=0.5)
    img = _half_image((96, 64))  # full crop: left black, right white unless flipped
    flips = 0
    for seed in range(30):
        torch.manual_seed(seed)
        images, tok = (v.float() for v in t(img))  # uint8 views
        left_dark_patch = images.mean(0)[:, :8].mean() < images.mean(0)[:, -8:].mean()
        left_dark_tok = tok.mean(0)[:, :8].mean() < tok.mean(0)[:, -8:].mean()
        assert bool(left_dark_patch) == bool(left_dark_tok)
        flips += int(not left_dark_tok)
    assert 5 < flips < 25


def test_no_flip_when_hflip_zero():
    t = SingleViewTransform(16, scale=(1.0, 1.0), ratio=(1.5, 1.5), hflip=0.0)
    for seed in range(10):
        torch.manual_seed(seed)
        view = t(_half_image())
        assert view[:, :, :4].mean() < 0.05 and view[:, :, -4:].mean() > 0.95


def test_color_jitter_changes_pixels_identically_for_both_views():
    img = _gradient_image()
    kw = {"mean": (0, 0, 0), "std": (1, 1, 1), "output_dtype": "float32"}
    plain = TwoViewTransform(24, 24, color_jitter=0.0, **kw)
    jitter = TwoViewTransform(24, 24, color_jitter=0.4, **kw)
    torch.manual_seed(3)
    a, _ = plain(img)
    torch.manual_seed(3)
    b, b_tok = jitter(img)
    assert not torch.allclose(a, b, atol=1e-3)
    # Same size, bicubic vs lanczos: the jittered views still agree closely.
    assert (b - b_tok).abs().mean() < 0.03


@pytest.mark.parametrize("color_jitter", [0.0, 0.4])
def test_uint8_views_are_the_float_views_rounded(color_jitter):
    """The default uint8 views are the float path's pixels rounded once to 8 bits: the token
    view x 255 and the patch view un-normalised, to within half a grey level (+ float error)."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    kw = {"color_jitter": color_jitter, "mean": mean, "std": std}
    as_uint8 = TwoViewTransform(32, 16, **kw)
    as_float = TwoViewTransform(32, 16, output_dtype="float32", **kw)
    img = _gradient_image()
    for seed in range(8):
        torch.manual_seed(seed)
        images, tok = as_uint8(img)
        torch.manual_seed(seed)
        f_images, f_tok = as_float(img)
        assert images.dtype == torch.uint8 and tok.dtype == torch.uint8
        assert images.shape == (3, 32, 32) and tok.shape == (3, 16, 16)
        assert images.is_contiguous() and tok.is_contiguous()
        pixels = f_images * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        assert (images.float() - pixels * 255).abs().max() <= 0.5 + 1e-3
        assert (tok.float() - f_tok * 255).abs().max() <= 0.5 + 1e-3
        if color_jitter == 0.0:  # no jitter: the resized pixels themselves, no rounding at all
            torch.testing.assert_close(images.float(), pixels * 255, atol=1e-3, rtol=0)


def test_output_dtype_is_checked():
    with pytest.raises(ValueError, match="output_dtype must be one of"):
        TwoViewTransform(output_dtype="float16")
    assert "output_dtype='uint8'" in repr(TwoViewTransform())


def test_determinism_with_manual_seed():
    t = TwoViewTransform(32, 16)
    img = _gradient_image()
    torch.manual_seed(11)
    a = t(img)
    torch.manual_seed(11)
    b = t(img)
    torch.manual_seed(12)
    c = t(img)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_single_view_shape_range_and_mode_conversion():
    t = SingleViewTransform(20)
    torch.manual_seed(0)
    grey = Image.fromarray(np.arange(48 * 40, dtype=np.uint8).reshape(40, 48) % 255, mode="L")
    out = t(grey)
    assert out.shape == (3, 20, 20) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) <= float(out.max()) <= 1.0
    assert torch.equal(out[0], out[1])  # grey -> RGB keeps the channels equal
    assert "size=20" in repr(t) and "lanczos" in repr(t)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"scale": (0.9, 0.1)}, ValueError),
        ({"scale": (0.0, 1.0)}, ValueError),
        ({"scale": 0.5}, ValueError),
        ({"ratio": (0.0, 1.0)}, ValueError),
        ({"hflip": 1.5}, ValueError),
        ({"color_jitter": -0.1}, ValueError),
        ({"input_size": 0}, ValueError),
        ({"interpolation": "cubicle"}, ValueError),
        ({"std": (0.0, 1.0, 1.0)}, ValueError),
    ],
)
def test_invalid_arguments(kwargs, error):
    with pytest.raises(error):
        TwoViewTransform(**kwargs)


def test_rejects_non_images_and_accepts_yaml_lists():
    t = TwoViewTransform(16, 8, scale=[0.5, 1.0], ratio=[0.75, 1.25], mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(TypeError, match="PIL.Image"):
        t(torch.zeros(3, 16, 16))
    assert interpolation_mode("LANCZOS") == interpolation_mode("lanczos")


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (2, 1, 0, 3), (1, 3, 2, 0)])
def test_view_jitter_equals_torchvisions_operations(order):
    """The in-place jitter on [0, 255] views = torchvision's adjust_* in the drawn order."""
    from torchvision.transforms import functional as F

    from bitrain.data.transforms import _LUMA, _jitter_

    g = torch.Generator().manual_seed(0)
    patch, token = torch.rand(3, 24, 24, generator=g), torch.rand(3, 12, 12, generator=g)
    b, c, s = 1.3, 0.7, 1.35
    views = [patch * 255, token * 255]
    _jitter_(views, (torch.tensor(order), b, c, s, None), torch.tensor(_LUMA))
    ops = {0: lambda x: F.adjust_brightness(x, b), 2: lambda x: F.adjust_saturation(x, s)}
    grey_mean = None
    expected = [patch.clone(), token.clone()]
    for fn in order:
        if fn == 1:  # contrast: both views blend with the PATCH view's mean grey
            grey_mean = F.rgb_to_grayscale(expected[0]).mean()
            expected = [(c * x + (1 - c) * grey_mean).clamp(0, 1) for x in expected]
        elif fn in ops:
            expected = [ops[fn](x) for x in expected]
    for got, want in zip(views, expected):
        torch.testing.assert_close(got / 255, want, atol=1e-4, rtol=0)
    assert grey_mean is not None


def test_dct_reduction_keeps_the_view_size_across_the_crop(monkeypatch):
    from bitrain.data import transforms
    from bitrain.data.transforms import dct_reduction

    assert dct_reduction(447, 900, 224) == 1  # 447 / 2 < 224
    assert dct_reduction(448, 900, 224) == 2
    assert dct_reduction(900, 1000, 224) == 4
    assert dct_reduction(1792, 1800, 224) == 8
    assert dct_reduction(5000, 5000, 224) == 8  # libjpeg's smallest scale
    # The larger of the two views decides (a token view larger than the patch view).
    seen = []
    monkeypatch.setattr(
        transforms,
        "dct_reduction",
        lambda w, h, size: seen.append(size) or dct_reduction(w, h, size),
    )
    import io

    from bitrain.data.decode import EncodedImage

    data = io.BytesIO()
    _gradient_image(400, 300).save(data, format="JPEG")
    TwoViewTransform(32, 48)(EncodedImage(data.getvalue()))
    assert seen == [48]


def _photo_crops(n: int = 120):
    """(image, box) pairs: random BEiT crops of 500x375 JPEGs cut from real photographs."""
    import importlib.util
    import io
    from pathlib import Path

    from torchvision import transforms as T

    scripts = Path(__file__).resolve().parents[3] / "scripts"
    spec = importlib.util.spec_from_file_location("bench_data_t", scripts / "bench_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = bench.make_images(Path(tmp), 14, (500, 375))
        images = [
            Image.open(io.BytesIO(p.read_bytes())).convert("RGB") for p in sorted(root.rglob("*"))
            if p.suffix == ".jpg"
        ]  # fmt: skip
    torch.manual_seed(0)
    out = []
    for i in range(n):
        img = images[i % len(images)]
        top, left, h, w = T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
        out.append((img, (left, top, left + w, top + h)))
    return out


def test_token_view_is_lanczos_quality():
    """The 112-px Lanczos view (reduced first for big boxes) stays within a fraction of a grey
    level of PIL's exact Lanczos on real photographs, and no pixel is far off."""
    from bitrain.data.transforms import _resized

    diffs, reduced = [], 0
    for img, box in _photo_crops():
        got = _resized(img, box, 112, interpolation_mode("lanczos")).permute(1, 2, 0).numpy()
        exact = np.asarray(img.resize((112, 112), Image.LANCZOS, box=box))
        diff = np.abs(got.astype(np.int16) - exact.astype(np.int16))
        reduced += int(box[2] - box[0] >= 3 * 112 or box[3] - box[1] >= 3 * 112)
        diffs.append(diff)
        assert diff.mean() < 2.0, box  # per crop (measured: at most 1.3)
    all_diffs = np.concatenate([d.ravel() for d in diffs])
    assert reduced >= 10  # the reduction was exercised
    assert all_diffs.mean() < 0.4  # measured 0.18 grey levels
    assert np.percentile(all_diffs, 99.9) <= 8  # measured 5


def test_big_boxes_are_reduced_before_the_lanczos_view():
    """A box 3x the view's size or more is box-reduced first (PIL reducing_gap 1.5): faster, and
    not the exact Lanczos; smaller boxes get the exact Lanczos."""
    from bitrain.data import transforms
    from bitrain.data.transforms import _resized

    img, _ = _photo_crops(1)[0]
    lanczos = interpolation_mode("lanczos")
    big = (10.0, 5.0, 10.0 + 360, 5.0 + 350)  # >= 336 = 3 x 112 on both axes: reduced by 2
    got = _resized(img, big, 112, lanczos).permute(1, 2, 0).numpy()
    fast = np.asarray(img.resize((112, 112), Image.LANCZOS, box=big, reducing_gap=1.5))
    exact = np.asarray(img.resize((112, 112), Image.LANCZOS, box=big))
    assert not np.array_equal(got, exact)
    np.testing.assert_array_equal(got, fast)
    assert transforms.LANCZOS_REDUCING_GAP == 1.5
    small = (10.0, 5.0, 10.0 + 300, 5.0 + 300)  # < 336: exact Lanczos
    got = _resized(img, small, 112, lanczos).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, np.asarray(img.resize((112, 112), Image.LANCZOS, box=small)))


def test_patch_view_resamples_the_rgbx_bytes_to_the_same_pixels():
    """The crop reaches torch as PIL's 4-byte RGBX pixels (no packing to 3 bytes): the patch view
    is exactly the antialiased bicubic of the packed RGB crop."""
    from bitrain.data.transforms import _resized

    for img, box in _photo_crops(24):
        got = _resized(img, box, 224, interpolation_mode("bicubic"))
        region = torch.from_numpy(np.array(img.crop(box)))[None].permute(0, 3, 1, 2)
        want = torch.nn.functional.interpolate(
            region, size=(224, 224), mode="bicubic", antialias=True, align_corners=False
        )[0]
        assert got.shape == (3, 224, 224) and torch.equal(got, want)
