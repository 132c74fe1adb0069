"""Run directories from the command line: no fresh start over an earlier run, unusable dirs named.

Both refusals happen before Hydra writes anything (``bitrain.training.rundir.RunDirCheck``):
the earlier run's metrics.csv, checkpoints, ``.hydra/`` and log file stay byte for byte as they
were.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitrain.training import runner
from bitrain.training.rundir import RunDirError

pytestmark = pytest.mark.slow

FAST = [
    "data.num_workers=0",
    "data.batch_size=8",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.panels=null",
    "trainer.check_val_every_n_epoch=100",
]
ENV = {**os.environ, "WANDB_MODE": "offline"}


def _pretrain(run: Path, tokenizer: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "bitrain.pretrain",
        *FAST,
        f"tokenizer.weights_path={tokenizer}",
        f"hydra.run.dir={run}",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def _steps(run: Path) -> list[int]:
    with open(run / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_fresh_start_in_an_earlier_runs_directory_is_refused_then_auto_resumes(
    demo_tokenizer_file, tmp_path
):
    run = tmp_path / "run"
    first = _pretrain(run, demo_tokenizer_file, "trainer.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(run)
    assert {"metrics.csv", ".hydra/config.yaml", "pretrain.log", "checkpoints/last.ckpt"} <= set(
        before
    )

    again = _pretrain(run, demo_tokenizer_file, "trainer.max_steps=2")
    assert again.returncode != 0
    out = again.stdout + again.stderr
    assert "already holds a run" in out and "ckpt_path=auto" in out and "paths.run_name" in out
    assert "Traceback" not in out, out
    assert _snapshot(run) == before  # nothing written: not even .hydra/ or the log

    resumed = _pretrain(run, demo_tokenizer_file, "trainer.max_steps=5", "ckpt_path=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _steps(run) == [0, 1, 2, 3, 4]


def test_fresh_start_over_an_earlier_run_is_refused_without_hydra_main(
    compose_cfg, demo_tokenizer_file, tmp_path
):
    common = [*FAST, f"tokenizer.weights_path={demo_tokenizer_file}", "trainer.max_steps=2"]
    runner.train(compose_cfg("pretrain", common, tmp_path))
    rows = (tmp_path / "metrics.csv").read_text()
    with pytest.raises(RunDirError, match="ckpt_path=auto"):
        runner.train(compose_cfg("pretrain", common, tmp_path))
    assert (tmp_path / "metrics.csv").read_text() == rows


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_an_unusable_run_dir_is_one_clear_line(demo_tokenizer_file, tmp_path, where):
    if where == "under_a_file":
        run, reason = demo_tokenizer_file / "run", f"'{demo_tokenizer_file}' is a file"
    else:
        run, reason = Path("/proc/bitrain-test/run"), "/proc is the kernel's"
    done = _pretrain(run, demo_tokenizer_file)
    assert done.returncode == 1
    out = (done.stdout + done.stderr).strip()
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert f"cannot write the run directory '{run}'" in out and reason in out, out
