"""Faults a long run meets: NaN losses (skipped, counted, then fatal) and corrupt checkpoints."""

import logging
import math

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
    "+trainer.limit_train_batches=2",
    "trainer.check_val_every_n_epoch=100",
]


class PoisonBatches(L.Callback):
    """Replaces the encoder's images of the given training batches (counted from 0) by NaN."""

    def __init__(self, batches: set[int]) -> None:
        self.batches = batches
        self.seen = 0
        self.params_around: dict[int, tuple[dict, dict]] = {}
        self._before: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        if self.seen in self.batches:
            # Float NaN images (the loader's uint8 views cannot hold NaN; float views are used as
            # they are by the task).
            images = batch["images"]
            batch["images"] = torch.full(images.shape, float("nan"), device=images.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        self.params_around[self.seen] = (self._before, after)
        self.seen += 1


class FirstStep(L.Callback):
    """Records the global step a fit starts at (the resumed checkpoint's step)."""

    start: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = trainer.global_step


@pytest.mark.parametrize("check", ["sync", "device"])
def test_nonfinite_losses_are_skipped_and_counted(
    compose_cfg, demo_tokenizer_file, tmp_path, check
):
    """sync: skipped on the host; device: fused AdamW's found_inf skips it, no host sync."""
    overrides = [
        *FAST,
        f"tokenizer.weights_path={demo_tokenizer_file}",
        "trainer.max_steps=4",
        "task.max_nonfinite_steps=2",
        f"task.nonfinite_check={check}",
    ]
    poison = PoisonBatches({1, 2})
    summary = runner.train(compose_cfg("pretrain", overrides, tmp_path), callbacks=[poison])
    assert summary["global_step"] == 4
    assert summary["metrics"]["train/nonfinite_steps"] == 2
    for i in (1, 2):  # skipped: weights (and so AdamW's update) untouched
        before, after = poison.params_around[i]
        assert all(torch.equal(before[k], after[k]) for k in before), i
    before, after = poison.params_around[3]  # a normal batch afterwards still trains
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["nonfinite_steps"] == 2
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )
    assert math.isfinite(summary["metrics"]["train/loss"])


@pytest.mark.parametrize("check", ["sync", "device"])
def test_too_many_nonfinite_losses_stop_the_run(compose_cfg, demo_tokenizer_file, tmp_path, check):
    cfg = compose_cfg(
        "pretrain",
        [
            *FAST,
            f"tokenizer.weights_path={demo_tokenizer_file}",
            "trainer.max_steps=4",
            "task.max_nonfinite_steps=1",
            f"task.nonfinite_check={check}",
        ],
        tmp_path,
    )
    with pytest.raises(
        FloatingPointError, match=r"at step \d+: 2 steps .*max_nonfinite_steps=1"
    ) as e:
        runner.train(cfg, callbacks=[PoisonBatches({1, 2})])
    assert "images (8, 3, 32, 32) no finite values" in str(e.value)


@pytest.mark.parametrize(
    "config,check", [("pretrain", "sync"), ("pretrain", "device"), ("finetune", "sync")]
)
def test_a_run_whose_every_step_is_skipped_fails(
    compose_cfg, demo_tokenizer_file, tmp_path, config, check
):
    """Fewer skipped steps than max_nonfinite_steps, but not one trained: not a success."""
    extra = (
        [f"tokenizer.weights_path={demo_tokenizer_file}"]
        if config == "pretrain"
        else ["model.pretrained=null", "data.num_workers=0"]
    )
    overrides = [
        *FAST,
        *extra,
        "trainer.max_steps=3",
        "task.max_nonfinite_steps=10",
        f"task.nonfinite_check={check}",
    ]
    with pytest.raises(FloatingPointError, match=r"every training step .*\(steps 0 to 2\)"):
        runner.train(compose_cfg(config, overrides, tmp_path), callbacks=[PoisonBatches({0, 1, 2})])


def test_auto_resume_falls_back_from_truncated_last_ckpt(
    compose_cfg, demo_tokenizer_file, tmp_path, caplog
):
    common = [
        *FAST,
        f"tokenizer.weights_path={demo_tokenizer_file}",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    summary = runner.train(compose_cfg("pretrain", [*common, "trainer.max_steps=4"], tmp_path))
    ckpts = tmp_path / "checkpoints"
    assert summary["global_step"] == 4
    assert (ckpts / "step_0000004.ckpt").is_file() and (ckpts / "last.ckpt").is_file()
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # a copy cut short (not bitrain's atomic writes)
    # Remove the newest step file too, so the resumed step proves which file was used.
    (ckpts / "step_0000004.ckpt").unlink()

    first = FirstStep()
    cfg = compose_cfg("pretrain", [*common, "trainer.max_steps=6", "ckpt_path=auto"], tmp_path)
    with caplog.at_level(logging.INFO, logger="bitrain.training"):
        summary = runner.train(cfg, callbacks=[first])
    assert "skipping unreadable checkpoint" in caplog.text and "last.ckpt" in caplog.text
    assert first.start == 2  # resumed from step_0000002.ckpt
    assert summary["global_step"] == 6
    # Lightning does not overwrite a last.ckpt it did not write: it writes last-v1.ckpt, which the
    # next ckpt_path=auto must pick (newest last* file) rather than the step files or last.ckpt.
    newest = runner.resolve_ckpt_path("auto", ckpts)
    assert torch.load(newest, weights_only=True)["global_step"] == 6, newest


def test_auto_in_an_empty_run_dir_starts_fresh(compose_cfg, demo_tokenizer_file, tmp_path):
    cfg = compose_cfg(
        "pretrain",
        [
            *FAST,
            f"tokenizer.weights_path={demo_tokenizer_file}",
            "trainer.max_steps=1",
            "ckpt_path=auto",
        ],
        tmp_path,
    )
    first = FirstStep()
    assert runner.train(cfg, callbacks=[first])["global_step"] == 1
    assert first.start == 0


def test_device_skip_with_accumulation_skips_the_whole_step(
    compose_cfg, demo_tokenizer_file, tmp_path
):
    """A NaN in the 1st of 2 accumulated micro-batches (the 2nd is finite) skips the step."""
    overrides = [
        *FAST,
        f"tokenizer.weights_path={demo_tokenizer_file}",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=2",
        "task.nonfinite_check=device",
    ]
    poison = PoisonBatches({0})
    summary = runner.train(compose_cfg("pretrain", overrides, tmp_path), callbacks=[poison])
    assert summary["global_step"] == 2
    before, _ = poison.params_around[0]
    _, after = poison.params_around[1]  # micro-batches 0 and 1 = optimizer step 0: skipped
    assert all(torch.equal(before[k], after[k]) for k in before)
    before, after = poison.params_around[3]  # step 1 (micro-batches 2 and 3) trains
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["nonfinite_steps"] == 1
