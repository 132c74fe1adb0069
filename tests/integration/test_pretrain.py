"""Pretraining end to end on CPU: the demo config, resume, and one step of the full BEiT-base."""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from bitrain.training import runner

pytestmark = pytest.mark.slow

FAST = [
    "data.num_workers=0",
    "data.batch_size=8",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {
            int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")
        }


def test_demo_config_trains_and_checkpoints_safely(compose_cfg, demo_tokenizer_file, tmp_path):
    cfg = compose_cfg(
        "pretrain",
        [*FAST, "trainer.max_steps=3", f"tokenizer.weights_path={demo_tokenizer_file}"],
        tmp_path,
    )
    summary = runner.train(cfg)
    assert summary["global_step"] == 3
    ckpt_file = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt_file.is_file()
    ckpt = torch.load(ckpt_file, weights_only=True)  # plain containers only
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith("model.") for k in keys), keys[:5]
    assert "mask_token" in "".join(keys) and "lm_head" in "".join(keys)
    hp = ckpt["hyper_parameters"]
    assert hp["model"]["_target_"] == "bitrain.models.beit.BeitMIM"
    assert "rng_states" in ckpt
    losses = _losses(tmp_path)
    assert sorted(losses) == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


class StopAfter(L.Callback):
    """Stops training after ``steps`` optimizer steps, as a preempted job would."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def test_resume_continues_the_same_run(compose_cfg, demo_tokenizer_file, tmp_path):
    """N steps + resume to 2N logs the same losses as 2N steps straight."""
    common = [
        *FAST,
        f"tokenizer.weights_path={demo_tokenizer_file}",
        "trainer.max_steps=4",
        "+trainer.limit_train_batches=2",  # epochs of 2 steps: the stop lands on an epoch boundary
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "model.drop_path_rate=0.1",  # randomness in the model too: RNG state must be restored
    ]
    straight = tmp_path / "straight"
    runner.train(compose_cfg("pretrain", common, straight))
    first = tmp_path / "first"
    runner.train(compose_cfg("pretrain", common, first), callbacks=[StopAfter(2)])
    ckpt = first / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2
    resumed = tmp_path / "resumed"
    summary = runner.train(compose_cfg("pretrain", [*common, f"ckpt_path={ckpt}"], resumed))
    assert summary["global_step"] == 4
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [2, 3]
    for step in (2, 3):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)


def test_missing_resume_checkpoint_is_a_clear_error(compose_cfg, demo_tokenizer_file, tmp_path):
    cfg = compose_cfg(
        "pretrain",
        [*FAST, f"tokenizer.weights_path={demo_tokenizer_file}", f"ckpt_path={tmp_path}/nope.ckpt"],
        tmp_path,
    )
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        runner.train(cfg)


# Loaded by the command below (+callbacks.probe): what one optimisation step did, as JSON.
STEP_PROBE = textwrap.dedent(
    '''
    """Test helper: the loss of the first training step and which parameters it changed."""
    import json

    import lightning as L
    import torch


    class StepProbe(L.Callback):
        def __init__(self, out):
            self.out = out

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after = dict(pl_module.named_parameters())
            with open(self.out, "w") as f:
                json.dump({
                    "loss": float(outputs["loss"]),
                    "global_step": trainer.global_step,
                    "precision": trainer.precision,
                    "unchanged": [n for n, p in self.before.items() if torch.equal(p, after[n])],
                    "encoder_numel": sum(
                        p.numel() for n, p in after.items() if not n.startswith("model.lm_head")
                    ),
                }, f)
    '''
)


def test_full_beit_base_one_step_from_the_command_line(tmp_path, make_dall_e_encoder_pkl):
    """The README's smoke command: 86M-parameter BEiT-base, full DALL-E encoder, one real step.

    Checkpointing is off (BEiT-base with its AdamW moments is a 1.1 GB last.ckpt; the checkpoint
    path is the tiny-model tests' job): a callback reports the step's loss and what it moved.
    """
    enc = make_dall_e_encoder_pkl(tmp_path / "encoder.pkl")  # full-size random DALL-E encoder
    (tmp_path / "step_probe.py").write_text(STEP_PROBE)
    run_dir, report = tmp_path / "run", tmp_path / "step.json"
    cmd = [
        sys.executable,
        "-m",
        "bitrain.pretrain",
        "+experiment=beit_base",
        "data=synthetic",
        "trainer.max_steps=1",
        "data.global_batch_size=2",
        f"tokenizer.weights_path={enc}",
        f"hydra.run.dir={run_dir}",
        "logger=csv",
        "data.num_workers=0",
        "callbacks.model_checkpoint=null",
        "+trainer.enable_checkpointing=false",
        "+callbacks.probe._target_=step_probe.StepProbe",
        f"+callbacks.probe.out={report}",
    ]
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    step = json.loads(report.read_text())
    assert step["global_step"] == 1 and step["precision"] == "bf16-mixed"
    assert 85e6 < step["encoder_numel"] < 87e6, step["encoder_numel"]  # BEiT-base, 86M
    # A random LM head over 8192 tokens: the cross entropy starts near ln(8192) = 9.01.
    assert math.isfinite(step["loss"]) and abs(step["loss"] - math.log(8192)) < 1.0, step["loss"]
    assert step["unchanged"] == [], step["unchanged"]  # AdamW moved every parameter
    assert not list(run_dir.rglob("*.ckpt"))
