"""Evaluate a classifier: ``python -m bitrain.evaluate ckpt_path=PATH [data=...]``.

With no arguments: the newest demo fine-tuning checkpoint on the demo's 500 test digits. Runs the
fine-tuning task's own validation (``Trainer.validate``, :mod:`bitrain.evaluation.validation`) and
writes ``metrics.json`` (top-1, top-5, loss, images/s) and ``per_class.csv``; see
docs/evaluation.md.
``task=linear_probe``: the BEiT linear probe of a frozen encoder
(:mod:`bitrain.evaluation.linear_probe`).
"""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig

from bitrain.evaluation.linear_probe import linear_probe
from bitrain.evaluation.validation import evaluate
from bitrain.io import CheckpointError
from bitrain.training.resolvers import hydra_main


@hydra_main("evaluate")
def main(cfg: DictConfig) -> dict:
    """Compose -> evaluate (``task=classify``) or linear probe (``task=linear_probe``)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    try:
        if cfg.task.name == "linear_probe":
            return linear_probe(cfg)
        return evaluate(cfg)
    except (CheckpointError, FileNotFoundError) as err:
        raise SystemExit(f"evaluate: {err}") from None  # one line, no traceback


if __name__ == "__main__":
    main()
