"""Convert BEiT masked-image-modeling weights between bitrain, official unilm and Hugging Face.

Formats (see docs/checkpoints.md):

* ``bitrain``  -- a Lightning-layout ``.ckpt``: ``{"state_dict": {"model.<key>": ...},
  "hyper_parameters": {"model": {"_target_": "bitrain.models.beit.BeitMIM", ...}}}``. As a source,
  any ``.ckpt`` written by ``bitrain.pretrain`` works too.
* ``official`` -- a ``.pth`` as ``unilm/beit/run_beit_pretraining.py`` saves it (``{"model": ...,
  "args": Namespace}``).
* ``hf``       -- a ``BeitForMaskedImageModeling`` folder (``config.json`` + ``model.safetensors``).

Example::

    python scripts/convert_checkpoint.py --src beit_base_patch16_224_pt22k.pth
        --dst out/beit-base-mim --dst-format hf      (one line)

Every input is read weights-only; the converted model is reloaded from the destination and its
tensors compared with the source's before the script reports success.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from bitrain.models.checkpoints import (
    FORMATS,
    build_mim_model,
    load_mim_model,
    load_mim_state,
    save_mim_model,
)

log = logging.getLogger("convert_checkpoint")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="source file or Hugging Face folder")
    parser.add_argument(
        "--src-format", choices=FORMATS, default=None, help="source format (default: detect)"
    )
    parser.add_argument("--dst", required=True, help="destination file (or folder for hf)")
    parser.add_argument("--dst-format", choices=FORMATS, required=True, help="destination format")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip reloading the destination to compare"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the process exit code (0 on success)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    state, kwargs, found = load_mim_state(args.src)
    if args.src_format is not None and found != args.src_format:
        log.error("--src %s is a %s checkpoint, not %s", args.src, found, args.src_format)
        return 2
    model = build_mim_model(state, kwargs, where=f"{found} checkpoint '{args.src}'")
    out = save_mim_model(model, args.dst, args.dst_format)
    log.info("%s (%s) -> %s (%s)", args.src, found, out, args.dst_format)
    if not args.no_verify:
        back = load_mim_model(out).state_dict()
        for key, value in model.state_dict().items():
            if not torch.equal(back[key], value):
                log.error("verification failed: %s differs after the round trip", key)
                return 1
        log.info("verified: %d tensors identical after reloading %s", len(back), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
