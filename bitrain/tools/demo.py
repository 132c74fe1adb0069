"""The embedded demo, end to end on a CPU: ``python -m bitrain.demo`` (what ``make demo`` runs).

1. Train the demo dVAE tokenizer on the demo's digits, unless ``tokenizers/demo_dvae.pt`` exists.
2. Pretrain a tiny BEiT by MIM on the same images (``python -m bitrain.pretrain``).
3. Fine-tune twice on 130 labelled digits with the same steps and seed (``python -m
   bitrain.finetune``): from the MIM checkpoint of step 2, and from scratch; both are evaluated on
   the 500 held-out test digits.
4. Report where everything went, per-stage times, the tokenizer's codebook usage, the MIM loss and
   masked accuracy at the start and the end of pretraining, and the two fine-tuned accuracies side
   by side; write plots and ``report.md`` for pretraining and for the two fine-tuning runs
   overlaid (``bitrain.report``), and say where the image panels are.

Each stage runs as its own ``python -m`` command, exactly what a user would type, so the demo also
checks the commands themselves. Extra arguments are Hydra overrides of the pretraining command
(e.g. ``python -m bitrain.demo trainer.max_steps=50``), or, prefixed with ``finetune.``, of both
fine-tuning commands (``finetune.trainer.max_steps=20``). ``--seeds 0,1,2`` fine-tunes both ways
once per seed and prints the mean and spread (``docs/finetuning.md``).
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

from omegaconf import OmegaConf

from bitrain.io import load_torch_file
from bitrain.tools.doctor import compose_config
from bitrain.tools.report import write_report

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


def _tokenizer_is_stale(path: Path) -> bool:
    """Whether the dVAE at ``path`` differs from what ``configs/train_tokenizer.yaml`` builds.

    An older demo (e.g. one with another token grid) leaves a tokenizer that pretraining would
    refuse; the demo then trains the current one instead of stopping.
    """
    want = OmegaConf.to_container(
        compose_config([], config_name="train_tokenizer").tokenizer_model, resolve=True
    )
    have = load_torch_file(path, what="demo tokenizer").get("config", {})
    return any(have.get(k) != v for k, v in want.items() if k != "_target_")


def _start_end(series: list[tuple[int, float]], window: int = 5) -> tuple[float, float]:
    """The first logged value, and the mean of the last ``window`` (smooths noisy single steps)."""
    if not series:
        raise SystemExit("demo: the pretraining run logged no training metrics")
    last = [v for _, v in series[-window:]]
    return series[0][1], sum(last) / len(last)


def _final_top1(run_dir: Path) -> float:
    series = read_metric_series(run_dir / "metrics.csv", "val/top1")
    if not series:
        raise SystemExit(f"demo: the fine-tuning run {run_dir} logged no val/top1")
    return series[-1][1]


def _split_args(args: list[str]) -> tuple[list[str], list[str], list[int]]:
    """Pretraining overrides, fine-tuning overrides (``finetune.`` prefix) and ``--seeds``."""
    pretrain, finetune, seeds = [], [], [0]
    it = iter(args)
    for arg in it:
        if arg == "--seeds" or arg.startswith("--seeds="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            try:
                seeds = [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise SystemExit(
                    f"demo: --seeds takes integers like 0,1,2, got {value!r}"
                ) from None
            if not seeds:
                raise SystemExit("demo: --seeds needs at least one seed")
        elif arg.startswith("finetune."):
            finetune.append(arg[len("finetune.") :])
        else:
            pretrain.append(arg)
    return pretrain, finetune, seeds


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; return its figures (also logged as a summary)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    overrides, ft_overrides, seeds = _split_args(list(sys.argv[1:] if argv is None else argv))
    stamp = datetime.now()
    day, clock = stamp.strftime("%Y-%m-%d"), stamp.strftime("%H-%M-%S")
    figures: dict = {}

    if TOKENIZER.exists() and _tokenizer_is_stale(TOKENIZER):
        stale = TOKENIZER.with_name(f"{TOKENIZER.stem}.stale-{day}-{clock}{TOKENIZER.suffix}")
        TOKENIZER.rename(stale)
        log.info(
            "demo tokenizer %s was built for another configuration; moved it to %s and "
            "training a new one",
            TOKENIZER,
            stale,
        )
    if TOKENIZER.exists():
        log.info("demo tokenizer found at %s (delete it to retrain)", TOKENIZER)
        figures["tokenizer_seconds"] = None  # reused, not trained
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

    report = write_report([run_dir])
    figures["report"] = str(report)

    # Fine-tuning: from the MIM checkpoint and from scratch, same steps and seed.
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    results: dict[str, list[float]] = {"pretrained": [], "scratch": []}
    ft_runs: dict[str, list[Path]] = {"pretrained": [], "scratch": []}
    t0 = time.perf_counter()
    for seed in seeds:
        for init, pretrained in (("pretrained", str(ckpt)), ("scratch", "null")):
            ft_dir = Path("outputs") / "finetune" / day / f"{clock}-{init}-seed{seed}"
            _run(
                "bitrain.finetune",
                ft_dir,
                [f"model.pretrained={pretrained}", f"seed={seed}", *ft_overrides],
            )
            results[init].append(_final_top1(ft_dir))
            ft_runs[init].append(ft_dir)
    figures["finetune_seconds"] = time.perf_counter() - t0
    figures["finetune_top1"] = results
    figures["finetune_runs"] = {k: [str(p) for p in v] for k, v in ft_runs.items()}
    ft_report = write_report(
        [ft_runs["pretrained"][0], ft_runs["scratch"][0]],
        out_dir=Path("outputs") / "finetune" / day / f"{clock}-report",
    )
    figures["finetune_report"] = str(ft_report)

    log.info("\n==== bitrain demo summary ====")
    if figures["tokenizer_seconds"] is None:
        log.info("tokenizer      %s (the existing file; delete it to retrain)", TOKENIZER)
    else:
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
    panels = sorted((run_dir / "panels").glob("*.png"))
    if panels:
        log.info(
            "  panels       %s (%d images, e.g. %s)",
            run_dir / "panels",
            len(panels),
            panels[-1].name,
        )

    log.info(
        "fine-tuning    130 labelled digits, %s, %d runs in %.0f s; top-1 on the 500 held-out "
        "test digits",
        _seeds(seeds),
        2 * len(seeds),
        figures["finetune_seconds"],
    )
    for init in ("pretrained", "scratch"):
        accs = results[init]
        label = "from MIM" if init == "pretrained" else "from scratch"
        log.info("  %-13s %s   %s", label, _mean_spread(accs), ft_runs[init][0])
    gap = [p - s for p, s in zip(results["pretrained"], results["scratch"])]
    log.info(
        "  gap          %s (pretrained - scratch, same steps and seed)",
        _mean_spread(gap, difference=True),
    )
    log.info("report        %s", report)
    log.info("               %s (fine-tuning, both runs overlaid)", ft_report)
    return figures


def _seeds(seeds: list[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"


def _mean_spread(values: list[float], difference: bool = False) -> str:
    """Mean and sample standard deviation of accuracies (or, ``difference``, of their gaps).

    ``78.8%`` / ``78.1% +- 1.2 (n=3: ...)``; gaps: ``+6.3 points`` / ``+11.9 points +- 5.1 (n=3:
    +6.3, ...)``.
    """
    num = "{:+.1f}" if difference else "{:.1f}"
    unit = " points" if difference else "%"
    if len(values) == 1:
        return num.format(100 * values[0]) + unit
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    each = ", ".join(num.format(100 * v) for v in values)
    return f"{num.format(100 * mean)}{unit} +- {100 * sd:.1f} (n={len(values)}: {each})"
