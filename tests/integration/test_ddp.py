"""DDP on 2 CPU processes (gloo): disjoint data per rank; same weights as 1 process, same batch.

The 2-process runs are the command line (Lightning starts the second rank); the 1-process
reference runs in the test's process (``runner.train``, what the command calls).
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bitrain.training import runner

pytestmark = pytest.mark.slow

RECORDER = textwrap.dedent(
    '''
    """Test helper: each rank writes the (epoch, index) keys its sampler gives it."""
    import json, os
    import lightning as L


    class RecordSamples(L.Callback):
        def __init__(self, out_dir):
            self.out_dir = out_dir

        def on_train_epoch_start(self, trainer, pl_module):
            loader = trainer.train_dataloader
            sampler = loader.sampler
            keys = [list(k) for k in sampler]
            name = f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.json"
            path = os.path.join(self.out_dir, name)
            with open(path, "w") as f:
                json.dump({"sampler": type(sampler).__name__, "world": trainer.world_size,
                           "batch_size": loader.batch_size, "keys": keys}, f)
    '''
)


def _overrides(tokenizer: Path | None, entry: str) -> list[str]:
    return [
        *([f"tokenizer.weights_path={tokenizer}"] if tokenizer else []),
        "trainer.max_steps=6",
        "trainer.check_val_every_n_epoch=100",
        "trainer.precision=32-true",
        "trainer.benchmark=false",
        "trainer.accelerator=cpu",
        "data.num_workers=0",
        "logger=csv",
        *(["callbacks.panels=null"] if entry == "pretrain" else []),
        "callbacks.progress_bar.style=lines",
    ]


def _run(
    tmp_path: Path, name: str, tokenizer: Path | None, overrides: list[str], entry="pretrain"
) -> Path:
    """The command line (``trainer=ddp`` starts its processes), each rank recording its samples."""
    run = tmp_path / name
    rec = tmp_path / f"{name}_samples"
    rec.mkdir()
    cmd = [
        sys.executable,
        "-m",
        f"bitrain.{entry}",
        f"hydra.run.dir={run}",
        *_overrides(tokenizer, entry),
        "+callbacks.record._target_=recorder.RecordSamples",
        f"+callbacks.record.out_dir={rec}",
        *overrides,
    ]
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run


def _run_one_process(
    compose_cfg, tmp_path: Path, tokenizer: Path | None, overrides: list[str], entry="pretrain"
) -> Path:
    """The one-process reference, in this process (the same runner.train the command calls)."""
    spec = importlib.util.spec_from_file_location("recorder", tmp_path / "recorder.py")
    recorder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recorder)
    run, rec = tmp_path / "one", tmp_path / "one_samples"
    rec.mkdir()
    cfg = compose_cfg(entry, [*_overrides(tokenizer, entry), *overrides], run)
    runner.train(cfg, callbacks=[recorder.RecordSamples(str(rec))])
    return run


def test_two_gloo_processes_match_one_process(compose_cfg, demo_tokenizer_file, tmp_path):
    (tmp_path / "recorder.py").write_text(RECORDER)
    one = _run_one_process(compose_cfg, tmp_path, demo_tokenizer_file, ["data.batch_size=16"])
    two = _run(
        tmp_path,
        "two",
        demo_tokenizer_file,
        ["trainer=ddp", "trainer.devices=2", "data.batch_size=8", "trainer.precision=32-true"],
    )
    # Each rank drew its own half of the epoch: disjoint, together the single process's order.
    ranks = [
        json.loads((tmp_path / "two_samples" / f"rank{r}_epoch0.json").read_text()) for r in (0, 1)
    ]
    single = json.loads((tmp_path / "one_samples" / "rank0_epoch0.json").read_text())
    assert all(r["sampler"] == "EpochSampler" and r["world"] == 2 for r in ranks)
    keys0 = {tuple(k) for k in ranks[0]["keys"]}
    keys1 = {tuple(k) for k in ranks[1]["keys"]}
    assert keys0 and not keys0 & keys1
    everything = {tuple(k) for k in single["keys"]}
    # drop_last: the tail that does not split over the ranks (1,297 = 2 x 648 + 1) is left out.
    assert keys0 | keys1 <= everything and len(everything) - len(keys0 | keys1) < 2
    # Step t's global batch is the same 16 samples both ways (interleaved ranks).
    first = [tuple(k) for k in single["keys"][:16]]
    assert set(first) == {tuple(k) for r in ranks for k in r["keys"][:8]}

    a = torch.load(one / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(two / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    diffs = {
        k: (a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"]
    }
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-4, (worst, diffs[worst])
    moved = (a["state_dict"]["model.lm_head.weight"] - 0).abs().sum()
    assert moved > 0


def test_finetuning_on_two_gloo_processes_matches_one(compose_cfg, tmp_path):
    (tmp_path / "recorder.py").write_text(RECORDER)
    common = ["model.pretrained=null", "model.drop_path_rate=0.0"]
    one = _run_one_process(
        compose_cfg, tmp_path, None, [*common, "data.batch_size=16"], entry="finetune"
    )
    two = _run(
        tmp_path,
        "two",
        None,
        [*common, "trainer=ddp", "trainer.devices=2", "data.batch_size=8"],
        entry="finetune",
    )
    ranks = [
        json.loads((tmp_path / "two_samples" / f"rank{r}_epoch0.json").read_text()) for r in (0, 1)
    ]
    keys0 = {tuple(k) for k in ranks[0]["keys"]}
    keys1 = {tuple(k) for k in ranks[1]["keys"]}
    assert keys0 and not keys0 & keys1 and len(keys0 | keys1) == 130
    a = torch.load(one / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(two / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    assert a["label_names"] == b["label_names"] == [str(d) for d in range(10)]
    keys = [k for k in a["state_dict"] if k.startswith("model.")]
    diffs = {k: (a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in keys}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-4, (worst, diffs[worst])
