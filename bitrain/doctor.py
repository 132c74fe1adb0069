"""Environment doctor: ``python -m bitrain.doctor [hydra overrides, e.g. +experiment=beit_base]``.

The command's entry point; the code is :mod:`bitrain.tools.doctor`.
"""

from __future__ import annotations

import sys

from bitrain.tools.doctor import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
