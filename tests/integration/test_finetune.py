"""Fine-tuning end to end on CPU: from a MIM checkpoint, from scratch, resume, no checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitrain.checkpoints import load_encoder_state, save_mim_model
from bitrain.models.beit import BeitMIM
from bitrain.training import runner

pytestmark = pytest.mark.slow

FAST = [
    "data.batch_size=16",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.max_steps=6",
    "trainer.check_val_every_n_epoch=1",
    "trainer.val_check_interval=3",
    "+trainer.limit_val_batches=2",
    "callbacks.model_checkpoint.every_n_train_steps=100",
]


@pytest.fixture(scope="module")
def demo_mim_ckpt(tmp_path_factory):
    """A random BeitMIM of the demo's shapes, saved as a bitrain pretraining checkpoint."""
    torch.manual_seed(0)
    model = BeitMIM(
        img_size=32, patch_size=4, vocab_size=512, embed_dim=192, depth=4, num_heads=3,
        drop_path_rate=0.0, init_values=0.1, init_std=0.04,
    )  # fmt: skip
    return save_mim_model(model, tmp_path_factory.mktemp("mim") / "last.ckpt"), model


def test_finetune_from_mim_checkpoint_then_resume(compose_cfg, demo_mim_ckpt, tmp_path):
    ckpt, mim = demo_mim_ckpt
    run = tmp_path / "run"
    summary = runner.train(compose_cfg("finetune", [*FAST, f"model.pretrained={ckpt}"], run))
    assert summary["global_step"] == 6
    assert 0.0 <= summary["metrics"]["val/top1"] <= 1.0
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["label_names"] == [str(d) for d in range(10)]
    assert saved["hyper_parameters"]["model"]["pretrained"] == str(ckpt)
    state, fmt = load_encoder_state(run / "checkpoints" / "last.ckpt")
    assert fmt == "bitrain" and state["head.weight"].shape == (10, 192)
    # Resume the same run to 8 steps: continues at step 6.
    more = compose_cfg("finetune", [*FAST, f"model.pretrained={ckpt}", "trainer.max_steps=8",
                                    "ckpt_path=auto"], run)  # fmt: skip
    assert runner.train(more)["global_step"] == 8


def test_scratch_and_pretrained_differ_only_in_init(compose_cfg, demo_mim_ckpt, tmp_path):
    ckpt, mim = demo_mim_ckpt
    cfg_pre = compose_cfg("finetune", [*FAST, f"model.pretrained={ckpt}"], tmp_path / "a")
    cfg_scr = compose_cfg("finetune", [*FAST, "model.pretrained=null"], tmp_path / "b")
    _, task_pre, _ = runner.build(cfg_pre)
    _, task_scr, _ = runner.build(cfg_scr)
    w_pre = task_pre.model.blocks[0].mlp.fc1.weight
    assert torch.equal(w_pre, mim.blocks[0].mlp.fc1.weight)
    assert not torch.equal(task_scr.model.blocks[0].mlp.fc1.weight, w_pre)


def test_finetune_without_pretraining_says_what_to_run(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "bitrain.finetune", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "no pretrain checkpoint" in err and "make demo" in err, err[-2000:]
    assert not list(Path(tmp_path).glob("outputs/finetune/*/*/checkpoints"))


def _last_validation(run: Path) -> dict[str, float]:
    """The run's last logged validation, as metrics.csv holds it."""
    import csv

    with open(run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/top1")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


def test_evaluate_reproduces_the_last_validation(compose_cfg, demo_mim_ckpt, tmp_path):
    """python -m bitrain.evaluate on a fine-tuning checkpoint: exactly the run's last val/*.

    evaluate runs the fine-tuning task's own validation (Trainer.validate), so on the same data
    and batch size its top-1, top-5 and loss are the numbers the run logged, to the last bit; the
    EMA weights (use_ema=true) give the run's val/ema_top1 and val/ema_top5.
    """
    import csv
    import json

    from bitrain.evaluation.validation import evaluate

    ckpt, _ = demo_mim_ckpt
    run = tmp_path / "ft"
    overrides = [o for o in FAST if "val" not in o and "max_steps" not in o]
    cfg = compose_cfg(
        "finetune",
        [*overrides, f"model.pretrained={ckpt}", "trainer.max_steps=8",
         "trainer.check_val_every_n_epoch=1", "task.ema={decay: 0.5}"],
        run,
    )  # fmt: skip
    runner.train(cfg)  # 8 steps = one epoch of 130 images at batch 16: full validation
    logged = _last_validation(run)
    env = {**os.environ, "WANDB_MODE": "offline"}
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "bitrain.evaluate", f"ckpt_path={run}/checkpoints/last.ckpt",
         f"hydra.run.dir={out}", "log_every_n_batches=1", "data.batch_size=16"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch 1/32" in proc.stdout and "running top-1" in proc.stdout  # progress lines
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 500
    got = {"val/top1": metrics["top1"], "val/top5": metrics["top5"], "val/loss": metrics["loss"]}
    assert got == {k: logged[k] for k in got}, (got, logged)
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 1
    with open(out / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [str(d) for d in range(10)]
    assert sum(int(r["count"]) for r in rows) == 500
    # Overall top-1 is the share of correct images: the per-class counts add up to it exactly.
    assert sum(int(r["correct"]) for r in rows) == round(metrics["top1"] * 500)
    assert metrics["top1"] * 500 == pytest.approx(round(metrics["top1"] * 500), abs=1e-3)
    # The EMA weights, in process: the run's EMA validation.
    ema = evaluate(
        compose_cfg(
            "evaluate",
            [f"ckpt_path={run}/checkpoints/last.ckpt", "use_ema=true", "data.batch_size=16"],
            tmp_path / "eval_ema",
        )
    )
    assert (ema["top1"], ema["top5"]) == (logged["val/ema_top1"], logged["val/ema_top5"])


def test_evaluate_refuses_a_pretraining_checkpoint(demo_mim_ckpt, tmp_path):
    from bitrain.checkpoints import load_classifier
    from bitrain.io import CheckpointError

    ckpt, _ = demo_mim_ckpt
    with pytest.raises(CheckpointError, match="pretraining .* not a classifier"):
        load_classifier(ckpt)


def test_predict_prints_top_k_and_survives_a_bad_file(compose_cfg, demo_mim_ckpt, tmp_path):
    import json

    from bitrain.data.demo import DemoSource

    ckpt, _ = demo_mim_ckpt
    run = tmp_path / "ft"
    runner.train(compose_cfg("finetune", [*FAST, f"model.pretrained={ckpt}"], run))
    images = tmp_path / "images"
    images.mkdir()
    test = DemoSource("test")
    for i in range(3):
        test[i][0].save(images / f"digit_{i}.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "preds.json"
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "bitrain.predict", f"ckpt_path={run}/checkpoints/last.ckpt",
         f"images={images}", "top_k=3", f"output={out}", f"hydra.run.dir={tmp_path / 'p'}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(str(images))]
    assert len(lines) == 4 and any("broken.jpg: ERROR" in ln for ln in lines)
    results = json.loads(out.read_text())
    good = [r for r in results if "error" not in r]
    assert len(good) == 3 and all(len(r["top"]) == 3 for r in good)
    for r in good:
        probs = [t["prob"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(t["label"] in [str(d) for d in range(10)] for t in r["top"])
