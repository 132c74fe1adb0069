"""The embedded demo, end to end on a CPU: ``python -m bitrain.demo`` (what ``make demo`` runs).

The command's entry point; the code is :mod:`bitrain.tools.demo`.
"""

from __future__ import annotations

from bitrain.tools.demo import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
