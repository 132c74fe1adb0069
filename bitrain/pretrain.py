"""Pretrain a BEiT encoder by MIM: ``python -m bitrain.pretrain [+experiment=NAME]``.

With no arguments it runs the embedded CPU demo (tiny BEiT on real digits, demo dVAE tokenizer).
Everything is composed from ``configs/pretrain.yaml``; see docs/pretraining.md.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from bitrain import runner


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain")
def main(cfg: DictConfig) -> dict:
    """Compose → build → fit."""
    return runner.train_cli(cfg, "pretrain")


if __name__ == "__main__":
    main()
