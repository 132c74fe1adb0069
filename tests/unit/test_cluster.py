"""Clusters: run directory names (SLURM requeue), hpc checkpoints found by auto-resume, devices."""

import logging
import os
import re
import signal

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.utilities.exceptions import SIGTERMException

from bitrain.callbacks.preemption import SIGTERM_EXIT_CODE, exit_code_for
from bitrain.training import runner
from bitrain.training.rundir import run_dir_name, slurm_job_id

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def test_slurm_job_id():
    assert slurm_job_id({}) is None
    assert slurm_job_id({"SLURM_JOB_ID": "123"}) == "123"
    env = {"SLURM_JOB_ID": "125", "SLURM_ARRAY_JOB_ID": "120", "SLURM_ARRAY_TASK_ID": "5"}
    assert slurm_job_id(env) == "120_5"
    assert slurm_job_id({"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "bash"}) is None


def test_run_dir_name():
    assert run_dir_name("my-run", {"SLURM_JOB_ID": "9"}) == "my-run"
    assert run_dir_name(None, {"SLURM_JOB_ID": "9"}) == "slurm-9"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", run_dir_name(None, {}))
    assert run_dir_name(None, {}) == run_dir_name(None, {})  # one timestamp per process
    for bad in ("/abs", "../up"):
        with pytest.raises(ValueError, match="run_name"):
            run_dir_name(bad, {})


def test_hydra_run_dir_uses_run_name():
    with initialize_config_dir(config_dir=os.path.abspath(CONFIGS), version_base="1.3"):
        cfg = compose("pretrain", overrides=["paths.run_name=exp1"], return_hydra_config=True)
    assert cfg.hydra.run.dir.endswith(os.path.join("outputs", "pretrain", "exp1"))


def test_exit_code():
    assert exit_code_for(SIGTERMException()) == SIGTERM_EXIT_CODE == 143
    assert exit_code_for(SystemExit(1)) is None
    assert exit_code_for(SIGTERMException(), signal.SIGINT) == 130  # Ctrl-C


def _ckpt(path, step, mtime):
    """A checkpoint written at ``mtime`` (seconds since the epoch): the order is set, not slept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": step}, path)
    os.utime(path, (mtime, mtime))


def test_auto_resume_prefers_the_newest_of_last_and_hpc_checkpoints(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _ckpt(ckpts / "step_0000010.ckpt", 10, mtime=1_000)
    _ckpt(ckpts / "last.ckpt", 10, mtime=1_000)
    _ckpt(tmp_path / "hpc_ckpt_1.ckpt", 12, mtime=2_000)  # SLURM's SIGUSR1 checkpoint, later
    assert runner.resolve_ckpt_path("auto", ckpts) == str(tmp_path / "hpc_ckpt_1.ckpt")
    _ckpt(ckpts / "last.ckpt", 15, mtime=3_000)
    assert runner.resolve_ckpt_path("auto", ckpts) == str(ckpts / "last.ckpt")


def test_fsdp_trainer_config_builds_its_strategy():
    import hydra
    from lightning.pytorch.strategies import FSDPStrategy
    from timm.models.beit import Block

    with initialize_config_dir(config_dir=os.path.abspath(CONFIGS), version_base="1.3"):
        cfg = compose("pretrain", overrides=["+experiment=beit_large", "trainer=fsdp"])
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert Block in strategy.kwargs["auto_wrap_policy"]._module_classes
    assert cfg.trainer.precision == "bf16-mixed"


def test_derive_batch():
    from bitrain.training.devices import derive_batch

    plan = derive_batch(2048, 16)
    assert (plan.per_device, plan.accumulate) == (128, 1)
    plan = derive_batch(2048, 8, max_per_device=128)
    assert (plan.per_device, plan.accumulate) == (128, 2)
    plan = derive_batch(1024, 8, max_per_device=48)  # 128 per rank: 4 x 32 divides, 3 x 43 not
    assert (plan.per_device, plan.accumulate) == (32, 4)
    assert "1024 = 32 per device x 8 devices x 4" in str(plan)
    with pytest.raises(ValueError, match="does not split evenly"):
        derive_batch(1000, 64)
    with pytest.raises(ValueError, match="less than one sample per device"):
        derive_batch(4, 8)


def test_global_batch_in_a_config_sets_batch_and_accumulation():
    from bitrain.training.devices import apply_global_batch, world_size_of

    with initialize_config_dir(config_dir=os.path.abspath(CONFIGS), version_base="1.3"):
        cfg = compose(
            "pretrain",
            overrides=[
                "+data.global_batch_size=2048",
                "+data.max_batch_per_device=64",
                "trainer.devices=8",
                "trainer.num_nodes=2",
            ],
        )
    assert world_size_of(cfg.trainer) == 16
    plan = apply_global_batch(cfg)
    assert cfg.data.batch_size == 64 and cfg.trainer.accumulate_grad_batches == 2
    assert "global_batch_size" not in cfg.data and "max_batch_per_device" not in cfg.data
    assert plan.per_device * plan.world_size * plan.accumulate == 2048
    assert world_size_of({"devices": [0, 1, 2], "num_nodes": 1}) == 3
    assert world_size_of({"devices": "auto", "accelerator": "cpu"}) == 1


@pytest.mark.parametrize(
    "trainer,visible,message",
    [
        ({"accelerator": "gpu", "devices": 8}, 0, r"^8 GPUs requested .* 0 visible"),
        ({"accelerator": "cuda", "devices": "auto"}, 0, r"^1 GPU requested .* 0 visible"),
        ({"accelerator": "gpu", "devices": 4}, 2, r"^4 GPUs requested .* 2 visible \(GPUs 0..1"),
        ({"accelerator": "gpu", "devices": [0, 3]}, 2, r"^2 GPUs requested .* 2 visible"),
    ],
)
def test_gpus_that_are_not_there_are_refused(trainer, visible, message, monkeypatch):
    from bitrain.training.devices import check_devices

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ValueError, match=message):
        check_devices(trainer, cuda_count=visible)
    check_devices({**trainer, "devices": 1}, cuda_count=1)  # one GPU, one visible: fine


def test_more_cpu_processes_than_cores_is_a_warning(caplog):
    from bitrain.training.devices import check_devices

    with caplog.at_level(logging.WARNING, logger="bitrain.training.devices"):
        check_devices({"accelerator": "cpu", "devices": 2}, cuda_count=0, cpu_cores=2)
        assert not caplog.records
        check_devices({"accelerator": "auto", "devices": 8}, cuda_count=0, cpu_cores=2)
    assert "starts 8 training processes (DDP over gloo) on 2 CPU cores" in caplog.text


def test_build_refuses_missing_gpus_and_warns_about_cpu_processes(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        gpu = compose("finetune", overrides=["trainer.accelerator=gpu", "trainer.devices=8",
                                             "model.pretrained=null",
                                             f"paths.output_dir={tmp_path}"])  # fmt: skip
        cpu = compose("finetune", overrides=["trainer.accelerator=cpu", "trainer.devices=8",
                                             "model.pretrained=null",
                                             f"paths.output_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(ValueError, match=r"8 GPUs requested .* 0 visible"):
        runner.build(gpu)
    with caplog.at_level(logging.WARNING, logger="bitrain.training.devices"):
        runner.build(cpu)
    assert "starts 8 training processes" in caplog.text
