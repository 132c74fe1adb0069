"""Sources: image folder (modes, bad files, labels), decoding rules, shards, synthetic samples."""

import copy
import io
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from bitrain.data.decode import BadImageError, SharedCounter, decode_image, to_rgb
from bitrain.data.sources import ImageFolderSource, SyntheticSource, WebDatasetSource


def test_image_folder_scans_sorted_recursive_case_insensitive(image_folder, good_names, bad_names):
    src = ImageFolderSource(image_folder)
    expected = sorted(good_names + bad_names)
    assert src.files == expected  # .JPG included, notes.txt ignored, nested folder found
    assert len(src) == 14


def test_image_folder_decodes_every_mode_to_rgb_and_skips_bad(image_folder, bad_names, caplog):
    src = ImageFolderSource(image_folder)
    bad_names = set(bad_names)
    with caplog.at_level(logging.WARNING, logger="bitrain.data"):
        items = [src[i] for i in range(len(src))]
        again = [src[i] for i in range(len(src))]  # second pass: counted again, warned once
    for rel, item in zip(src.files, items):
        if rel in bad_names:
            assert item is None, rel
        else:
            assert isinstance(item, Image.Image) and item.mode == "RGB" and item.size == (24, 24)
    assert sum(i is None for i in again) == 3
    assert src.num_bad == 6
    warned = [r.getMessage() for r in caplog.records if "skipping bad image" in r.getMessage()]
    assert len(warned) == 3 and all(any(b in w for w in warned) for b in ["truncated", "empty"])


def test_transparency_goes_over_white_and_16_bit_is_rescaled(image_folder):
    src = ImageFolderSource(image_folder)
    rgba = src[src.files.index("dog/rgba.png")]
    assert np.asarray(rgba).min() == 255  # fully transparent -> white
    i16 = np.asarray(src[src.files.index("dog/i16.png")])
    assert i16.max() > 100 and i16.min() == 0  # not clipped to 255 everywhere


def test_labels_from_first_level_folder(image_folder):
    src = ImageFolderSource(image_folder, with_labels=True)
    assert src.classes == ["cat", "dog"]
    img, label = src[src.files.index("cat/nested/la.png")]
    assert label == 0 and img.mode == "RGB"
    assert src[src.files.index("dog/pic.webp")][1] == 1
    assert src[src.files.index("dog/empty.png")] is None


def test_labels_reject_loose_files(image_folder):
    (image_folder / "loose.png").write_bytes((image_folder / "cat" / "grey.png").read_bytes())
    with pytest.raises(ValueError, match="loose.png"):
        ImageFolderSource(image_folder, with_labels=True)


def test_missing_root_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderSource(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images found under .*empty \(looked for .*\.jpg"):
        ImageFolderSource(tmp_path / "empty")


def test_extensions_filter(image_folder):
    src = ImageFolderSource(image_folder, extensions=["PNG"])
    assert all(f.endswith(".png") for f in src.files) and len(src.files) == 5


def test_decompression_bomb_is_a_bad_sample(monkeypatch):
    data = io.BytesIO()
    Image.new("L", (64, 64)).save(data, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 > 2x the limit: error
    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_image(data.getvalue(), "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1x and 2x: warning -> bad
    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_image(data.getvalue(), "bomb.png")


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = io.BytesIO()
    img.save(data, format="JPEG", exif=exif.tobytes())
    assert decode_image(data.getvalue()).size == (20, 40)


def test_to_rgb_modes():
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("LA", (4, 4), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("F", (4, 4), 0.5)).getpixel((0, 0)) == (128, 128, 128)


def test_shared_counter_pickles_outside_workers():
    c = SharedCounter(3)
    c.increment(2)
    clone = pickle.loads(pickle.dumps(c))
    assert clone.value == 5 and copy.deepcopy(c).value == 5
    clone.increment()
    assert c.value == 5  # a plain pickle is an independent counter


def test_bad_files_counted_across_dataloader_workers(image_folder):
    src = ImageFolderSource(image_folder)
    loader = torch.utils.data.DataLoader(
        src, batch_size=None, num_workers=2, collate_fn=lambda x: x is None
    )
    assert sum(loader) == 3
    assert src.num_bad == 3  # counted in the workers, visible here


def test_synthetic_source_shapes_and_determinism():
    src = SyntheticSource(length=5, input_size=16, second_input_size=8, num_classes=4, seed=1)
    a, b = src[2], src[2]
    assert a["images"].shape == (3, 16, 16) and a["tokenizer_images"].shape == (3, 8, 8)
    assert torch.equal(a["images"], b["images"]) and 0 <= int(a["labels"]) < 4
    assert float(a["tokenizer_images"].min()) >= 0 and float(a["tokenizer_images"].max()) <= 1
    assert not torch.equal(src[1]["images"], a["images"]) and len(src) == 5
    with pytest.raises(IndexError):
        src[5]
    with pytest.raises(ValueError):
        SyntheticSource(length=0)


def test_webdataset_reads_pattern_skips_bad_and_labels(shards, caplog):
    pattern = str(shards[0].parent / "train-{000000..000001}.tar")
    src = WebDatasetSource(pattern, shuffle=0, with_labels=True)
    with caplog.at_level(logging.WARNING, logger="bitrain.data"):
        items = list(src)
    assert len(items) == 12 and items[5] is None and src.num_bad == 1
    good = [x for x in items if x is not None]
    assert all(img.mode == "RGB" and img.size == (24, 24) for img, _ in good)
    assert [label for _, label in good] == [i % 3 for i in range(12) if i != 5]
    assert any("s05" in r.getMessage() for r in caplog.records)


def test_webdataset_shuffle_and_worker_split(shards):
    src = WebDatasetSource([str(p) for p in shards], shuffle=4, seed=0)
    loader = torch.utils.data.DataLoader(
        src, batch_size=None, num_workers=2, collate_fn=lambda x: x
    )
    torch.manual_seed(0)
    items = [np.asarray(x).tobytes() for x in loader if x is not None]
    assert len(items) == 11 and len(set(items)) == 11  # each sample exactly once across workers


def test_webdataset_missing_shards(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shard file\(s\) not found"):
        WebDatasetSource(str(tmp_path / "shards" / "train-{000000..000002}.tar"))


def test_webdataset_missing_label_is_bad(tmp_path, write_shard):
    img = io.BytesIO()
    Image.new("RGB", (8, 8)).save(img, format="PNG")
    path = write_shard(tmp_path / "x.tar", [("a", {"png": img.getvalue()})])
    src = WebDatasetSource(str(path), shuffle=0, with_labels=True)
    assert list(src) == [None] and src.num_bad == 1


def _jpeg(img: Image.Image, **kwargs) -> bytes:
    data = io.BytesIO()
    img.save(data, format="JPEG", quality=95, **kwargs)
    return data.getvalue()


def test_encoded_image_decodes_at_a_reduced_dct_scale_with_the_same_rules():
    from bitrain.data.decode import EncodedImage

    x = np.linspace(0, 255, 200)[None, :].repeat(120, 0)
    img = Image.fromarray(np.stack([x, x[:, ::-1], np.full_like(x, 60)], -1).astype(np.uint8))
    encoded = EncodedImage(_jpeg(img), "grad.jpg")
    assert encoded.size == (200, 120) and encoded.format == "JPEG"
    full, factor = encoded.decode(1)
    assert factor == 1 and full.size == (200, 120)
    for reduce, size in ((2, (100, 60)), (4, (50, 30)), (8, (25, 15))):
        small, factor = EncodedImage(_jpeg(img), "grad.jpg").decode(reduce)
        assert factor == reduce and small.size == size and small.mode == "RGB"
        # The same picture: a box average of the full decode, to JPEG precision.
        expected = np.asarray(full.resize(size, Image.BOX), dtype=float)
        assert np.abs(np.asarray(small, dtype=float) - expected).mean() < 3
    # Not a JPEG: decoded whole, factor 1.
    png = io.BytesIO()
    img.save(png, format="PNG")
    assert EncodedImage(png.getvalue()).decode(4)[1] == 1
    with pytest.raises(ValueError, match="DCT scale"):
        encoded.decode(3)
    # Decoding again (another scale) starts from the bytes, not from the decoded pixels.
    again, factor = encoded.decode(2)
    assert factor == 2 and again.size == (100, 60)
    assert encoded.decode(1)[0].size == (200, 120)


def test_encoded_image_size_is_oriented_and_bad_data_is_a_bad_sample(monkeypatch):
    from bitrain.data.decode import EncodedImage

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = EncodedImage(_jpeg(Image.new("RGB", (160, 80), (255, 0, 0)), exif=exif.tobytes()))
    assert rotated.size == (80, 160)
    image, factor = rotated.decode(2)
    assert (factor, image.size) == (2, (40, 80))  # EXIF applied after the reduced decode
    with pytest.raises(BadImageError, match="empty"):
        EncodedImage(b"", "empty.jpg")
    with pytest.raises(BadImageError, match="text.jpg"):
        EncodedImage(b"not an image", "text.jpg")
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    whole = _jpeg(Image.fromarray(noise))
    truncated = EncodedImage(whole[: len(whole) * 2 // 3], "cut.jpg")  # the header reads fine
    with pytest.raises(BadImageError, match="cut.jpg"):
        truncated.decode(1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImageError, match="decompression bomb"):
        EncodedImage(whole, "bomb.jpg")
