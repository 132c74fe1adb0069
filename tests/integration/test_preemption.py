"""Preemption: SIGTERM or Ctrl-C mid-epoch: a checkpoint, exit 143 / 130; the resume continues."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from bitrain.callbacks.preemption import SIGTERM_EXIT_CODE
from bitrain.training import runner

pytestmark = pytest.mark.slow

FAST = [
    "data.num_workers=0",
    "data.batch_size=8",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "model.drop_path_rate=0.1",  # randomness in the model too: RNG states must be restored
    "trainer.max_steps=8",
    "+trainer.limit_train_batches=6",  # epochs of 6 steps: a stop at step 3 is mid-epoch
    "callbacks.model_checkpoint.every_n_train_steps=100",  # only the SIGTERM checkpoint
    "callbacks.panels=null",
]


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {
            int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")
        }


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after ``step`` optimizer steps, as a scheduler would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_mid_epoch_then_auto_resume_equals_uninterrupted(
    compose_cfg, demo_tokenizer_file, tmp_path
):
    common = [*FAST, f"tokenizer.weights_path={demo_tokenizer_file}"]
    straight = tmp_path / "straight"
    runner.train(compose_cfg("pretrain", common, straight))

    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        runner.train(compose_cfg("pretrain", common, run), callbacks=[SigtermAt(3)])
    assert exc.value.code == SIGTERM_EXIT_CODE
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert sorted(_losses(run)) == [0, 1, 2]

    summary = runner.train(compose_cfg("pretrain", [*common, "ckpt_path=auto"], run))
    assert summary["global_step"] == 8
    # One metrics.csv for the whole run: the rows before the preemption are kept.
    a, b = _losses(straight), _losses(run)
    assert sorted(b) == list(range(8)), b
    for step in range(8):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)


def _pretrain_cmd(run_dir: Path, tokenizer: Path, *extra: str) -> list[str]:
    drop = ("enable_progress_bar", "limit_train_batches", "max_steps")
    overrides = [o for o in FAST if not any(d in o for d in drop)]
    return [
        sys.executable,
        "-m",
        "bitrain.pretrain",
        *overrides,
        f"tokenizer.weights_path={tokenizer}",
        f"hydra.run.dir={run_dir}",
        "callbacks.progress_bar.style=lines",
        "callbacks.progress_bar.every_n_steps=1",
        *extra,
    ]


def test_external_sigterm_from_the_command_line(demo_tokenizer_file, tmp_path):
    """``kill -TERM`` on a running ``python -m bitrain.pretrain``: exit 143, checkpoint, resume."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    run = tmp_path / "run"
    # Slow the steps down a little so the signal lands in the middle of the run.
    cmd = _pretrain_cmd(
        run, demo_tokenizer_file, "trainer.max_steps=400", "+trainer.limit_train_batches=300"
    )
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 5/"):
            proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines[-30:])
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == SIGTERM_EXIT_CODE, "".join(lines[-20:]) + rest[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    stopped = ckpt["global_step"]
    assert 5 <= stopped < 400
    assert "SIGTERM: checkpoint of step" in rest

    cmd = _pretrain_cmd(
        run,
        demo_tokenizer_file,
        f"trainer.max_steps={stopped + 2}",
        "+trainer.limit_train_batches=300",
        "ckpt_path=auto",
    )
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"training from step {stopped} to {stopped + 2}" in done.stdout
    assert sorted(_losses(run)) == list(range(stopped + 2))


def test_ctrl_c_writes_a_checkpoint_of_the_current_step_and_auto_resumes(
    demo_tokenizer_file, tmp_path
):
    """Ctrl-C in a terminal: SIGINT to the whole process group (data workers included)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    run = tmp_path / "run"
    cmd = _pretrain_cmd(
        run,
        demo_tokenizer_file,
        "trainer.max_steps=400",
        "+trainer.limit_train_batches=300",
        "data.num_workers=2",
    )
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as a foreground job in a terminal
    )
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 5/"):
            os.killpg(proc.pid, signal.SIGINT)
            break
        assert time.monotonic() < deadline, "".join(lines[-30:])
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGINT, "".join(lines[-20:]) + rest[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    stopped = ckpt["global_step"]
    assert 5 <= stopped < 400  # the current step, not the last periodic checkpoint (none)
    assert f"Ctrl-C: checkpoint of step {stopped} written to" in rest, rest[-3000:]
    assert f"training stopped at step {stopped}: Ctrl-C" in rest
    assert "ckpt_path=auto" in rest

    cmd = _pretrain_cmd(
        run,
        demo_tokenizer_file,
        f"trainer.max_steps={stopped + 2}",
        "+trainer.limit_train_batches=300",
        "ckpt_path=auto",
    )
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"training from step {stopped} to {stopped + 2}" in done.stdout
    assert sorted(_losses(run)) == list(range(stopped + 2))
