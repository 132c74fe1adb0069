"""Write WebDataset tar shards from an image folder (one sub-folder per class, or flat).

    python scripts/make_shards.py SRC_DIR OUT_DIR --shard-size 1000 [--prefix train] [--seed 0]
        [--max-side N | --short-side N] [--quality 90] [--no-labels] [--overwrite]

Each sample is ``<key>.<ext>`` + ``<key>.cls`` (the class index as text); classes are the sorted
sub-folder names (ImageNet: the wnids), written one per line, in index order, to
``OUT_DIR/classes.txt`` (what ``WebDatasetSource`` reads as ``label_names``). ``--no-labels`` takes
every image under SRC (sub-folders or not) and writes no ``.cls`` and no ``classes.txt``.

Images are stored as their original bytes, unless ``--max-side N`` (longest side) or
``--short-side N`` (shortest side) is given: an image larger than that is then decoded (EXIF
orientation applied, RGB), resized with PIL's Lanczos to that side, and re-encoded as JPEG at
``--quality``, so that every epoch decodes fewer pixels (docs/data.md, "Pre-resized shards");
images already within the bound keep their bytes.

Files are shuffled with ``--seed`` before sharding, so every shard mixes classes. Files that cannot
be decoded are skipped and counted. Shards are written to a temporary name and renamed when
complete, as plain ustar tar files (files dated to the whole second of the run, so no PAX header
per file for readers to parse). An OUT_DIR that already holds shards with the same prefix is
refused, so an old set never mixes with a new one; ``--overwrite`` removes the old set first.
Prints a summary and the brace pattern for ``data.source.urls``.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="image folder: SRC/<class>/<image> (or flat)")
    parser.add_argument("out", type=Path, help="output folder for the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (-1: keep sorted order)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--max-side", type=int, help="re-encode images whose longest side exceeds N")
    size.add_argument("--short-side", type=int, help="re-encode images whose shortest side > N")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    parser.add_argument("--no-labels", action="store_true", help="no .cls, no classes.txt")
    parser.add_argument(
        "--overwrite", action="store_true", help="remove shards of the same prefix in OUT first"
    )
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be >= 1")
    for name in ("max_side", "short_side"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1 pixel")
    if not 1 <= args.quality <= 100:
        parser.error("--quality must be in [1, 100]")
    if not args.prefix or any(c in args.prefix for c in "*?[]/\\"):
        parser.error(f"--prefix {args.prefix!r}: a plain file name prefix, no path or wildcard")
    return args


def _source(args: argparse.Namespace):
    """The image folder, with errors that name this script's arguments and options."""
    from bitrain.data.sources import IMAGE_EXTENSIONS, ImageFolderSource

    src = args.src.expanduser()
    if not src.is_dir():
        what = "is a file, not a folder" if src.exists() else "does not exist"
        raise SystemExit(
            f"make_shards: SRC '{src}' {what}: give the image folder (SRC/<class>/<image>, or "
            "any folder of images with --no-labels) as the first argument"
        )
    loose = [p for p in sorted(src.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    try:
        return ImageFolderSource(src, with_labels=not args.no_labels)
    except ValueError as err:
        if loose and not args.no_labels:
            raise SystemExit(
                f"make_shards: images lie directly in SRC '{src}' (e.g. '{loose[0].name}'), but"
                " the class of an image is its sub-folder: move them into one folder per class, or "
                "pass --no-labels to write shards without labels (pretraining needs none)"
            ) from None
        raise SystemExit(f"make_shards: {err}: point SRC at a folder of images") from None


def _existing(out: Path, prefix: str) -> list[Path]:
    return sorted(out.glob(f"{prefix}-*.tar")) + sorted(out.glob(f"{prefix}-*.tar.tmp"))


def _resized(data: bytes, name: str, args: argparse.Namespace) -> tuple[bytes, str | None]:
    """``(bytes, extension)``: re-encoded JPEG when the image exceeds the bound, else (data, None).

    Raises:
        BadImageError: the image cannot be decoded.
    """
    from PIL import Image

    from bitrain.data.decode import EncodedImage, decode_image

    if args.max_side is None and args.short_side is None:
        decode_image(data, name=name)  # check it decodes; keep the bytes
        return data, None
    w, h = EncodedImage(data, name).size
    side, bound = (max(w, h), args.max_side) if args.max_side else (min(w, h), args.short_side)
    if side <= bound:
        decode_image(data, name=name)
        return data, None
    image = decode_image(data, name=name)
    size = (max(1, round(w * bound / side)), max(1, round(h * bound / side)))
    out = io.BytesIO()
    image.resize(size, Image.Resampling.LANCZOS).save(out, format="JPEG", quality=args.quality)
    return out.getvalue(), "jpg"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)

    import webdataset as wds

    from bitrain.data.decode import BadImageError

    source = _source(args)  # scans, sorts, assigns classes
    labels = source.targets if not args.no_labels else [None] * len(source.files)
    items = list(zip(source.files, labels))
    if args.seed >= 0:
        random.Random(args.seed).shuffle(items)
    args.out.mkdir(parents=True, exist_ok=True)
    old = _existing(args.out, args.prefix)
    if old and not args.overwrite:
        raise SystemExit(
            f"make_shards: {args.out} already holds {len(old)} shard file(s) named "
            f"{args.prefix}-*.tar (e.g. {old[0].name}); a new set would mix with them. Pass "
            "--overwrite to remove them first, or choose another OUT or --prefix"
        )
    for path in old:
        path.unlink()
    if old:
        print(f"removed {len(old)} old shard file(s) {args.prefix}-*.tar from {args.out}")
    written, bad, resized, shard, in_shard = 0, 0, 0, 0, 0
    sink = None
    tmp = final = None
    digits = max(6, len(str(len(items) // args.shard_size)))
    # Whole seconds: webdataset's default, a fractional time.time(), makes Python's tarfile add
    # a PAX header to every file, which every reader then parses (23 of 55 us a sample here).
    mtime = int(time.time())
    for rel, label in items:
        path = Path(source.root) / rel
        data = path.read_bytes()
        try:
            data, new_ext = _resized(data, str(path), args)
        except BadImageError as err:
            bad += 1
            print(f"skipping {path}: {err}", file=sys.stderr)
            continue
        resized += new_ext is not None
        if sink is None:
            final = args.out / f"{args.prefix}-{shard:0{digits}d}.tar"
            tmp = final.with_suffix(".tar.tmp")
            sink = wds.TarWriter(str(tmp), mtime=mtime)
        key = f"{written:09d}"
        ext = new_ext or path.suffix.lower().lstrip(".") or "jpg"
        sample = {"__key__": key, ext: data}
        if label is not None:
            sample["cls"] = str(label).encode()
        sink.write(sample)
        written += 1
        in_shard += 1
        if in_shard == args.shard_size:
            sink.close()
            os.replace(tmp, final)
            sink, shard, in_shard = None, shard + 1, 0
    if sink is not None:
        sink.close()
        os.replace(tmp, final)
        shard += 1
    if not args.no_labels:
        (args.out / "classes.txt").write_text("\n".join(source.classes) + "\n")
    if shard == 0:
        print(f"no readable image under {args.src}", file=sys.stderr)
        return 1
    pattern = args.out / f"{args.prefix}-{{{0:0{digits}d}..{shard - 1:0{digits}d}}}.tar"
    classes = "no labels" if args.no_labels else f"{len(source.classes)} classes"
    bound = (
        f"; {resized} re-encoded to --max-side {args.max_side}"
        if args.max_side
        else f"; {resized} re-encoded to --short-side {args.short_side}"
        if args.short_side
        else ""
    )
    where = "" if args.no_labels else f"; classes in {args.out / 'classes.txt'}"
    print(
        f"{written} samples of {classes} in {shard} shards "
        f"({bad} unreadable files skipped){bound}{where}"
    )
    print(f"data.source.urls='{pattern}'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
