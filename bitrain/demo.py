"""The embedded demo, end to end on a CPU: ``python -m bitrain.demo`` (what ``make demo`` runs).

1. Train the demo dVAE tokenizer on the demo's digits, unless ``tokenizers/demo_dvae.pt`` exists.
2. Pretrain a tiny BEiT by MIM on the same images (``python -m bitrain.pretrain``).
3. Report where everything went, per-stage times, the tokenizer's codebook usage, and the MIM loss
   and masked accuracy at the start and the end of pretraining; write the run's plots and
   ``report.md`` (``bitrain.report``).

Each stage runs as its own ``python -m`` command, exactly what a user would type, so the demo also
checks the commands themselves. Extra arguments are passed to the pretraining command
(e.g. ``python -m bitrain.demo trainer.max_steps=50``).
"""

from __future__ import annotations

import csv
import logging
import math
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from bitrain.io import load_torch_file
from bitrain.report import write_report

log = logging.getLogger("bitrain.demo")

TOKENIZER = Path("tokenizers") / "demo_dvae.pt"


def _run(module: str, run_dir: Path, overrides: list[str]) -> float:
    """Run ``python -m module`` with Hydra's run dir set; return its wall time in seconds."""
    cmd = [sys.executable, "-m", module, f"hydra.run.dir={run_dir}", *overrides]
    log.info("$ %s", " ".join(cmd[1:]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"demo: '{' '.join(cmd[1:])}' failed with exit code {proc.returncode}")
    return time.perf_counter() - start


def read_metric_series(metrics_csv: Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` pairs of one column of a ``metrics.csv`` (empty cells skipped)."""
    series = []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            value = row.get(key, "")
            if value not in ("", None) and not math.isnan(float(value)):
                series.append((int(row["step"]), float(value)))
    return series


def _start_end(series: list[tuple[int, float]], window: int = 5) -> tuple[float, float]:
    """The first logged value, and the mean of the last ``window`` (smooths noisy single steps)."""
    if not series:
        raise SystemExit("demo: the pretraining run logged no training metrics")
    last = [v for _, v in series[-window:]]
    return series[0][1], sum(last) / len(last)


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; return its figures (also logged as a summary)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    overrides = list(sys.argv[1:] if argv is None else argv)
    stamp = datetime.now()
    day, clock = stamp.strftime("%Y-%m-%d"), stamp.strftime("%H-%M-%S")
    figures: dict = {}

    if TOKENIZER.exists():
        log.info("demo tokenizer found at %s (delete it to retrain)", TOKENIZER)
        figures["tokenizer_seconds"] = 0.0
    else:
        tok_dir = Path("outputs") / "train_tokenizer" / day / clock
        figures["tokenizer_seconds"] = _run("bitrain.train_tokenizer", tok_dir, [])
        figures["tokenizer_run"] = str(tok_dir)
    stats = load_torch_file(TOKENIZER, what="demo tokenizer").get("stats", {})

    run_dir = Path("outputs") / "pretrain" / day / clock
    figures["pretrain_seconds"] = _run("bitrain.pretrain", run_dir, overrides)
    metrics = run_dir / "metrics.csv"
    loss0, loss1 = _start_end(read_metric_series(metrics, "train/loss"))
    acc0, acc1 = _start_end(read_metric_series(metrics, "train/mim_acc"))
    val_acc = read_metric_series(metrics, "val/mim_acc")
    const_acc = read_metric_series(metrics, "val/const_acc")
    figures.update(
        pretrain_run=str(run_dir),
        loss_start=loss0,
        loss_end=loss1,
        mim_acc_start=acc0,
        mim_acc_end=acc1,
        val_mim_acc=val_acc[-1][1] if val_acc else None,
        val_const_acc=const_acc[-1][1] if const_acc else None,
        codebook_usage=stats.get("codebook_usage"),
        perplexity=stats.get("perplexity"),
    )

    log.info("\n==== bitrain demo summary ====")
    log.info("tokenizer      %s (trained in %.0f s)", TOKENIZER, figures["tokenizer_seconds"])
    if stats:
        log.info(
            "  codebook     %.1f%% of codes used, perplexity %.1f",
            100 * float(stats.get("codebook_usage", float("nan"))),
            float(stats.get("perplexity", float("nan"))),
        )
    log.info("pretraining    %s (%.0f s)", run_dir, figures["pretrain_seconds"])
    log.info("  MIM loss     %.3f (first logged) -> %.3f (mean of last 5 logged)", loss0, loss1)
    log.info("  masked acc   %.3f -> %.3f (training batches)", acc0, acc1)
    if val_acc:
        log.info(
            "  held out     masked acc %.3f on the 500 test digits at step %d; always predicting"
            " the most frequent token scores %.3f",
            val_acc[-1][1],
            val_acc[-1][0],
            const_acc[-1][1] if const_acc else float("nan"),
        )
    log.info("  checkpoint   %s", run_dir / "checkpoints" / "last.ckpt")
    log.info("  metrics      %s", metrics)
    report = write_report([run_dir])
    figures["report"] = str(report)
    log.info("report        %s", report)
    return figures


if __name__ == "__main__":
    main()
