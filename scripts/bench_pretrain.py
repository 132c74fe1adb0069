"""Benchmark one full BEiT pretraining step: bitrain against the Hugging Face + DALL-E reference.

One step = tokenizer encode (no grad) + encoder forward + backward + optimizer step, as in BEiT's
``engine_for_pretraining.py`` (paper §2.3). Both sides run in the same process on the same inputs
(same images, same token views, same masks from :class:`BlockwiseMaskGenerator`, exactly 75 of
196 patches for base/large, 26 of 64 for tiny) and with the same DALL-E encoder weights:

* **bitrain**: :class:`MaskedImageModeling.shared_step` (``DallETokenizer`` + ``BeitMIM``, logits at
  the masked positions only), optimizer and scheduler from :func:`bitrain.tasks.optim.build`;
  its batch holds uint8 views as its loader hands them, normalised inside the timed step;
* **reference**: ``transformers.BeitForMaskedImageModeling`` (logits at every position, loss on
  ``logits[bool_masked_pos]``) with ``dall_e.Encoder`` (PyPI ``dall-e``) as tokenizer and plain
  ``torch.optim.AdamW``; its batch holds the same views already made float (the official
  loader's work).

Measurements alternate in blocks (bitrain, reference, bitrain, ...) to spread machine drift over
both sides. Prints a table, then as the last line one JSON object (see ``docs/benchmarks.md``).

FLOPs per step (the same analytic count for both sides, so MFU ratios equal throughput ratios)::

    6 * P_blocks * B * T  +  12 * L * B * T^2 * D  +  6 * P_head * B * M  +  F_tok
    (weights fwd+bwd)       (attention scores fwd+bwd) (LM head, masked only) (tokenizer fwd convs)

with T = 1 + N tokens, M masked tokens, P_blocks the encoder's parameters without the LM head,
and F_tok = sum over the tokenizer's convs of 2 * H_out * W_out * C_out * C_in * k^2 per image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# Each size: the encoder, the number of masked patches, the DALL-E encoder and its input size.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {"img_size": 64, "patch_size": 8, "embed_dim": 192, "depth": 4, "num_heads": 3},
        "init_values": 0.1,
        "drop_path_rate": 0.0,
        "num_masking_patches": 26,
        "dall_e": {"n_hid": 32, "n_blk_per_group": 1, "vocab_size": 512},
        "token_size": 64,
    },
    "base": {
        "model": {
            "img_size": 224,
            "patch_size": 16,
            "embed_dim": 768,
            "depth": 12,
            "num_heads": 12,
        },
        "init_values": 0.1,
        "drop_path_rate": 0.1,
        "num_masking_patches": 75,
        "dall_e": {"n_hid": 256, "n_blk_per_group": 2, "vocab_size": 8192},
        "token_size": 112,
    },
    "large": {
        "model": {
            "img_size": 224,
            "patch_size": 16,
            "embed_dim": 1024,
            "depth": 24,
            "num_heads": 16,
        },
        "init_values": 1e-5,
        "drop_path_rate": 0.1,
        "num_masking_patches": 75,
        "dall_e": {"n_hid": 256, "n_blk_per_group": 2, "vocab_size": 8192},
        "token_size": 112,
    },
}
# Dense bf16 tensor-core peaks (NVIDIA data sheets, SXM); MFU is reported only for these.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
LR, WEIGHT_DECAY = 1.5e-3, 0.05  # BEiT-base pretraining (paper Table 12)


def build_dall_e_reference(seed: int, **kwargs: int) -> torch.nn.Module:
    """A random ``dall_e.Encoder`` (float32); attrs validators off so tiny sizes are allowed."""
    import attr
    from dall_e.encoder import Encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with attr.validators.disabled():
            encoder = Encoder(use_mixed_precision=False, **kwargs)
    return encoder


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model / GPU name, torch version and thread count, for the JSON line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def tokenizer_flops(encoder: torch.nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs of every ``Conv2d`` in ``encoder`` on ``example`` (2 * MACs), via hooks."""
    total = 0

    def hook(mod: torch.nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1]
        total += 2 * out.numel() * mod.in_channels * k // mod.groups

    handles = [
        m.register_forward_hook(hook) for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            encoder(example)
    finally:
        for h in handles:
            h.remove()
    return total


def step_flops(model: torch.nn.Module, batch: int, n_masked: int, tok_flops: int) -> float:
    """Analytic training FLOPs of one step (formula in the module docstring)."""
    head = sum(p.numel() for p in model.lm_head.parameters())
    blocks = sum(p.numel() for p in model.parameters()) - head
    tokens = 1 + model.num_patches
    depth, dim = len(model.blocks), model.embed_dim
    return float(
        6 * blocks * batch * tokens
        + 12 * depth * batch * tokens**2 * dim
        + 6 * head * batch * n_masked
        + tok_flops
    )


class Side:
    """One implementation under test: a step closure plus its timings and memory."""

    def __init__(self, name: str, step: Callable[[], float], state_bytes: int) -> None:
        self.name, self.step, self.state_bytes = name, step, state_bytes
        self.times: list[float] = []
        self.peak_bytes = 0
        self.loss = float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def build_sides(args: argparse.Namespace, tmp: Path) -> tuple[list[Side], dict[str, Any]]:
    """Models, optimizers, one shared batch, and the step closure of each side."""
    from dall_e.utils import map_pixels
    from transformers import BeitConfig, BeitForMaskedImageModeling

    from bitrain.data.masking import BlockwiseMaskGenerator
    from bitrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from bitrain.tasks.mim import MaskedImageModeling
    from bitrain.tasks.optim import build as build_optim

    device = torch.device(args.device)
    size = SIZES[args.model]
    arch, dall_e_kwargs = size["model"], size["dall_e"]
    vocab = dall_e_kwargs["vocab_size"]
    bf16 = args.precision == "bf16-mixed"

    # One set of DALL-E weights for both sides: the reference module and our tokenizer's file.
    ref_tok = build_dall_e_reference(args.seed, **dall_e_kwargs)
    weights = tmp / "encoder.pt"
    torch.save(ref_tok.state_dict(), weights)
    ref_tok = ref_tok.to(device).eval().requires_grad_(False)

    model_cfg = {
        "_target_": "bitrain.models.beit.BeitMIM",
        **arch,
        "vocab_size": vocab,
        "init_values": size["init_values"],
        "drop_path_rate": size["drop_path_rate"],
        "use_abs_pos_emb": False,
        "use_shared_rel_pos_bias": True,
    }
    tok_cfg = {
        "_target_": "bitrain.tokenizers.dall_e.DallETokenizer",
        "weights_path": str(weights),
        "input_size": size["token_size"],
        "precision": "bfloat16" if bf16 else "float32",
        **dall_e_kwargs,
    }
    norm = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    task = MaskedImageModeling(
        model_cfg, tok_cfg, optim={}, compile=args.compile, normalization=norm
    ).to(device)
    task.tokenizer.to(device)
    task.train()
    total = args.warmup + args.steps
    opt, sched = build_optim(task.model, total, lr=LR, weight_decay=WEIGHT_DECAY, warmup_steps=1)

    config = BeitConfig(
        vocab_size=vocab,
        hidden_size=arch["embed_dim"],
        num_hidden_layers=arch["depth"],
        num_attention_heads=arch["num_heads"],
        intermediate_size=4 * arch["embed_dim"],
        image_size=arch["img_size"],
        patch_size=arch["patch_size"],
        use_mask_token=True,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=True,
        layer_scale_init_value=size["init_values"],
        drop_path_rate=size["drop_path_rate"],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-6,
    )
    hf = BeitForMaskedImageModeling(config).to(device).train()
    hf_fwd = torch.compile(hf) if args.compile else hf
    ref_opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    # The same batch for both sides, as each side's loader hands it: bitrain's as uint8 views (its
    # step normalises them on the device, timed), the reference's as the same views in float
    # (normalised patch view, token view in [0, 1]: the official loader's work, not timed).
    gen = torch.Generator().manual_seed(args.seed)
    b, px, tok_px = args.batch_size, arch["img_size"], size["token_size"]
    masker = BlockwiseMaskGenerator(
        px // arch["patch_size"], num_masking_patches=size["num_masking_patches"]
    )
    masks = torch.stack([masker(gen) for _ in range(b)]).flatten(1).bool().to(device)
    pixels = torch.randint(0, 256, (b, 3, px, px), generator=gen, dtype=torch.uint8).to(device)
    tok_pixels = torch.randint(0, 256, (b, 3, tok_px, tok_px), generator=gen).to(torch.uint8)
    tok_pixels = tok_pixels.to(device)
    batch = {"images": pixels, "tokenizer_images": tok_pixels, "mask": masks}
    images, tok_images = task.model_inputs(pixels, tok_pixels)  # the reference's float views
    amp = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": bf16}

    def ours() -> float:
        with torch.autocast(**amp):
            loss = task.shared_step(batch)["loss"]
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def reference() -> float:
        with torch.autocast(**amp):
            with torch.no_grad():
                ids = ref_tok(map_pixels(tok_images)).argmax(1).flatten(1)  # [B, N]
            logits = hf_fwd(pixel_values=images, bool_masked_pos=masks).logits  # [B, N, V]
            loss = F.cross_entropy(logits[masks].float(), ids[masks])
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        return loss.detach()

    # Resident state of each side: parameters + optimizer moments (+ frozen tokenizer).
    def opt_state(o: torch.optim.Optimizer) -> int:
        return _tensor_bytes(t for s in o.state.values() for t in s.values())

    ours_params = _tensor_bytes(task.model.parameters()) + _tensor_bytes(
        task.tokenizer.parameters()
    )
    ref_params = _tensor_bytes(hf.parameters()) + _tensor_bytes(ref_tok.parameters())
    sides = [
        Side("bitrain", ours, ours_params),
        Side("reference", reference, ref_params),
    ]
    sides[0].opt_state = lambda: opt_state(opt)  # type: ignore[attr-defined]
    sides[1].opt_state = lambda: opt_state(ref_opt)  # type: ignore[attr-defined]
    example = task.tokenizer.preprocess(tok_images)
    with torch.no_grad(), torch.autocast(**amp):
        ours_ids = task.tokenizer.encode(example).flatten(1)
        ref_ids = ref_tok(map_pixels(tok_images)).argmax(1).flatten(1)
    info = {
        "target_agreement": float((ours_ids == ref_ids).float().mean()),
        "flops_per_step": step_flops(
            task.model,
            b,
            size["num_masking_patches"],
            tokenizer_flops(task.tokenizer.encoder, example),
        ),
        "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None),
        "bitrain_views": str(batch["images"].dtype).removeprefix("torch."),
        "n_masked": int(masks[0].sum()),
        "n_patches": int(masks.shape[1]),
    }
    return sides, info


def run_block(side: Side, steps: int, device: torch.device, record: bool) -> None:
    """Run ``steps`` steps of one side, timing each (and its peak CUDA memory when recording)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        side.loss = float(side.step())
        _sync(device)
        if record:
            side.times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        # Own resident state (params, moments) + what this block allocated above the resident set.
        extra = torch.cuda.max_memory_allocated(device) - before
        side.peak_bytes = max(side.peak_bytes, side.state_bytes + side.opt_state() + extra)


def _rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def summarize(side: Side, batch: int, flops: float, peak: float | None) -> dict[str, Any]:
    """Median / IQR step time, images/s and MFU of one side."""
    ms = sorted(t * 1e3 for t in side.times)
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    median = statistics.median(ms)
    return {
        "img_s": batch / (median / 1e3),
        "median_ms": median,
        "iqr_ms": q[2] - q[0],
        "peak_mem_mb": side.peak_bytes / 2**20 if side.peak_bytes else None,
        "mfu": flops / (median / 1e3) / peak if peak else None,
        "loss": side.loss,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    parser.add_argument("--block", type=int, default=5, help="steps per alternating block")
    parser.add_argument("--compile", action="store_true", help="torch.compile both encoders")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for key in ("batch_size", "steps", "block"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print a table and, as the last line, one JSON object."""
    args = parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as tmp:
        rss0 = _rss_bytes()
        sides, info = build_sides(args, Path(tmp))
        rss_mem: dict[str, float] = {}
        for side in sides:  # warm-up (and compilation) of each side, untimed
            before = _rss_bytes()
            run_block(side, max(args.warmup, 1), device, record=False)
            rss_mem[side.name] = (_rss_bytes() - before) / 2**20
        done = 0
        while done < args.steps:  # alternate blocks: bitrain, reference, bitrain, ...
            n = min(args.block, args.steps - done)
            for side in sides:
                run_block(side, n, device, record=True)
            done += n

    gpu = machine_info(device)["gpu"] or ""
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    peak = peak if args.precision == "bf16-mixed" else None
    stats = {s.name: summarize(s, args.batch_size, info["flops_per_step"], peak) for s in sides}
    if device.type == "cpu":
        for name, rss in rss_mem.items():
            stats[name]["peak_mem_mb"] = rss
        mem_kind = (
            "CPU ru_maxrss growth during each side's warm-up (bitrain first; the second side's "
            "figure is a lower bound)"
        )
    else:
        mem_kind = "CUDA max_memory_allocated: own params + optimizer state + step peak above it"

    print(
        f"bench_pretrain: model={args.model} batch={args.batch_size} device={args.device} "
        f"precision={args.precision} compile={args.compile} steps={args.steps} "
        f"masked={info['n_masked']}/{info['n_patches']} "
        f"GFLOP/step={info['flops_per_step'] / 1e9:.1f} "
        f"target agreement={info['target_agreement']:.3f}"
    )
    print(f"{'side':<10} {'img/s':>9} {'median ms':>10} {'IQR ms':>8} {'mem MB':>9} {'MFU':>7}")
    for name, s in stats.items():
        mem = f"{s['peak_mem_mb']:.0f}" if s["peak_mem_mb"] is not None else "-"
        mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "-"
        print(
            f"{name:<10} {s['img_s']:>9.2f} {s['median_ms']:>10.1f} {s['iqr_ms']:>8.1f} "
            f"{mem:>9} {mfu:>7}"
        )
    print(f"memory: {mem_kind}; process max RSS {(_rss_bytes() - rss0) / 2**20:.0f} MB above start")
    result = {
        "bench": "pretrain",
        "model": args.model,
        "batch_size": args.batch_size,
        "device": args.device,
        "precision": args.precision,
        "compile": args.compile,
        "steps": args.steps,
        "bitrain_img_s": stats["bitrain"]["img_s"],
        "reference_img_s": stats["reference"]["img_s"],
        "ratio": stats["bitrain"]["img_s"] / stats["reference"]["img_s"],
        "bitrain": stats["bitrain"],
        "reference": stats["reference"],
        "memory_kind": mem_kind,
        "flops_per_step": info["flops_per_step"],
        "hf_attn_implementation": info["hf_attn_implementation"],
        "target_agreement": info["target_agreement"],
        "bitrain_views": info["bitrain_views"],
        **machine_info(device),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
