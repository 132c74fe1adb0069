"""scripts/check_install_space.py: `make install` refuses early, and says why, on a short disk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_install_space.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False
    )


def test_enough_space_passes_silently(tmp_path):
    result = _run(str(tmp_path / "not-yet" / ".venv"), "--need-gib", "0")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_short_disk_is_refused_with_the_amounts_and_a_way_out(tmp_path):
    result = _run(str(tmp_path / ".venv"), "--need-gib", "1e9")
    assert result.returncode == 1
    assert "GiB free on the disk holding" in result.stderr
    assert str(tmp_path) in result.stderr
    assert "VENV=" in result.stderr


def test_makefile_runs_the_check_before_creating_the_venv():
    makefile = (SCRIPT.parents[1] / "Makefile").read_text()
    check = makefile.index("scripts/check_install_space.py $(VENV)")
    assert check < makefile.index("-m venv $(VENV)")
