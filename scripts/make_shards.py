"""Write WebDataset tar shards from an image folder with one sub-folder per class.

    python scripts/make_shards.py SRC_DIR OUT_DIR --shard-size 1000 [--prefix train] [--seed 0]

Each sample is ``<key>.<ext>`` (the original encoded bytes, not re-encoded) + ``<key>.cls`` (the
class index as text); classes are the sorted sub-folder names (ImageNet: the wnids), written one
per line, in index order, to ``OUT_DIR/classes.txt`` (what ``WebDatasetSource`` reads as
``label_names``). Files are shuffled with ``--seed`` before sharding, so every shard mixes classes.
Files that cannot be decoded are skipped and counted. Shards are written to a temporary name and
renamed when complete. Prints a summary and the brace pattern for ``data.source.urls``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="image folder: SRC/<class>/<image>")
    parser.add_argument("out", type=Path, help="output folder for the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (-1: keep sorted order)")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be >= 1")

    import webdataset as wds

    from bitrain.data.decode import BadImageError, decode_image
    from bitrain.data.sources import ImageFolderSource

    source = ImageFolderSource(args.src, with_labels=True)  # scans, sorts, assigns classes
    items = list(zip(source.files, source.targets))
    if args.seed >= 0:
        random.Random(args.seed).shuffle(items)
    args.out.mkdir(parents=True, exist_ok=True)
    written, bad, shard, in_shard = 0, 0, 0, 0
    sink = None
    tmp = final = None
    digits = max(6, len(str(len(items) // args.shard_size)))
    for rel, label in items:
        path = Path(source.root) / rel
        data = path.read_bytes()
        try:
            decode_image(data, name=str(path))
        except BadImageError as err:
            bad += 1
            print(f"skipping {path}: {err}", file=sys.stderr)
            continue
        if sink is None:
            final = args.out / f"{args.prefix}-{shard:0{digits}d}.tar"
            tmp = final.with_suffix(".tar.tmp")
            sink = wds.TarWriter(str(tmp))
        key = f"{written:09d}"
        ext = path.suffix.lower().lstrip(".") or "jpg"
        sink.write({"__key__": key, ext: data, "cls": str(label).encode()})
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
    (args.out / "classes.txt").write_text("\n".join(source.classes) + "\n")
    if shard == 0:
        print(f"no readable image under {args.src}", file=sys.stderr)
        return 1
    pattern = args.out / f"{args.prefix}-{{{0:0{digits}d}..{shard - 1:0{digits}d}}}.tar"
    print(
        f"{written} samples of {len(source.classes)} classes in {shard} shards "
        f"({bad} unreadable files skipped); classes in {args.out / 'classes.txt'}"
    )
    print(f"data.source.urls='{pattern}'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
