"""The private torch / Lightning APIs bitrain still uses, pinned: each test fails on an upgrade that
changes one, with a message naming the API, where bitrain uses it and what to check.

* ``optimizer.found_inf`` / ``_step_supports_amp_scaling`` of torch's fused Adam(W) / SGD
  (:class:`bitrain.tasks.common.NonFiniteGuard`: the on-device skip of NaN steps);
* ``Precision.clip_gradients`` called unbound on a ``MixedPrecision`` plugin
  (``NonFiniteGuard.configure_gradient_clipping``: clipping under bf16 with a fused optimizer);
* ``lightning.pytorch.loggers.csv_logs.ExperimentWriter`` internals
  (:class:`bitrain.training.loggers.CSVLogger`: ``metrics.csv`` continued on resume);
* ``trainer._signal_connector.received_sigterm``
  (:class:`bitrain.callbacks.preemption.PreemptionCheckpoint`: Ctrl-C stops as SIGTERM does);
* ``trainer.fit_loop.epoch_loop.batch_progress.current.processed`` (the mid-epoch resume
  position, bitrain/data/datamodule.py) and ``LightningModule._trainer`` / ``ProgressBar._trainer``
  ("attached to a trainer?" in the tasks and LineProgress);
* ``torch._assert_async`` (the mask count of BeitMIM on CUDA, bitrain/models/beit.py).
"""

from __future__ import annotations

import csv
import inspect

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader

from bitrain.callbacks.progress import LineProgress
from bitrain.training.loggers import CSVLogger, _ResumableWriter

UPGRADE = f"torch {torch.__version__} / lightning {L.__version__}"


def _fused(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.1, weight_decay=0.05, fused=True)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_optimizers_skip_the_step_that_found_inf_flags(name):
    """NonFiniteGuard._flag_on_device sets ``optimizer.found_inf`` (1.0: skip) instead of a host
    sync; torch's fused kernels read it (torch 2.14.1: torch/optim/adam.py:268, sgd.py:141,
    ``found_inf=getattr(self, "found_inf", None)``)."""
    where = (
        f"torch.optim.{'AdamW' if name == 'adamw' else 'SGD'}(fused=True) with "
        f"optimizer.found_inf ({UPGRADE})"
    )
    param = nn.Parameter(torch.randn(4, 3))
    opt = _fused(name, [param])
    assert getattr(opt, "_step_supports_amp_scaling", False) is True, (
        f"{where}: the fused optimizer no longer sets _step_supports_amp_scaling, which "
        "NonFiniteGuard._skips_on_device reads to pick the on-device skip. Check how the new "
        "torch marks optimizers that take found_inf and adapt bitrain/tasks/common.py"
    )
    before = param.detach().clone()
    param.grad = torch.randn(4, 3)
    opt.found_inf = torch.ones(())
    opt.step()
    assert torch.equal(param.detach(), before), (
        f"{where}: a step with found_inf=1 changed the weights. bitrain's on-device NaN skip "
        "(task.nonfinite_check=device, and auto on CUDA) relies on the fused kernel skipping "
        "such a step; check torch/optim/{adam,sgd}.py for found_inf, or make 'auto' choose "
        "'sync' in bitrain/tasks/common.py"
    )
    if name == "adamw":
        state = opt.state[param]
        assert float(state["step"]) == 0 and not state["exp_avg"].any(), (
            f"{where}: a skipped step advanced the step count or the moments"
        )
    opt.found_inf = torch.zeros(())
    opt.step()
    assert not torch.equal(param.detach(), before), (
        f"{where}: found_inf=0 no longer lets the step through"
    )


def test_non_fused_optimizers_do_not_take_found_inf():
    """Why NonFiniteGuard sets found_inf only for a fused optimizer: the others refuse it."""
    param = nn.Parameter(torch.randn(3))
    param.grad = torch.randn(3)
    opt = torch.optim.AdamW([param], lr=0.1, foreach=False)
    assert not getattr(opt, "_step_supports_amp_scaling", False), (
        f"non-fused AdamW now claims _step_supports_amp_scaling ({UPGRADE}): check whether it "
        "takes found_inf, and NonFiniteGuard._skips_on_device in bitrain/tasks/common.py"
    )
    opt.found_inf = torch.ones(())
    with pytest.raises((AssertionError, RuntimeError)):
        opt.step()


def _clip_setup():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(4))]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    return params, torch.optim.AdamW(params, lr=0.1, fused=True)


def test_precision_clip_gradients_called_unbound_clips_a_fused_optimizer_under_bf16():
    """NonFiniteGuard.configure_gradient_clipping calls ``Precision.clip_gradients(plugin, ...)``
    on the bf16 MixedPrecision plugin, skipping MixedPrecision's refusal (meant for fp16's grad
    scaler, which bf16 does not have)."""
    where = (
        f"lightning Precision.clip_gradients(plugin, optimizer, clip_val, algorithm) ({UPGRADE})"
    )
    signature = list(inspect.signature(Precision.clip_gradients).parameters)
    assert signature[:4] == ["self", "optimizer", "clip_val", "gradient_clip_algorithm"], (
        f"{where}: the signature changed to {signature}; adapt the call in "
        "bitrain/tasks/common.py NonFiniteGuard.configure_gradient_clipping"
    )
    plugin = MixedPrecision("bf16-mixed", "cpu")
    assert getattr(plugin, "scaler", None) is None, f"{where}: bf16-mixed has a grad scaler now"

    params, opt = _clip_setup()
    # torch.nn.utils.clip_grad_norm_'s rule, restated: scale by max_norm / (total norm + 1e-6).
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    reference = [p.grad * min(1.0, float(1.0 / (total + 1e-6))) for p in params]

    Precision.clip_gradients(plugin, opt, 1.0, GradClipAlgorithmType.NORM)
    for got, want in zip((p.grad for p in params), reference, strict=True):
        torch.testing.assert_close(got, want, msg=f"{where}: no longer clips by the global norm")

    params, opt = _clip_setup()
    try:
        plugin.clip_gradients(opt, 1.0, GradClipAlgorithmType.NORM)
    except RuntimeError as err:
        assert "fused" in str(err), f"{where}: MixedPrecision refuses for another reason: {err}"
    else:
        pytest.fail(
            f"MixedPrecision.clip_gradients now clips a fused optimizer under bf16 itself "
            f"({UPGRADE}): the override NonFiniteGuard.configure_gradient_clipping "
            "(bitrain/tasks/common.py) is no longer needed; remove it and this check"
        )


def _write_metrics(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["loss", "step"])
        writer.writeheader()
        writer.writerows(rows)


def test_experiment_writer_internals_the_resumable_csv_logger_overrides(tmp_path):
    """bitrain.training.loggers._ResumableWriter overrides ``_check_log_dir_exists`` (called by
    ``__init__`` once ``_fs`` and ``metrics_file_path`` are set) and fills ``metrics_keys`` from
    the existing file, so that ``save()`` appends under the same header."""
    where = f"lightning.pytorch.loggers.csv_logs.ExperimentWriter ({UPGRADE})"
    fix = (
        "adapt bitrain/training/loggers.py (_ResumableWriter) and check tests/unit/test_loggers.py"
    )
    rows = [{"loss": 1.0, "step": 0}, {"loss": 0.5, "step": 1}]

    # Lightning's own writer deletes an existing metrics.csv: the reason for the override.
    _write_metrics(tmp_path / "plain" / "metrics.csv", rows)
    ExperimentWriter(log_dir=str(tmp_path / "plain"))
    assert not (tmp_path / "plain" / "metrics.csv").exists(), (
        f"{where} no longer deletes an existing metrics.csv: bitrain's CSVLogger override may "
        f"be unnecessary now; {fix}"
    )

    _write_metrics(tmp_path / "run" / "metrics.csv", rows)
    calls = []

    class Probe(_ResumableWriter):
        def _check_log_dir_exists(self) -> None:
            calls.append((getattr(self, "_fs", None), getattr(self, "metrics_file_path", None)))
            super()._check_log_dir_exists()

    writer = Probe(log_dir=str(tmp_path / "run"))
    assert len(calls) == 1 and calls[0][0] is not None, (
        f"{where}.__init__ no longer calls _check_log_dir_exists() after setting _fs; {fix}"
    )
    assert calls[0][1] == str(tmp_path / "run" / "metrics.csv"), (
        f"{where}: metrics_file_path is {calls[0][1]!r} when _check_log_dir_exists runs; {fix}"
    )
    assert writer.metrics_keys == ["loss", "step"], (
        f"{where}: metrics_keys ({writer.metrics_keys}) is not the header bitrain read; {fix}"
    )
    writer.log_metrics({"loss": 0.25}, step=2)
    writer.save()
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        kept = [(r["loss"], r["step"]) for r in csv.DictReader(f)]
    assert kept == [("1.0", "0"), ("0.5", "1"), ("0.25", "2")], (
        f"{where}.save() no longer appends to an existing file under metrics_keys: {kept}; {fix}"
    )

    logger = CSVLogger(tmp_path / "logger", name="", version="")
    assert logger._experiment is None and isinstance(logger.experiment, _ResumableWriter), (
        f"lightning CSVLogger._experiment / .experiment changed ({UPGRADE}); {fix}"
    )


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _StopAt(L.Callback):
    """Sets what PreemptionCheckpoint's Ctrl-C handler sets, during the given batch."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            trainer._signal_connector.received_sigterm = True


def test_received_sigterm_stops_training_after_the_current_batch(tmp_path):
    """PreemptionCheckpoint's Ctrl-C handler sets ``trainer._signal_connector.received_sigterm``
    so that Lightning stops as on SIGTERM: at the end of the batch, with SIGTERMException."""
    where = f"lightning trainer._signal_connector.received_sigterm ({UPGRADE})"
    trainer = L.Trainer(
        max_steps=10,
        callbacks=[_StopAt(batch=2)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    assert trainer._signal_connector.received_sigterm is False, f"{where}: no such attribute"
    try:
        trainer.fit(_Tiny(), train_dataloaders=DataLoader(torch.randn(40, 2), batch_size=2))
    except SIGTERMException:
        pass
    else:
        pytest.fail(
            f"{where}: setting it no longer stops training with SIGTERMException; Ctrl-C would "
            "then not write last.ckpt. Check how the new Lightning notes SIGTERM and adapt "
            "bitrain/callbacks/preemption.py (on_sigint)"
        )
    assert trainer.received_sigterm, f"{where}: Trainer.received_sigterm does not read it"
    assert trainer.global_step == 3, (
        f"{where}: training stopped at step {trainer.global_step}, not at the end of the batch "
        "during which the flag was set (3)"
    )


class _Probe(L.Callback):
    """Reads, after each training batch, what bitrain's own code reads there."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        current = trainer.fit_loop.epoch_loop.batch_progress.current
        self.seen.append(
            (batch_idx, current.processed, current.completed, pl_module._trainer is trainer)
        )


def test_batch_progress_and_trainer_attachment_read_during_training(tmp_path):
    """``trainer.fit_loop.epoch_loop.batch_progress.current.processed`` is the number of batches
    of the epoch trained on when a checkpoint is written at a batch end (bitrain/data/
    datamodule.py ``state_dict``: the exact mid-epoch resume); ``LightningModule._trainer`` /
    ``Callback``-side ``ProgressBar._trainer`` is how bitrain/tasks/common.py,
    classification.py, tokenizer.py and callbacks/progress.py ask "attached to a trainer?"
    without the ``trainer`` property's error."""
    where = f"lightning loop progress / _trainer ({UPGRADE})"
    module = _Tiny()
    assert module._trainer is None, f"{where}: LightningModule._trainer is gone"
    with pytest.raises(RuntimeError):
        module.trainer  # noqa: B018 - the public property refuses when not attached
    bar = LineProgress()
    assert bar._trainer is None, f"{where}: ProgressBar._trainer is gone (LineProgress.is_enabled)"
    with pytest.raises(TypeError):
        bar.trainer  # noqa: B018
    probe = _Probe()
    trainer = L.Trainer(
        max_steps=3,
        callbacks=[probe, bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(module, train_dataloaders=DataLoader(torch.randn(40, 2), batch_size=2))
    assert probe.seen == [(0, 1, 0, True), (1, 2, 1, True), (2, 3, 2, True)], (
        f"{where}: batch_progress.current.processed no longer counts the batches trained on at "
        f"on_train_batch_end ({probe.seen}); the mid-epoch resume position saved by "
        "bitrain/data/datamodule.py state_dict would be off; check the new loop's progress "
        "counters"
    )
    assert bar._trainer is trainer, (
        f"{where}: ProgressBar._trainer is not the trainer during fit (LineProgress.is_enabled)"
    )


def test_assert_async_refuses_a_false_condition():
    """``torch._assert_async`` checks the mask count of BeitMIM on CUDA without a host sync
    (bitrain/models/beit.py); on a CPU it raises at once, which is what can be checked here."""
    where = f"torch._assert_async ({UPGRADE})"
    assert callable(getattr(torch, "_assert_async", None)), (
        f"{where} is gone: replace it in bitrain/models/beit.py (_check_count_async)"
    )
    torch._assert_async(torch.tensor(True), "fine")
    with pytest.raises(RuntimeError, match="7 masked"):
        torch._assert_async(torch.tensor(False), "an image has not exactly 7 masked patches")
