"""Predict: ``python -m bitrain.predict ckpt_path=PATH images=DIR_OR_FILE [top_k=5] [output=F]``.

Prints, for each image, the top-k labels with their probabilities; ``output=FILE`` also writes
them as JSON. See docs/evaluation.md.
"""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig

from bitrain.evaluation.prediction import check_output, format_results, predict, write_json
from bitrain.io import CheckpointError
from bitrain.training.resolvers import hydra_main


@hydra_main("predict")
def main(cfg: DictConfig) -> list:
    """Compose -> predict -> print (and write JSON)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        if cfg.get("output"):
            check_output(cfg.output)  # before any inference, not after it
        results = predict(
            cfg.ckpt_path, cfg.images, top_k=cfg.top_k, use_ema=cfg.use_ema, device=cfg.device
        )
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"predict: {err}") from None  # one line, no traceback
    print(format_results(results), flush=True)
    if cfg.get("output"):
        print(f"wrote {write_json(results, cfg.output)}", flush=True)
    if any("error" in r for r in results):
        print(f"{sum('error' in r for r in results)} image(s) could not be read", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
