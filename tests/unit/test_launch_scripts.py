"""scripts/slurm/*.sbatch and scripts/launch_torchrun.sh: valid shell, and the overrides compose."""

import os
import re
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import bitrain.runner  # noqa: F401  (resolvers)

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [
    ROOT / "scripts" / "slurm" / "pretrain.sbatch",
    ROOT / "scripts" / "slurm" / "finetune.sbatch",
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
