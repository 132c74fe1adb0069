"""Pretrain a BEiT encoder by MIM: ``python -m bitrain.pretrain [+experiment=NAME]``.

With no arguments it runs the embedded CPU demo (tiny BEiT on real digits, demo dVAE tokenizer).
Everything is composed from ``configs/pretrain.yaml``; see docs/pretraining.md.
"""

from __future__ import annotations

from omegaconf import DictConfig

from bitrain.training import runner
from bitrain.training.resolvers import hydra_main


@hydra_main("pretrain")
def main(cfg: DictConfig) -> dict:
    """Compose → build → fit."""
    return runner.train_cli(cfg, "pretrain")


if __name__ == "__main__":
    main()
