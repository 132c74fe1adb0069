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
    t = TwoViewTransform(input_size=32, second_input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
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
        mean=(0, 0, 0), std=(1, 1, 1), hflip=0.5,
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
        images, tok = t(img)
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
    plain = TwoViewTransform(24, 24, color_jitter=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    jitter = TwoViewTransform(24, 24, color_jitter=0.4, mean=(0, 0, 0), std=(1, 1, 1))
    torch.manual_seed(3)
    a, _ = plain(img)
    torch.manual_seed(3)
    b, b_tok = jitter(img)
    assert not torch.allclose(a, b, atol=1e-3)
    # Same size, bicubic vs lanczos: the jittered views still agree closely.
    assert (b - b_tok).abs().mean() < 0.03


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
