"""Benchmark BEiT pretraining data loading: decode + two views + blockwise mask, images per second.

For each source and worker count it iterates bitrain's ``PretrainDataModule`` train loader
(BEiT-base settings: 224 px bicubic patch view, 112 px Lanczos token view, crop scale (0.08, 1),
flip, colour jitter 0.4, 75 of 14x14 patches masked) and reports images/s in total and per
worker process (per core when each worker has a core). bitrain's loader hands uint8 views (its
default: the MIM task normalises them on the device, outside this benchmark's timing, as the
official code normalises inside it); ``--float-views`` adds, as ``*_f32``, the same pipelines
with ``TwoViewTransform(output_dtype="float32")`` (the float32 hand-over of before):

* ``folder``: :class:`bitrain.data.sources.ImageFolderSource` over JPEG files;
* ``shards``: :class:`bitrain.data.shards.WebDatasetSource` over tar shards of the same JPEGs;
* ``reference``: in the same run, on the same files, the official BEiT pipeline rebuilt from
  torchvision (``unilm/beit/datasets.py`` ``DataAugmentationForBEiT``: colour jitter on the whole
  image, flip, one crop resized twice, ``ToTensor`` + ``Normalize`` / ``map_pixels``; PIL
  ``Image.open().convert("RGB")`` as torchvision's ``ImageFolder`` loader does), masks from the
  same generator. ``ratio`` = bitrain folder / reference at each worker count.

* ``resized``: with ``--max-side N``, bitrain on shards re-encoded by ``scripts/make_shards.py
  --max-side N`` (pre-resized shards, docs/data.md).

Without ``--root`` it writes ``--num-images`` JPEGs (quality 90, ``--image-size``, default
500x375 as a typical ImageNet photo) cut from the real photographs that ship with scikit-image,
into a temporary folder. The first batch of every loader (worker start-up) is not timed. The
pipelines are measured in turn, ``--repeats`` rounds (interleaved, so a busy machine slows all of
them alike); the table gives every round, the JSON the median per pipeline and the median of the
per-round ratios to the reference. With 0 workers the main process runs torch on one thread, as a
DataLoader worker does. ``--profile`` adds a cProfile of one pass of each pipeline in the main
process (the functions with the most own time). Prints a table, then as the last line one JSON
object (``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import json
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import machine_info  # noqa: E402

# Colour photographs inside the scikit-image wheel (no download).
PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
)


def make_images(out_dir: Path, num_images: int, size: tuple[int, int], seed: int = 0) -> Path:
    """Write ``num_images`` JPEGs (random crops of scikit-image's photos) in 10 class folders."""
    import skimage.data
    from PIL import Image

    rng = random.Random(seed)
    data_dir = Path(skimage.data.__file__).parent
    photos = [Image.open(data_dir / name).convert("RGB") for name in PHOTOS]
    w, h = size
    for i in range(num_images):
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.4, 1.0)
        cw, ch = int(photo.width * scale), int(photo.height * scale)
        x, y = rng.randint(0, photo.width - cw), rng.randint(0, photo.height - ch)
        img = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        folder = out_dir / f"class_{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"img_{i:05d}.jpg", quality=90)
    return out_dir


def make_shards(root: Path, out_dir: Path, per_shard: int) -> str:
    """Tar shards (webdataset layout: ``<key>.jpg`` + ``<key>.cls``) of the JPEGs under ``root``.

    Written as ``scripts/make_shards.py`` writes them: plain ustar (whole-second file times, no
    PAX header per file).
    """
    import webdataset as wds

    out_dir.mkdir(parents=True, exist_ok=True)
    mtime = int(time.time())
    files = sorted(root.rglob("*.jpg"))
    classes = sorted({f.parent.name for f in files})
    n_shards = 0
    for start in range(0, len(files), per_shard):
        with wds.TarWriter(str(out_dir / f"shard-{n_shards:06d}.tar"), mtime=mtime) as sink:
            for f in files[start : start + per_shard]:
                sink.write(
                    {
                        "__key__": f.stem,
                        "jpg": f.read_bytes(),
                        "cls": str(classes.index(f.parent.name)).encode(),
                    }
                )
        n_shards += 1
    return str(out_dir / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


@functools.lru_cache(maxsize=8)
def _official_transforms(color_jitter: float, hflip: float) -> tuple[Any, Any]:
    """The official pipeline's ColorJitter and RandomHorizontalFlip, built once (as it does)."""
    from torchvision import transforms as T

    jitter = T.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None
    return jitter, T.RandomHorizontalFlip(hflip)


def official_views(
    img: Any,
    size: int = 224,
    second_size: int = 112,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    color_jitter: float = 0.4,
    hflip: float = 0.5,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official BEiT views of an RGB PIL image, in the official order (module docstring).

    ``ColorJitter`` on the whole image, ``RandomHorizontalFlip``, one ``RandomResizedCrop`` box
    resized bicubic to ``size`` and Lanczos to ``second_size``, ``ToTensor`` (+ ``Normalize`` for
    the patch view). Returns the normalized patch view and the token view in [0, 1] (before
    DALL-E's ``map_pixels``). Draws from torch's global RNG, as torchvision does.
    """
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    jitter, flip = _official_transforms(color_jitter, hflip)
    if jitter is not None:
        img = jitter(img)
    img = flip(img)
    top, left, h, w = T.RandomResizedCrop.get_params(img, list(scale), list(ratio))
    patch = F.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BICUBIC)
    token = F.resized_crop(img, top, left, h, w, [second_size] * 2, InterpolationMode.LANCZOS)
    return F.normalize(F.to_tensor(patch), list(mean), list(std)), F.to_tensor(token)


class ReferenceDataset(Dataset):
    """The official BEiT pretraining pipeline, rebuilt from torchvision (module docstring)."""

    def __init__(self, files: Sequence[Path], mask_generator: Any) -> None:
        self.files = list(files)
        self.mask_generator = mask_generator

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        with open(self.files[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        patch, token = official_views(img)
        return {
            "images": patch,
            "tokenizer_images": 0.8 * token + 0.1,  # DALL-E map_pixels, eps 0.1
            "mask": self.mask_generator(),
        }


def time_loader(loader: Any, max_batches: int) -> tuple[float, int]:
    """(images/s, images) over batches 2..max_batches+1 of ``loader`` (the first is start-up)."""
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(it):
        n += int(batch["images"].shape[0])
        if i + 1 >= max_batches:
            break
    seconds = time.perf_counter() - t0
    del it
    return (n / seconds if seconds > 0 else float("nan")), n


def bitrain_loader(
    source: Any, workers: int, batch_size: int, output_dtype: str = "uint8"
) -> DataLoader:
    from bitrain.data.datamodule import PretrainDataModule
    from bitrain.data.masking import BlockwiseMaskGenerator
    from bitrain.data.transforms import TwoViewTransform

    dm = PretrainDataModule(
        source,
        TwoViewTransform(224, 112, output_dtype=output_dtype),
        BlockwiseMaskGenerator((14, 14), 75),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=False,
        persistent_workers=False,
    )
    return dm.train_dataloader()


def reference_loader(files: Sequence[Path], workers: int, batch_size: int) -> DataLoader:
    from bitrain.data.masking import BlockwiseMaskGenerator

    ds = ReferenceDataset(files, BlockwiseMaskGenerator((14, 14), 75))
    return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)


def resized_shards(root: Path, out_dir: Path, per_shard: int, max_side: int) -> str:
    """Shards re-encoded by ``scripts/make_shards.py --max-side`` (its output kept quiet)."""
    import make_shards

    argv = [str(root), str(out_dir), "--shard-size", str(per_shard), "--max-side", str(max_side)]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        if make_shards.main([*argv, "--no-labels", "--seed", "-1"]) != 0:
            raise SystemExit(f"bench_data: make_shards failed on {root}")
    return printed.getvalue().strip().splitlines()[-1].split("=", 1)[1].strip("'")


def view_rounding(root: Path, n: int = 256) -> dict[str, float]:
    """How far bitrain's uint8 views are from its float32 views (same seeds), on ``n`` samples.

    Grey levels (0-255) for both views and normalised units for the patch view: the one rounding
    of the jittered views to 8 bits (docs/data.md, "uint8 views").
    """
    from bitrain.data.sources import ImageFolderSource
    from bitrain.data.transforms import TwoViewTransform

    src = ImageFolderSource(root)
    as_u8, as_f32 = TwoViewTransform(224, 112), TwoViewTransform(224, 112, output_dtype="float32")
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (as_u8.mean, as_u8.std))
    diffs: dict[str, list[torch.Tensor]] = {"patch": [], "token": [], "patch_normalised": []}
    for i in range(n):
        img = src[i % len(src)]
        torch.manual_seed(i)
        patch, token = as_u8(img)
        torch.manual_seed(i)
        f_patch, f_token = as_f32(img)
        diffs["patch"].append((patch.float() - (f_patch * std + mean) * 255).abs().flatten())
        diffs["token"].append((token.float() - f_token * 255).abs().flatten())
        diffs["patch_normalised"].append(((patch.float() / 255 - mean) / std - f_patch).abs())
    out = {}
    for name, parts in diffs.items():
        d = torch.cat([p.flatten() for p in parts])
        out[f"{name}_mean"], out[f"{name}_max"] = float(d.mean()), float(d.max())
    return out


def profile(make: Any, batches: int, top: int = 12) -> str:
    """Profile (cProfile) ``batches`` batches of a 0-worker loader: top functions by own time."""
    it = iter(make())
    next(it)
    prof = cProfile.Profile()
    images = 0
    prof.enable()
    for i, batch in enumerate(it):
        images += int(batch["images"].shape[0])
        if i + 1 >= batches:
            break
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    total = stats.total_tt  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("ncalls"))
    head = f"{images} images in {total:.3f} s profiled = {1e3 * total / max(1, images):.2f} ms each"
    return "\n".join([head, *lines[start : start + top + 1]])


def _quartiles(values: Sequence[float]) -> list[float]:
    """[first, third] quartile of ``values`` (both the value itself for a single round)."""
    if len(values) < 2:
        return [float(values[0]), float(values[0])] if values else []
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, help="image folder (default: generated JPEGs)")
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--image-size", default="500x375", help="WxH of generated images")
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds of every pipeline")
    p.add_argument("--shard-size", type=int, default=128, help="images per generated shard")
    p.add_argument("--no-shards", action="store_true", help="skip the webdataset measurement")
    p.add_argument("--no-reference", action="store_true", help="skip the reference pipeline")
    p.add_argument("--max-side", type=int, help="also measure shards pre-resized to this side")
    p.add_argument("--profile", action="store_true", help="cProfile each pipeline (0 workers)")
    p.add_argument(
        "--rounding",
        action="store_true",
        help="measure the uint8 views' difference from float32 views (256 samples) and stop",
    )
    p.add_argument(
        "--float-views",
        action="store_true",
        help="also measure bitrain's folder (and resized) pipelines handing float32 views",
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batches < 1:
        p.error("--repeats and --batches must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process keeps its threads


def _main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from bitrain.data.shards import WebDatasetSource
    from bitrain.data.sources import ImageFolderSource

    torch.manual_seed(0)
    torch.set_num_threads(1)  # as in a DataLoader worker (0 workers: the main process loads)
    workers = [int(w) for w in str(args.workers).split(",") if w != ""]
    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
    root = args.root
    if root is None:
        w, h = (int(v) for v in args.image_size.lower().split("x"))
        root = make_images(Path(tmp.name) / "images", args.num_images, (w, h))
    files = [Path(root) / f for f in ImageFolderSource(root).files]
    needed = (args.batches + 1) * args.batch_size
    if len(files) < needed:
        raise SystemExit(
            f"bench_data: {len(files)} images under {root}, need at least {needed} "
            "(--batches + 1) x --batch-size"
        )
    if args.rounding:
        rounding = view_rounding(Path(root))
        print(f"# uint8 views - float32 views, 256 samples of {root}:")
        print(json.dumps({"machine": machine_info(torch.device("cpu")), **rounding}))
        tmp.cleanup()
        return 0
    shards = (
        None if args.no_shards else make_shards(root, Path(tmp.name) / "shards", args.shard_size)
    )
    resized = None
    if args.max_side:
        resized = resized_shards(root, Path(tmp.name) / "resized", args.shard_size, args.max_side)

    def pipelines(n_workers: int) -> list[tuple[str, Any]]:
        runs = [
            ("folder", lambda: bitrain_loader(ImageFolderSource(root), n_workers, args.batch_size))
        ]
        if shards is not None:
            src = lambda: WebDatasetSource(shards, shuffle=0)  # noqa: E731
            runs.append(("shards", lambda: bitrain_loader(src(), n_workers, args.batch_size)))
        if resized is not None:
            res = lambda: WebDatasetSource(resized, shuffle=0)  # noqa: E731
            runs.append(("resized", lambda: bitrain_loader(res(), n_workers, args.batch_size)))
        if args.float_views:
            f32 = functools.partial(bitrain_loader, output_dtype="float32")
            runs.append(
                ("folder_f32", lambda: f32(ImageFolderSource(root), n_workers, args.batch_size))
            )
            if resized is not None:
                runs.append(("resized_f32", lambda: f32(res(), n_workers, args.batch_size)))
        if not args.no_reference:
            runs.append(("reference", lambda: reference_loader(files, n_workers, args.batch_size)))
        return runs

    info = machine_info(torch.device("cpu"))
    print(f"# bench_data: {info['cpu']}, {os.cpu_count()} CPUs, torch {info['torch']}")
    print(
        f"# {len(files)} images from {root}, batch {args.batch_size}, {args.batches} timed "
        f"batches, {args.repeats} interleaved round(s)"
        + (f", resized = shards re-encoded with --max-side {args.max_side}" if resized else "")
    )
    print(
        "# bitrain hands uint8 views (normalised on the device by the task, not timed here)"
        + ("; *_f32: float32 views as before" if args.float_views else "")
        + "; reference: float32 views, normalised in the worker, as the official code"
    )
    if args.profile:
        for name, make in pipelines(0):
            print(f"# profile of {name} (0 workers, {args.batches} batches), by own time:")
            print("\n".join(f"#   {line}" for line in profile(make, args.batches).splitlines()))
    print("| round | source | workers | images/s | images/s per worker |")
    print("|---|---|---|---|---|")
    rounds: dict[str, dict[str, list[float]]] = {}
    for n_workers in workers:
        for r in range(args.repeats):
            for name, make in pipelines(n_workers):
                rate, _ = time_loader(make(), args.batches)
                rounds.setdefault(name, {}).setdefault(str(n_workers), []).append(rate)
                per = rate / max(1, n_workers)
                print(f"| {r + 1} | {name} | {n_workers} | {rate:.1f} | {per:.1f} |")

    def median(name: str) -> dict[str, float]:
        return {w: statistics.median(v) for w, v in rounds.get(name, {}).items()}

    out: dict[str, Any] = {
        "machine": info,
        "images": len(files),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "max_side": args.max_side,
        "bitrain_views": "uint8",
        "folder_img_s": median("folder"),
        "shards_img_s": median("shards"),
        "resized_img_s": median("resized"),
        "reference_img_s": median("reference"),
        "rounds": rounds,
    }
    if "reference" in rounds:
        ref = rounds["reference"]
        for name in ("folder", "shards", "resized", "folder_f32", "resized_f32"):
            if name in rounds:
                key = "ratio" if name == "folder" else f"ratio_{name}"
                per_round = {w: [a / b for a, b in zip(rounds[name][w], ref[w])] for w in ref}
                out[key] = {w: statistics.median(v) for w, v in per_round.items()}
                out[f"{key}_iqr"] = {w: _quartiles(v) for w, v in per_round.items()}
    best = max(out["folder_img_s"].items(), key=lambda kv: kv[1] / max(1, int(kv[0])))
    out["folder_img_s_per_worker_best"] = best[1] / max(1, int(best[0]))
    print(json.dumps(out))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
