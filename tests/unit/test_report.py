"""bitrain.tools.report: plots and report.md from Lightning CSVLogger metrics.csv files."""

from __future__ import annotations

import logging

import pytest

from bitrain.tools import report

HEADER = (
    "epoch,lr,step,train/images_per_sec,train/loss,train/mim_acc,val/const_acc,val/loss,val/mim_acc"
)


def _write_run(path, loss_scale=1.0, val_top1=False):
    """A tiny CSVLogger-shaped metrics.csv: train rows every 5 steps, a val row at step 19."""
    path.mkdir(parents=True)
    header = HEADER + (",val/top1" if val_top1 else "")
    rows = [header]
    for i, step in enumerate(range(4, 20, 5)):
        loss = loss_scale * (6.0 - i)
        rows.append(
            f"0,{1e-3 * (i + 1)},{step},{100 + i},{loss},{0.05 + 0.01 * i},,,"
            + ("," if val_top1 else "")
        )
    rows.append("0,,19,,,,0.05,4.5,0.07" + (",0.3" if val_top1 else ""))
    (path / "metrics.csv").write_text("\n".join(rows) + "\n")
    return path


def test_report_writes_plots_and_table(tmp_path):
    run = _write_run(tmp_path / "run_a")
    assert report.main([str(run)]) == 0
    text = (run / "report.md").read_text()
    for key in ("train/loss", "train/mim_acc", "lr", "train/images_per_sec", "val/mim_acc"):
        assert f"| {key} |" in text
    assert "- steps: 20" in text
    # first / last / min / max of train/loss: 6, 3, 3, 6
    assert "| train/loss | 6 | 3 | 3 | 6 | 4 |" in text
    for stem in ("loss", "mim_acc", "lr", "throughput", "val_metrics"):
        png = run / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({stem}.png)" in text


def test_read_metrics_skips_empty_cells(tmp_path):
    run = report.read_metrics(_write_run(tmp_path / "r"))
    assert run.series["val/loss"] == [(19, 4.5)]
    assert [s for s, _ in run.series["train/loss"]] == [4, 9, 14, 19]
    assert report.family_of("val/top1")[0] == "val_metrics"
    assert report.family_of("val/loss")[0] == "loss"


def test_overlay_of_two_runs(tmp_path):
    a = _write_run(tmp_path / "run_a")
    b = _write_run(tmp_path / "run_b", loss_scale=0.5, val_top1=True)
    out = tmp_path / "cmp"
    assert report.main([str(a), str(b), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## run_a" in text and "## run_b" in text
    assert "| val/top1 |" in text
    assert (out / "loss.png").is_file()
    assert not (a / "report.md").exists()  # --out wins


def test_overlay_labels_disambiguate_same_names(tmp_path):
    a = _write_run(tmp_path / "day1" / "12-00-00")
    b = _write_run(tmp_path / "day2" / "12-00-00")
    path = report.write_report([a, b], tmp_path / "out")
    text = path.read_text()
    assert "## day1/12-00-00" in text and "## day2/12-00-00" in text


@pytest.mark.parametrize("case", ["no_dir", "no_file", "empty_file", "header_only"])
def test_missing_or_empty_metrics_is_exit_2(tmp_path, caplog, case):
    run = tmp_path / "run"
    if case != "no_dir":
        run.mkdir()
    if case == "empty_file":
        (run / "metrics.csv").write_text("")
    if case == "header_only":
        (run / "metrics.csv").write_text(HEADER + "\n")
    with caplog.at_level(logging.ERROR, logger="bitrain.report"):
        assert report.main([str(run)]) == 2
    assert str(run) in caplog.text
    with pytest.raises(report.ReportError, match="run"):
        report.read_metrics(run)


def _write_sweep_run(path, lr, top1s):
    """A fine-tuning run of an lr sweep: val/top1 at steps 3, 7, ...; Hydra's overrides file."""
    path.mkdir(parents=True)
    rows = ["epoch,step,train/loss,val/top1"]
    for i, top1 in enumerate(top1s):
        rows.append(f"{i},{4 * i + 3},{2.0 - 0.1 * i},")
        rows.append(f"{i},{4 * i + 3},,{top1}")
    (path / "metrics.csv").write_text("\n".join(rows) + "\n")
    (path / ".hydra").mkdir()
    (path / ".hydra" / "overrides.yaml").write_text(f"- optim.lr={lr}\n- trainer.max_steps=12\n")
    return path


def test_sweep_comparison_names_the_best_lr(tmp_path, caplog):
    runs = [
        _write_sweep_run(tmp_path / "sweep" / "0", 0.002, [0.2, 0.4, 0.5]),
        _write_sweep_run(tmp_path / "sweep" / "1", 0.003, [0.3, 0.6, 0.55]),  # best at step 7
        _write_sweep_run(tmp_path / "sweep" / "2", 0.004, [0.1, 0.2, 0.3]),
    ]
    out = tmp_path / "report"
    with caplog.at_level(logging.INFO, logger="bitrain.report"):
        assert report.main([*map(str, runs), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Comparison: val/top1 (higher is better)" in text
    assert "| 1 | `optim.lr=0.003` | 0.6 | 7 | 0.55 |" in text
    assert "**Best: optim.lr=0.003** (val/top1 0.6 at step 7" in text
    assert "trainer.max_steps" not in text.split("## 0")[0]  # shared overrides are not listed
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best val/top1: 0.6 (optim.lr=0.003" in caplog.text
    # Lower is better for a loss; the direction can be forced.
    cmp = report.compare([report.read_metrics(r) for r in runs], "train/loss")
    assert not cmp.higher_is_better and cmp.winner.name in {"0", "1", "2"}
    assert report.main([*map(str, runs), "--out", str(out), "--metric", "val/top5"]) == 2
