"""Fine-tune a classifier: ``python -m bitrain.finetune [+experiment=NAME] [model.pretrained=P]``.

With no arguments it fine-tunes the embedded demo's tiny BEiT on 130 labelled digits, starting from
the newest demo pretraining checkpoint (``model.pretrained=null``: from scratch). Everything is
composed from ``configs/finetune.yaml``; see docs/finetuning.md.
"""

from __future__ import annotations

from omegaconf import DictConfig

from bitrain.training import runner
from bitrain.training.resolvers import hydra_main


@hydra_main("finetune")
def main(cfg: DictConfig) -> dict:
    """Compose -> build -> fit."""
    return runner.train_cli(cfg, "finetune")


if __name__ == "__main__":
    main()
