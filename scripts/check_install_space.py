"""Pre-install check run by `make install`: is there room for the virtual environment?

PyPI's torch for x86_64 Linux is the CUDA build: the installed `.venv` takes about 6.2 GB
(measured on the 2-core development box, torch 2.14.1 + torchvision 0.29.1, 2026-11-30).
pip fails halfway with "[Errno 28] No space left on device" when the disk is short; this check
says so before pip starts, and how much is needed. Standard library only (it runs before the venv).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

GIB = 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=".", help="where the venv goes (default: .)")
    parser.add_argument("--need-gib", type=float, default=6.5, help="refuse below this (GiB)")
    args = parser.parse_args(argv)
    path = Path(args.path).resolve()
    while not path.exists():  # the venv folder may not exist yet: measure its parent's disk
        path = path.parent
    free = shutil.disk_usage(path).free / GIB
    if free < args.need_gib:
        print(
            f"bitrain: only {free:.1f} GiB free on the disk holding {path}; installing needs about "
            f"{args.need_gib:.0f} GiB (torch's CUDA wheels and their libraries). Free some space "
            "(old virtual environments, pytest's temporary folders under /tmp/pytest-of-$USER), "
            "or point VENV= at a larger disk: make VENV=/big/disk/venv demo",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
