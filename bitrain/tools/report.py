"""Run reports: ``python -m bitrain.report RUN_DIR [RUN_DIR ...] [--out DIR]``.

Reads the ``metrics.csv`` that Lightning's ``CSVLogger`` writes into each run directory (one row
per logging call; a cell is empty when that metric was not logged at that row) and writes:

* one PNG per metric family present (loss, masked accuracy, learning rate, throughput, validation
  metrics), every run overlaid with its directory name as the legend;
* ``report.md``: per run, the number of steps and a table of first / last / min / max of each
  metric, then links to the plots.

With several runs (e.g. the runs of an lr sweep: ``python -m bitrain.finetune --multirun
optim.lr=2e-3,3e-3,4e-3,5e-3``) ``report.md`` starts with a comparison: per run the overrides that
differ between the runs (read from Hydra's ``.hydra/overrides.yaml``, plain YAML), the best and
last value of one metric (``--metric``, default ``val/top1``, else ``val/loss``) and the winner;
``sweep.png`` draws that metric of every run in one plot.

With one run the files go into that run's directory, with several into the first one's, unless
``--out DIR`` is given. Plots use matplotlib's Agg backend (no display needed). See
docs/monitoring.md and docs/finetuning.md (the lr sweep).
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
    overrides: list[str] = field(default_factory=list)

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
    run.overrides = read_overrides(run_dir)
    return run


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides Hydra recorded for a run (``.hydra/overrides.yaml``), or [].

    The file is read as plain YAML (a list of strings); anything else is ignored with a warning.
    """
    import yaml

    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        log.warning("report: ignoring unreadable '%s': %s", path, err)
        return []
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        log.warning("report: ignoring '%s': not a list of overrides", path)
        return []
    return data


@dataclass
class Comparison:
    """One metric across runs: per run ``(best, step of best, last)`` or None, and the winner."""

    metric: str
    higher_is_better: bool
    rows: list[tuple[RunMetrics, tuple[float, int, float] | None]]
    varying: dict[str, list[str]]

    def result_of(self, run: RunMetrics) -> tuple[float, int, float] | None:
        """``(best, step of best, last)`` of ``run``, or None when it did not log the metric."""
        return next(result for r, result in self.rows if r is run)

    @property
    def winner(self) -> RunMetrics | None:
        """The run with the best value of the metric (None when no run logged it)."""
        scored = [(row[0], row[1][0]) for row in self.rows if row[1] is not None]
        if not scored:
            return None
        pick = max if self.higher_is_better else min
        return pick(scored, key=lambda item: item[1])[0]


def _varying_overrides(runs: list[RunMetrics]) -> dict[str, list[str]]:
    """Per run name, the overrides not shared by every run (what the sweep changed)."""
    common = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    return {r.name: [o for o in r.overrides if o not in common] for r in runs}


def compare(
    runs: list[RunMetrics], metric: str | None = None, higher_is_better: bool | None = None
) -> Comparison | None:
    """Compare ``runs`` on ``metric`` (default ``val/top1``, else ``val/loss``).

    ``higher_is_better`` defaults to False for metrics whose name ends in ``loss``. Returns None
    when no run logged the metric (and none was asked for).

    Raises:
        ReportError: ``metric`` was given and no run logged it.
    """
    if metric is None:
        metric = next(
            (m for m in ("val/top1", "val/loss") if any(m in r.series for r in runs)), None
        )
        if metric is None:
            return None
    elif not any(metric in r.series for r in runs):
        logged = sorted({k for r in runs for k in r.series})
        raise ReportError(f"no run logged --metric {metric!r}; the runs logged {logged}")
    if higher_is_better is None:
        higher_is_better = not metric.endswith("loss")
    pick = max if higher_is_better else min
    rows = []
    for run in runs:
        values = run.series.get(metric)
        if not values:
            rows.append((run, None))
            continue
        step, best = pick(values, key=lambda sv: sv[1])
        rows.append((run, (best, step, values[-1][1])))
    return Comparison(metric, higher_is_better, rows, _varying_overrides(runs))


def plot_comparison(comparison: Comparison, out_dir: Path) -> Path:
    """``sweep.png``: the compared metric of every run, one line each, labelled by its overrides."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    winner = comparison.winner
    for run, _ in comparison.rows:
        values = run.series.get(comparison.metric)
        if not values:
            continue
        label = " ".join(comparison.varying.get(run.name) or []) or run.name
        if run is winner:
            label += " (best)"
        ax.plot([s for s, _ in values], [v for _, v in values], marker="o", label=label)
    better = "higher" if comparison.higher_is_better else "lower"
    ax.set(
        title=f"{comparison.metric} per run ({better} is better)",
        xlabel="step",
        ylabel=comparison.metric,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = out_dir / "sweep.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_comparison(comparison: Comparison) -> list[str]:
    """The comparison section of ``report.md``."""
    better = "higher" if comparison.higher_is_better else "lower"
    lines = [
        f"## Comparison: {comparison.metric} ({better} is better)",
        "",
        f"| run | overrides that differ | best {comparison.metric} | at step | last |",
        "|---|---|---|---|---|",
    ]
    for run, result in comparison.rows:
        changed = " ".join(f"`{o}`" for o in comparison.varying.get(run.name, [])) or "—"
        if result is None:
            lines.append(f"| {run.name} | {changed} | not logged | | |")
            continue
        best, step, last = result
        lines.append(f"| {run.name} | {changed} | {_fmt(best)} | {step} | {_fmt(last)} |")
    winner = comparison.winner
    if winner is not None:
        best, step, _ = comparison.result_of(winner)  # type: ignore[misc]
        changed = " ".join(comparison.varying.get(winner.name, [])) or winner.name
        lines += [
            "",
            f"**Best: {changed}** ({comparison.metric} {_fmt(best)} at step {step}, "
            f"run `{winner.name}`).",
        ]
    return lines + [""]


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


def render_markdown(
    runs: list[RunMetrics], plots: list[Path], comparison: Comparison | None = None
) -> str:
    """The text of ``report.md``: the comparison (several runs), per-run tables, the plots."""
    lines = ["# Run report", ""]
    if comparison is not None:
        lines += render_comparison(comparison)
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
    run_dirs: list[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    metric: str | None = None,
    higher_is_better: bool | None = None,
) -> Path:
    """Read every run's metrics, write plots and ``report.md``; return the report's path.

    Args:
        run_dirs: one or more run directories, each holding a ``metrics.csv``.
        out_dir: where to write; default the first run directory.
        metric: the metric several runs are compared on (default ``val/top1``, else
            ``val/loss``).
        higher_is_better: direction of ``metric`` (default: lower for ``*loss``).

    Raises:
        ReportError: a run directory or its ``metrics.csv`` is missing or empty, or no run
            logged ``metric``.
    """
    if not run_dirs:
        raise ReportError("give at least one run directory")
    runs = [read_metrics(d) for d in run_dirs]
    if len({r.name for r in runs}) < len(runs):  # same dir names (e.g. times): add the parents
        for run in runs:
            run.name = "/".join(run.run_dir.resolve().parts[-2:])
    comparison = compare(runs, metric, higher_is_better) if len(runs) > 1 else None
    out = Path(out_dir) if out_dir is not None else runs[0].run_dir
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_families(runs, out)
    if comparison is not None:
        plots.insert(0, plot_comparison(comparison, out))
    report = out / "report.md"
    report.write_text(render_markdown(runs, plots, comparison))
    if comparison is not None and comparison.winner is not None:
        best = comparison.result_of(comparison.winner)
        changed = " ".join(comparison.varying.get(comparison.winner.name, []))
        log.info(
            "best %s: %s (%s, %s)",
            comparison.metric,
            _fmt(best[0]),
            changed or comparison.winner.name,
            comparison.winner.run_dir,
        )
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m bitrain.report",
        description="Plots and a summary table (report.md) from runs' metrics.csv.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (overlaid)")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: first run)")
    parser.add_argument(
        "--metric", default=None, help="compare several runs on it (default: val/top1 or val/loss)"
    )
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--higher-is-better", dest="higher", action="store_true", default=None)
    direction.add_argument("--lower-is-better", dest="higher", action="store_false")
    args = parser.parse_args(argv)
    if not log.handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        report = write_report(args.run_dirs, args.out, args.metric, args.higher)
    except ReportError as err:
        log.error("report: %s", err)
        return EXIT_BAD_INPUT
    log.info("%s", report)
    return 0
