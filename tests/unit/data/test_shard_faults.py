"""A webdataset shard cut off in the middle of a file loses that file only, then the next shard."""

import io

from PIL import Image

from bitrain.data.shards import WebDatasetSource


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (value, 255 - value, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def test_truncated_tar_loses_only_the_cut_file(tmp_path, write_shard):
    samples = [(f"s{i}", {"jpg": _jpeg(40 * i), "cls": str(i).encode()}) for i in range(5)]
    cut = write_shard(tmp_path / "a-000000.tar", samples)
    write_shard(tmp_path / "a-000001.tar", [("t0", {"jpg": _jpeg(7), "cls": b"9"})])
    data = cut.read_bytes()
    # Cut in the middle of the 4th sample's image: 3 whole samples stay readable.
    marker = data.index(b"s3.jpg")
    cut.write_bytes(data[: marker + 512 + 200])
    source = WebDatasetSource(str(tmp_path / "a-{000000..000001}.tar"), shuffle=0, with_labels=True)
    items = [x for x in source if x is not None]
    labels = [label for _, label in items]
    assert labels[:3] == [0, 1, 2]  # before the cut: every sample
    assert 9 in labels  # the next shard is read
    assert 3 not in labels and 4 not in labels  # the cut file, and what followed it in the tar
    assert source.num_bad >= 1  # the cut is counted (and warned)
    assert all(img.size == (40, 30) for img, _ in items)


def test_samples_per_epoch_gives_every_worker_the_same_count(tmp_path, write_shard):
    write_shard(
        tmp_path / "b-000000.tar", [(f"a{i}", {"jpg": _jpeg(i), "cls": b"1"}) for i in range(2)]
    )
    write_shard(
        tmp_path / "b-000001.tar", [(f"b{i}", {"jpg": _jpeg(i), "cls": b"2"}) for i in range(7)]
    )
    pattern = str(tmp_path / "b-{000000..000001}.tar")
    # One pass: 9 samples. Fixed epochs: exactly the quota, cycling over the shards if needed.
    assert sum(1 for x in WebDatasetSource(pattern, shuffle=0) if x is not None) == 9
    for n in (5, 20):
        source = WebDatasetSource(pattern, shuffle=4, samples_per_epoch=n)
        assert sum(1 for x in source if x is not None) == n
    # Two DataLoader workers, one shard each of unequal size: both yield samples_per_epoch // 2.
    from torch.utils.data import DataLoader

    source = WebDatasetSource(pattern, shuffle=0, samples_per_epoch=12, with_labels=True)
    loader = DataLoader(source, batch_size=None, num_workers=2, collate_fn=lambda x: x)
    labels = [label for _, label in loader]
    assert labels.count(1) == 6 and labels.count(2) == 6
