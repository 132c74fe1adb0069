"""Convert BEiT pretraining weights or fine-tuned classifiers between checkpoint formats.

The command line of :func:`bitrain.checkpoints.convert` (docs/checkpoints.md has the formats):
``bitrain`` (a ``.ckpt``), ``official`` (a unilm ``.pth``; classifiers: BEiT only), ``hf`` (a
Hugging Face folder), ``timm`` (classifiers: a timm hub folder; as a source also a bare state dict
with ``--model-name`` / ``--model-kwargs``). The source's format and kind are detected; label names
and the evaluation preprocessing travel with a classifier. The result is verified beside
``--dst`` (reloaded and compared with the source) before it is moved there; an existing ``--dst``
or one that is the source is refused unless ``--force``. Example::

    python scripts/convert_checkpoint.py --src beit_base_patch16_224_pt22k.pth \
        --dst out/beit-base-mim --dst-format hf
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from bitrain.checkpoints import ALL_FORMATS, CheckpointError, ConversionError, convert

log = logging.getLogger("convert_checkpoint")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="source file or model folder")
    parser.add_argument(
        "--src-format", choices=ALL_FORMATS, default=None, help="source format (default: detect)"
    )
    parser.add_argument("--dst", required=True, help="destination file (or folder: hf, timm)")
    parser.add_argument(
        "--dst-format", choices=ALL_FORMATS, required=True, help="destination format"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip reloading the destination to compare"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --dst (also the source itself), once the conversion is verified",
    )
    parser.add_argument(
        "--use-ema", action="store_true", help="classifiers: convert the EMA weights"
    )
    parser.add_argument(
        "--model-name",
        default=None,
        help="classifiers: timm architecture of a bare state dict (e.g. beit_base_patch16_224)",
    )
    parser.add_argument(
        "--model-kwargs",
        default=None,
        help="classifiers: JSON of further create_classifier arguments, e.g. '{\"img_size\": 384}'",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the exit code: 0 done, 1 failed its check, 2 refused."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        extra = json.loads(args.model_kwargs) if args.model_kwargs else None
    except json.JSONDecodeError as err:
        log.error("--model-kwargs is not valid JSON: %s", err)
        return 2
    if extra is not None and not isinstance(extra, dict):
        log.error("--model-kwargs must be a JSON object, got %s", args.model_kwargs)
        return 2
    try:
        done = convert(
            args.src,
            args.dst,
            args.dst_format,
            src_format=args.src_format,
            force=args.force,
            verify=not args.no_verify,
            use_ema=args.use_ema,
            model_name=args.model_name,
            model_kwargs=extra,
        )
    except ConversionError as err:
        log.error("%s; %s was left as it was", err, args.dst)
        return 1
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as err:
        log.error("%s", err)
        return 2
    log.info(
        "%s (%s %s) -> %s (%s)", done.src, done.src_format, done.kind, done.dst, done.dst_format
    )
    log.info("%s%s", "" if args.no_verify else "verified: ", done.check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
