"""One command for a lent GPU: the GPU benchmarks and CUDA-only tests, one JSON summary.

    python scripts/gpu_check.py [--out outputs/gpu_check/NAME.json] [--budget-s 450] [--dry-run]
    make gpu-check

Runs, each as its own process with a time limit, and in this order (docs/benchmarks.md):

1. ``pytest -m cuda tests/integration/test_cuda.py``: device-side NaN skip, static masked count,
   fused AdamW with bf16 clipping;
2. ``bench_pretrain.py --model base --precision bf16-mixed``: the BEiT-base step, eager, against
   the Hugging Face reference;
3. the same with ``--compile`` (both sides compiled);
4. ``bench_tokenizer.py``: the DALL-E tokenizer at 112 px (fp32, bf16, reference), and its share
   of the step;
5. ``bench_data.py``: the loader on this machine's CPUs with as many workers as a device gets
   (``default_num_workers``), on 500x375 JPEGs, next to the step's images/s from 2. The loader
   hands uint8 views, and the step of 2 normalises uint8 views on the device, so the two rates
   are of the same batch contract.

Each step's last printed line (the benchmarks' JSON) goes into one summary with its exit code,
seconds and, if it failed, the end of its output; ``loader_feeds_step`` is the loader's images/s
over the eager step's. The summary is written to ``--out`` and printed as the last line. The
steps' time limits add up to 470 s, under the 8 minutes of a lent H100/H200 (not yet run on
one); ``--budget-s`` (default 450) starts no step past it. Without a CUDA GPU it exits at
once with status 2 and says so; ``--dry-run`` prints the plan (the commands and their limits)
without running anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = 2  # exit status without a CUDA GPU
CUDA_TESTS = "tests/integration/test_cuda.py"


def plan(python: str, workers: int) -> list[tuple[str, list[str], int]]:
    """``(name, command, time limit in seconds)`` for every step, in order."""
    base = [python, "scripts/bench_pretrain.py", "--model", "base", "--device", "cuda"]
    step = [*base, "--precision", "bf16-mixed", "--batch-size", "64", "--block", "5"]
    return [
        ("cuda_tests", [python, "-m", "pytest", "-q", "-m", "cuda", CUDA_TESTS], 90),
        ("step_bf16_eager", [*step, "--steps", "30", "--warmup", "5"], 80),
        ("step_bf16_compiled", [*step, "--steps", "30", "--warmup", "5", "--compile"], 160),
        (
            "tokenizer",
            [python, "scripts/bench_tokenizer.py", "--device", "cuda", "--batch-size", "256",
             "--iters", "20", "--warmup", "3"],
            60,
        ),
        (
            "loader",
            [python, "scripts/bench_data.py", "--workers", f"1,{workers}", "--num-images", "1600",
             "--batch-size", "64", "--batches", "24", "--no-shards"],
            80,
        ),
    ]  # fmt: skip


def _last_json(text: str) -> Any:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_step(name: str, command: list[str], limit: int) -> dict[str, Any]:
    """Run one step in ``ROOT``: exit code, seconds, JSON result, and output tail if it failed."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=limit, check=False
        )
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        rc = 124
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        out += f"\n(gpu_check: {name} ran past its limit of {limit} s)"
    result: dict[str, Any] = {
        "command": shlex.join(command),
        "rc": rc,
        "seconds": round(time.perf_counter() - start, 1),
        "result": _last_json(out) if name != "cuda_tests" else out.strip().splitlines()[-1:],
    }
    if rc != 0:
        result["tail"] = out[-3000:]
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="summary JSON path (default outputs/gpu_check/)")
    p.add_argument("--budget-s", type=float, default=450.0, help="start no step past this")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--only", default="", help="comma-separated step names to run (default all)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bitrain.data.datamodule import default_num_workers

    steps = plan(sys.executable, default_num_workers(1))
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {name for name, _, _ in steps}
        if unknown:
            raise SystemExit(
                f"gpu_check: unknown step(s) {sorted(unknown)}; steps are "
                f"{[name for name, _, _ in steps]}"
            )
        steps = [s for s in steps if s[0] in wanted]
    if args.dry_run:
        for name, command, limit in steps:
            print(f"{name} (limit {limit} s): {shlex.join(command)}")
        return 0
    if not torch.cuda.is_available():
        print(
            "gpu_check: no GPU: torch.cuda.is_available() is False on this machine "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing was measured. "
            "Run it on a machine with an NVIDIA GPU (docs/benchmarks.md)",
            file=sys.stderr,
        )
        return NO_GPU
    started = time.perf_counter()
    summary: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch": torch.__version__,
        "steps": {},
    }
    for name, command, limit in steps:
        left = args.budget_s - (time.perf_counter() - started)
        if left < min(limit, 30):
            summary["steps"][name] = {"rc": None, "skipped": f"budget: {left:.0f} s left"}
            continue
        print(f"gpu_check: {name} (limit {min(limit, int(left))} s) ...", file=sys.stderr)
        summary["steps"][name] = run_step(name, command, min(limit, int(left)))
    eager = (summary["steps"].get("step_bf16_eager") or {}).get("result") or {}
    loader = (summary["steps"].get("loader") or {}).get("result") or {}
    rates = loader.get("folder_img_s") or {}
    if eager.get("bitrain_img_s") and rates:
        best = max(rates.values())
        summary["loader_feeds_step"] = best / eager["bitrain_img_s"]
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["ok"] = all(s.get("rc") == 0 for s in summary["steps"].values())
    out = (
        args.out
        or ROOT / "outputs" / "gpu_check" / f"gpu_check_{time.strftime('%Y%m%d_%H%M%S')}.json"
    )
    from bitrain.io import atomic_write_bytes

    atomic_write_bytes(out, json.dumps(summary, indent=1).encode())
    print(f"gpu_check: summary in {out}", file=sys.stderr)
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
