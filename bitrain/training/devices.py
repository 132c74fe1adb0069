"""Devices and the global batch: what a run asks of the machine, checked before it starts.

* **Global batch.** ``data.global_batch_size`` (when set) is the recipe's batch over all devices;
  :func:`apply_global_batch` derives ``data.batch_size`` (per device) and
  ``trainer.accumulate_grad_batches`` from the world size (``trainer.devices`` x
  ``trainer.num_nodes``) and ``data.max_batch_per_device`` (a memory cap), so one experiment gives
  the same optimisation on 8, 16 or 64 GPUs. The learning rate is not rescaled: the experiments
  state the lr of their global batch.
* **Devices.** :func:`check_devices`: GPUs requested but not visible are refused with both counts;
  more CPU processes than cores get a warning.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from bitrain.training.rundir import is_first_process

__all__ = ["BatchPlan", "apply_global_batch", "check_devices", "derive_batch", "world_size_of"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is split: ``global = per_device x world_size x accumulate``."""

    global_batch_size: int
    world_size: int
    per_device: int
    accumulate: int

    def __str__(self) -> str:
        return (
            f"global batch {self.global_batch_size} = {self.per_device} per device x "
            f"{self.world_size} devices x {self.accumulate} accumulation steps"
        )


def derive_batch(
    global_batch_size: int, world_size: int, max_per_device: int | None = None
) -> BatchPlan:
    """Per-device batch and gradient accumulation for a global batch on ``world_size`` devices.

    The fewest accumulation steps that keep the per-device batch at most ``max_per_device``
    and divide the per-rank share exactly.

    Raises:
        ValueError: the global batch does not split evenly over the devices, or gives less than
            one sample per device; the message names the config keys.
    """
    global_batch_size, world_size = int(global_batch_size), int(world_size)
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if global_batch_size < world_size:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} gives less than one sample per device "
            f"on {world_size} devices (trainer.devices x trainer.num_nodes)"
        )
    if global_batch_size % world_size:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} does not split evenly over {world_size} "
            "devices (trainer.devices x trainer.num_nodes); pick a multiple of the world size"
        )
    per_rank = global_batch_size // world_size
    cap = per_rank if max_per_device in (None, 0) else int(max_per_device)
    if cap < 1:
        raise ValueError(f"data.max_batch_per_device must be >= 1, got {max_per_device}")
    accumulate = math.ceil(per_rank / cap)
    while per_rank % accumulate:
        accumulate += 1
    return BatchPlan(global_batch_size, world_size, per_rank // accumulate, accumulate)


def world_size_of(trainer_cfg: Any) -> int:
    """Processes a trainer config asks for: devices (an int, a list, or "auto") x num_nodes.

    ``"auto"`` counts the visible GPUs when the accelerator can use them, else 1 (CPU).
    """
    devices = trainer_cfg.get("devices", "auto")
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if isinstance(devices, str) and devices not in ("auto", "-1"):
        devices = [d for d in devices.split(",") if d.strip()] if "," in devices else int(devices)
    if devices in ("auto", "-1", -1):
        gpus = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 0
        devices = max(1, gpus)
    count = (
        len(devices)
        if isinstance(devices, list | tuple) or OmegaConf.is_list(devices)
        else int(devices)
    )
    return max(1, count) * max(1, int(trainer_cfg.get("num_nodes", 1) or 1))


def _requested(devices: Any) -> int | list[int] | None:
    """``trainer.devices`` as a count or a list of indices; ``None`` for ``auto`` / ``-1``."""
    if devices in ("auto", "-1", -1, None):
        return None
    if isinstance(devices, str):
        if "," in devices:
            return [int(d) for d in devices.split(",") if d.strip()]
        return int(devices)
    if isinstance(devices, list | tuple) or OmegaConf.is_list(devices):
        return [int(d) for d in devices]
    return int(devices)


def check_devices(
    trainer_cfg: Any, cuda_count: int | None = None, cpu_cores: int | None = None
) -> None:
    """Refuse GPUs that are not there; warn when more CPU processes than cores are asked for.

    Lightning would fail on the first with "No supported gpu backend found!", and start one
    training process per ``trainer.devices`` on a CPU without a word, however few the cores.

    Args:
        trainer_cfg: the ``trainer`` config (``accelerator``, ``devices``).
        cuda_count: visible CUDA devices (default: ``torch.cuda.device_count()``).
        cpu_cores: cores this process may use (default: its CPU affinity).

    Raises:
        ValueError: ``trainer.accelerator`` gpu/cuda asks for more GPUs (or a higher index)
            than are visible on this machine.
    """
    accelerator = str(trainer_cfg.get("accelerator", "auto")).lower()
    devices = trainer_cfg.get("devices", "auto")
    wanted = _requested(devices)
    visible = torch.cuda.device_count() if cuda_count is None else int(cuda_count)
    count = 1 if wanted is None else len(wanted) if isinstance(wanted, list) else wanted
    if accelerator in ("gpu", "cuda"):
        highest = max(wanted) if isinstance(wanted, list) and wanted else -1
        if count > visible or highest >= visible:
            env = os.environ.get("CUDA_VISIBLE_DEVICES")
            if env is not None:
                why = f"CUDA_VISIBLE_DEVICES={env!r}"
            elif torch.version.cuda is None:
                why = "this torch is built without CUDA"
            elif visible == 0:
                why = "torch sees no CUDA device"
            else:
                why = f"GPUs 0..{visible - 1}"
            raise ValueError(
                f"{count} GPU{'s' if count != 1 else ''} requested (trainer.accelerator="
                f"{accelerator} trainer.devices={devices}), {visible} visible ({why}). Run on a "
                "node with the GPUs, lower trainer.devices, or use trainer=cpu; "
                "`python -m bitrain.doctor` lists the devices it sees"
            )
        return
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and visible == 0)
    cores = cpu_cores if cpu_cores is not None else len(os.sched_getaffinity(0))
    if on_cpu and count > cores and is_first_process():  # once, not once per started process
        log.warning(
            "trainer.devices=%s on the CPU starts %d training processes (DDP over gloo) on %d "
            "CPU core%s: each gets less than one core; trainer.devices=1 trains in one "
            "process on all of them",
            devices,
            count,
            cores,
            "s" if cores != 1 else "",
        )


def apply_global_batch(cfg: DictConfig) -> BatchPlan | None:
    """Derive ``data.batch_size`` and ``trainer.accumulate_grad_batches`` from the global batch.

    Removes ``global_batch_size`` and ``max_batch_per_device`` from ``cfg.data`` (they are not
    data-module arguments) and logs the derivation. Nothing happens when the key is absent or null.
    """
    data = cfg.get("data")
    if data is None or "global_batch_size" not in data:
        return None
    global_batch = data.get("global_batch_size")
    cap = data.get("max_batch_per_device")
    with open_dict(cfg):
        del cfg.data["global_batch_size"]
        if "max_batch_per_device" in cfg.data:
            del cfg.data["max_batch_per_device"]
    if global_batch in (None, 0):
        return None
    plan = derive_batch(global_batch, world_size_of(cfg.trainer), cap)
    given = cfg.data.get("batch_size")
    if given is not None and int(given) != plan.per_device:
        log.warning(
            "data.batch_size=%s is replaced by %d: data.global_batch_size=%d sets it (%s); "
            "set data.global_batch_size=null to use data.batch_size as it is",
            given,
            plan.per_device,
            plan.global_batch_size,
            plan,
        )
    with open_dict(cfg):
        cfg.data.batch_size = plan.per_device
        cfg.trainer.accumulate_grad_batches = plan.accumulate
    log.info("%s", plan)
    return plan
