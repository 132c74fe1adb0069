"""scripts/slurm/*.sbatch and scripts/launch_torchrun.sh: valid shell, and the overrides compose."""

import os
import re
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [
    ROOT / "scripts" / "slurm" / "pretrain.sbatch",
    ROOT / "scripts" / "slurm" / "finetune.sbatch",
    ROOT / "scripts" / "slurm" / "sweep.sbatch",
    ROOT / "scripts" / "launch_torchrun.sh",
]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_torchrun_launcher_refuses_an_unknown_entry_point():
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "launch_torchrun.sh"), "nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "unknown entry point" in proc.stderr


def _srun_overrides(script: Path) -> tuple[str, list[str]]:
    """The entry point and the overrides of the script's srun line, with SLURM's variables set."""
    text = script.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("srun"))
    entry = re.search(r"python -m bitrain\.(\w+)", line).group(1)
    values = {
        "${EXPERIMENT}": re.search(r'EXPERIMENT="\$\{EXPERIMENT:-(\w+)\}"', text).group(1),
        "${SLURM_NNODES}": "2",
        "${SLURM_NTASKS_PER_NODE}": "8",
        "$(( ${SLURM_CPUS_PER_TASK:-2} - 1 ))": "9",
    }
    for key, value in values.items():
        line = line.replace(key, value)
    args = [a.strip('"') for a in line.split("python -m")[1].split()[1:]]
    return entry, [a for a in args if a != '"$@"' and a != "$@"]


def test_pretrain_sbatch_overrides_compose():
    entry, overrides = _srun_overrides(SCRIPTS[0])
    assert entry == "pretrain"
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(entry, overrides=overrides)
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 8
    assert cfg.ckpt_path == "auto" and cfg.data.num_workers == 9
    assert cfg.trainer.strategy._target_.endswith("DDPStrategy")


def _run_sweep_task(tmp_path, task, **env):
    """Run sweep.sbatch as array task ``task`` with a fake ``srun`` that prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    environ = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_ARRAY_JOB_ID": "777",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_CPUS_PER_TASK": "4",
        **({"SLURM_ARRAY_TASK_ID": str(task)} if task is not None else {}),
        **env,
    }
    script = ROOT / "scripts" / "slurm" / "sweep.sbatch"
    return subprocess.run(
        ["bash", str(script), "model.pretrained=/ckpt/pt22k.pth"],
        capture_output=True, text=True, env=environ, cwd=tmp_path,
    )  # fmt: skip


def test_sweep_sbatch_gives_each_array_task_its_value_and_run_dir(tmp_path):
    proc = _run_sweep_task(tmp_path, 2)
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.split("\n")
    entry = args[args.index("-m") + 1]
    overrides = [a for a in args[args.index("-m") + 2 :] if a]
    assert entry == "bitrain.finetune"
    assert "optim.lr=4e-3" in overrides and "ckpt_path=auto" in overrides
    assert "hydra.run.dir=outputs/sweeps/beit_base_ft1k/777/optim.lr_4e-3" in overrides
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("finetune", overrides=overrides, return_hydra_config=True)
    assert cfg.optim.lr == 4e-3 and cfg.trainer.devices == 8 and cfg.data.num_workers == 3
    assert cfg.hydra.run.dir == "outputs/sweeps/beit_base_ft1k/777/optim.lr_4e-3"
    other = _run_sweep_task(tmp_path, 1, SWEEP_KEY="optim.layer_decay", SWEEP_VALUES="0.6 0.7")
    assert "optim.layer_decay=0.7" in other.stdout.split("\n")


@pytest.mark.parametrize(("task", "message"), [(None, "not a job array task"), (4, "has 4 values")])
def test_sweep_sbatch_refuses_a_task_without_a_value(tmp_path, task, message):
    proc = _run_sweep_task(tmp_path, task)
    assert proc.returncode == 2 and message in proc.stderr and not proc.stdout
