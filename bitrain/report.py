"""Run reports: ``python -m bitrain.report RUN_DIR [RUN_DIR ...] [--out DIR]``.

The command's entry point; the code is :mod:`bitrain.tools.report`.
"""

from __future__ import annotations

import sys

from bitrain.tools.report import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
