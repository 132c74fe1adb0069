"""Benchmark the DALL-E tokenizer (BEiT §2.1.2): bitrain's variants against ``dall_e.Encoder``.

On one batch of random 112 px token views (full-size DALL-E encoder, random weights shared by all
variants) it times ``encode`` (preprocess + encoder forward + argmax, no grad) for:

* ``bitrain_fp32``: :class:`DallETokenizer` in float32 with its default channels_last layout;
* ``bitrain_fp32_contiguous``: the same encoder in the default (NCHW-contiguous) layout;
* ``bitrain_bf16``: ``precision="bfloat16"`` autocast, with the id agreement rate against float32;
* ``bitrain_compile`` (``--compile``): ``torch.compile`` of the float32 encoder (slow on CPU);
* ``reference_fp32``: ``dall_e.Encoder`` (PyPI ``dall-e``) in float32, ``map_pixels`` + argmax.

Variants alternate over rounds to spread machine drift. It then measures the tokenizer's share of
a training step directly: bitrain float32 encode time over (encode + ``BeitMIM`` forward, backward
and AdamW step) of the matching encoder size (base for the full tokenizer). Prints a table, then
as the last line one JSON object (see ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import SIZES, build_dall_e_reference, machine_info  # noqa: E402

# --size full = BEiT's tokenizer (paired with BEiT-base for the step share); tiny for tests.
TOKENIZER_SIZES = {"full": "base", "tiny": "tiny"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call, synchronized on CUDA."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def step_share(
    args: argparse.Namespace, tokenizer: Any, tok_images: torch.Tensor, size: dict[str, Any]
) -> dict[str, float]:
    """Median encode time, median full-step time and their ratio for the matching BeitMIM."""
    from bitrain.data.masking import BlockwiseMaskGenerator
    from bitrain.models.beit import BeitMIM
    from bitrain.tasks.optim import build as build_optim

    device = torch.device(args.device)
    arch = size["model"]
    model = BeitMIM(
        **arch,
        vocab_size=size["dall_e"]["vocab_size"],
        init_values=size["init_values"],
        drop_path_rate=size["drop_path_rate"],
    ).to(device)
    opt, _ = build_optim(model, 1000, lr=1.5e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    masker = BlockwiseMaskGenerator(
        arch["img_size"] // arch["patch_size"], num_masking_patches=size["num_masking_patches"]
    )
    b = tok_images.shape[0]
    masks = torch.stack([masker(gen) for _ in range(b)]).flatten(1).bool().to(device)
    images = torch.randn(b, 3, arch["img_size"], arch["img_size"], generator=gen).to(device)

    def encode() -> torch.Tensor:
        return tokenizer.encode(tokenizer.preprocess(tok_images)).flatten(1)

    def train_rest(ids: torch.Tensor) -> None:
        logits = model(images, masks)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[masks])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    enc_t, step_t = [], []
    for i in range(args.warmup + args.iters):
        _sync(device)
        t0 = time.perf_counter()
        ids = encode()
        _sync(device)
        t1 = time.perf_counter()
        train_rest(ids)
        _sync(device)
        t2 = time.perf_counter()
        if i >= args.warmup:
            enc_t.append(t1 - t0)
            step_t.append(t2 - t0)
    enc, step = statistics.median(enc_t), statistics.median(step_t)
    return {"encode_ms": enc * 1e3, "step_ms": step * 1e3, "share": enc / step}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant")
    parser.add_argument("--size", choices=sorted(TOKENIZER_SIZES), default="full")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--no-step-share", action="store_true", help="skip the step-share part")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--batch-size and --iters must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print a table and, as the last line, one JSON object."""
    from dall_e.utils import map_pixels

    from bitrain.tokenizers.dall_e import DallETokenizer

    args = parse_args(argv)
    device = torch.device(args.device)
    size = SIZES[TOKENIZER_SIZES[args.size]]
    px, dall_e_kwargs = size["token_size"], size["dall_e"]

    ref = build_dall_e_reference(args.seed, **dall_e_kwargs)
    with tempfile.TemporaryDirectory(prefix="bench_tokenizer_") as tmp:
        weights = Path(tmp) / "encoder.pt"
        torch.save(ref.state_dict(), weights)
        tok = DallETokenizer(weights, input_size=px, **dall_e_kwargs).to(device)
    ref = ref.to(device).eval().requires_grad_(False)
    bf16 = copy.copy(tok)
    bf16.precision = "bfloat16"  # same encoder module, bf16 autocast in `logits`
    contiguous = copy.deepcopy(tok.encoder).to(memory_format=torch.contiguous_format)

    gen = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.batch_size, 3, px, px, generator=gen).to(device)

    @torch.no_grad()
    def plain_fp32(encoder: torch.nn.Module) -> torch.Tensor:
        return encoder(tok.preprocess(images).contiguous()).argmax(1)

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "bitrain_fp32": lambda: tok.encode(tok.preprocess(images)),
        "bitrain_fp32_contiguous": lambda: plain_fp32(contiguous),
        "bitrain_bf16": lambda: bf16.encode(bf16.preprocess(images)),
        "reference_fp32": lambda: _ref_call(ref, map_pixels, images),
    }
    if args.compile:
        compiled = torch.compile(tok.encoder)
        variants["bitrain_compile"] = lambda: plain_fp32_cl(compiled, tok, images)

    ids = {name: fn() for name, fn in variants.items()}  # warm-up call + ids for agreement
    for _ in range(args.warmup - 1):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.iters):  # round-robin over variants
        for name, fn in variants.items():
            times[name].append(time_call(fn, device))

    base = ids["bitrain_fp32"]
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {
            "img_s": args.batch_size / med,
            "median_ms": med * 1e3,
            "agreement_vs_fp32": float((ids[name] == base).float().mean()),
        }
    share = None if args.no_step_share else step_share(args, tok, images, size)

    print(
        f"bench_tokenizer: size={args.size} ({px} px, vocab {dall_e_kwargs['vocab_size']}) "
        f"batch={args.batch_size} device={args.device} iters={args.iters}"
    )
    print(f"{'variant':<24} {'img/s':>9} {'median ms':>10} {'ids == fp32':>12}")
    for name, r in rows.items():
        print(
            f"{name:<24} {r['img_s']:>9.2f} {r['median_ms']:>10.1f} {r['agreement_vs_fp32']:>12.4f}"
        )
    if share is not None:
        print(
            f"step share ({TOKENIZER_SIZES[args.size]} BeitMIM, fp32): encode "
            f"{share['encode_ms']:.1f} ms of {share['step_ms']:.1f} ms "
            f"= {100 * share['share']:.1f}%"
        )
    result = {
        "bench": "tokenizer",
        "size": args.size,
        "batch_size": args.batch_size,
        "device": args.device,
        "iters": args.iters,
        **{f"{name}_img_s": r["img_s"] for name, r in rows.items()},
        "bf16_id_agreement": rows["bitrain_bf16"]["agreement_vs_fp32"],
        "reference_id_agreement": rows["reference_fp32"]["agreement_vs_fp32"],
        "ratio": rows["bitrain_fp32"]["img_s"] / rows["reference_fp32"]["img_s"],
        "step_share": share,
        **machine_info(device),
    }
    print(json.dumps(result))
    return 0


@torch.no_grad()
def _ref_call(ref: torch.nn.Module, map_pixels: Callable, images: torch.Tensor) -> torch.Tensor:
    """The reference tokenizer: ``dall_e.Encoder`` logits of ``map_pixels(x)``, argmax."""
    return ref(map_pixels(images)).argmax(1)


@torch.no_grad()
def plain_fp32_cl(encoder: Callable, tok: Any, images: torch.Tensor) -> torch.Tensor:
    """A (compiled) float32 encoder on channels_last input, argmax."""
    x = tok.preprocess(images).to(memory_format=torch.channels_last)
    return encoder(x).argmax(1)


if __name__ == "__main__":
    sys.exit(main())
