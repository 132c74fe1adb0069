"""Train a dVAE visual tokenizer: ``python -m bitrain.train_tokenizer [tokenizer=dvae ...]``.

With no arguments it trains the embedded demo's tokenizer (32 px digits, 4x4 grid, 512 codes) and
writes ``tokenizers/demo_dvae.pt``. Everything is composed from ``configs/train_tokenizer.yaml``;
see docs/tokenizers.md, "Training your own dVAE".
"""

from __future__ import annotations

from omegaconf import DictConfig

from bitrain.training import runner
from bitrain.training.resolvers import hydra_main


@hydra_main("train_tokenizer")
def main(cfg: DictConfig) -> dict:
    """Compose → build → fit; the task writes the tokenizer file at the end."""
    return runner.train_cli(cfg, "train_tokenizer")


if __name__ == "__main__":
    main()
