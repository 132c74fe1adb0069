"""Run reports: ``python -m bitrain.report RUN_DIR [RUN_DIR ...] [--out DIR]``.

Reads the ``metrics.csv`` that Lightning's ``CSVLogger`` writes into each run directory (one row
per logging call; a cell is empty when that metric was not logged at that row) and writes:

* one PNG per metric family present (loss, masked accuracy, learning rate, throughput, validation
  metrics), every run overlaid with its directory name as the legend;
* ``report.md``: per run, the number of steps and a table of first / last / min / max of each
  metric, then links to the plots.

With one run the files go into that run's directory, with several into the first one's, unless
``--out DIR`` is given. Plots use matplotlib's Agg backend (no display needed). See
docs/monitoring.md.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("bitrain.report")

EXIT_BAD_INPUT = 2

# Metric families, each one plot: (file stem, title, y label, predicate on the column name).
# A column lands in the first family whose predicate accepts it; validation metrics other than
# the loss are grouped together (val/mim_acc, val/const_acc, val/top1, ...).
FAMILIES: tuple[tuple[str, str, str, object], ...] = (
    ("loss", "Loss", "loss", lambda k: k.endswith("loss")),
    ("mim_acc", "Masked accuracy (training)", "accuracy", lambda k: k == "train/mim_acc"),
    ("lr", "Learning rate", "lr", lambda k: k == "lr" or k.startswith("lr-") or k.endswith("/lr")),
    ("throughput", "Throughput", "images / s", lambda k: "per_sec" in k),
    ("val_metrics", "Validation metrics", "value", lambda k: k.startswith("val/")),
)
OTHER_FAMILY = ("other", "Other metrics", "value")
INDEX_COLUMNS = ("epoch", "step")
_FAMILY_ORDER = [f[:3] for f in FAMILIES] + [OTHER_FAMILY]


class ReportError(ValueError):
    """A run directory or its ``metrics.csv`` cannot be reported on."""


@dataclass
class RunMetrics:
    """The metrics of one run.

    Attributes:
        run_dir: the run directory.
        series: metric name -> ``(step, value)`` pairs in logging order (empty cells skipped).
    """

    run_dir: Path
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.run_dir.resolve().name

    @property
    def num_steps(self) -> int:
        """Highest logged step + 1 (Lightning logs ``step`` as a 0-based global step)."""
        steps = [s for values in self.series.values() for s, _ in values]
        return max(steps) + 1 if steps else 0


def _parse_float(text: str | None) -> float | None:
    if text is None or text.strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def read_metrics(run_dir: str | os.PathLike) -> RunMetrics:
    """Read ``run_dir/metrics.csv`` into per-metric ``(step, value)`` series.

    Raises:
        ReportError: the directory or file is missing, or the file has no metric values.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory '{run_dir}' does not exist (give a training run's dir)")
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise ReportError(
            f"no metrics.csv in '{run_dir}' (expected '{path}'; the run needs the CSV logger: "
            "logger=default or logger=csv)"
        )
    run = RunMetrics(run_dir)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise ReportError(f"'{path}' is empty or has no 'step' column (not a CSVLogger file)")
        keys = [k for k in reader.fieldnames if k not in INDEX_COLUMNS]
        for row in reader:
            step = _parse_float(row.get("step"))
            if step is None:
                continue
            for key in keys:
                value = _parse_float(row.get(key))
                if value is not None:
                    run.series.setdefault(key, []).append((int(step), value))
    if not run.series:
        raise ReportError(f"'{path}' holds no metric values (did the run log any step?)")
    return run


def family_of(key: str) -> tuple[str, str, str]:
    """``(file stem, title, y label)`` of the plot a metric column belongs to."""
    for stem, title, ylabel, accepts in FAMILIES:
        if accepts(key):  # type: ignore[operator]
            return stem, title, ylabel
    return OTHER_FAMILY


def plot_families(runs: list[RunMetrics], out_dir: Path) -> list[Path]:
    """One PNG per metric family present in any run, runs overlaid; return the files written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str, str], list[str]] = {}
    for run in runs:
        for key in run.series:
            keys = groups.setdefault(family_of(key), [])
            if key not in keys:
                keys.append(key)
    written = []
    for family in sorted(groups, key=_FAMILY_ORDER.index):
        stem, title, ylabel = family
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for run in runs:
            for key in groups[family]:
                values = run.series.get(key)
                if not values:
                    continue
                label = run.name if len(groups[family]) == 1 else f"{run.name}: {key}"
                marker = "o" if len(values) < 20 else None
                ax.plot([s for s, _ in values], [v for _, v in values], label=label, marker=marker)
        if stem == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def render_markdown(runs: list[RunMetrics], plots: list[Path]) -> str:
    """The text of ``report.md``: per-run summary tables, then links to the plots."""
    lines = ["# Run report", ""]
    for run in runs:
        lines += [
            f"## {run.name}",
            "",
            f"- directory: `{run.run_dir}`",
            f"- steps: {run.num_steps}",
            "",
            "| metric | first | last | min | max | points |",
            "|---|---|---|---|---|---|",
        ]
        for key in sorted(run.series, key=lambda k: (_FAMILY_ORDER.index(family_of(k)), k)):
            values = [v for _, v in run.series[key]]
            lines.append(
                f"| {key} | {_fmt(values[0])} | {_fmt(values[-1])} | {_fmt(min(values))} "
                f"| {_fmt(max(values))} | {len(values)} |"
            )
        lines.append("")
    lines += ["## Plots", ""]
    for path in plots:
        lines += [f"![{path.stem}]({path.name})", ""]
    return "\n".join(lines)


def write_report(
    run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike | None = None
) -> Path:
    """Read every run's metrics, write plots and ``report.md``; return the report's path.

    Args:
        run_dirs: one or more run directories, each holding a ``metrics.csv``.
        out_dir: where to write; default the first run directory.

    Raises:
        ReportError: a run directory or its ``metrics.csv`` is missing or empty.
    """
    if not run_dirs:
        raise ReportError("give at least one run directory")
    runs = [read_metrics(d) for d in run_dirs]
    if len({r.name for r in runs}) < len(runs):  # same dir names (e.g. times): add the parents
        for run in runs:
            run.name = "/".join(run.run_dir.resolve().parts[-2:])
    out = Path(out_dir) if out_dir is not None else runs[0].run_dir
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_families(runs, out)
    report = out / "report.md"
    report.write_text(render_markdown(runs, plots))
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m bitrain.report",
        description="Plots and a summary table (report.md) from runs' metrics.csv.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (overlaid)")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: first run)")
    args = parser.parse_args(argv)
    if not log.handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        report = write_report(args.run_dirs, args.out)
    except ReportError as err:
        log.error("report: %s", err)
        return EXIT_BAD_INPUT
    log.info("%s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
