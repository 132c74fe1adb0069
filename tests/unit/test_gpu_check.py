"""scripts/gpu_check.py: a clear "no GPU" exit on a CPU, a plan whose flags exist, a summary."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit of a machine without GPU")
def test_no_gpu_is_a_clear_exit(capsys, tmp_path):
    check = _load("gpu_check")
    assert check.main(["--out", str(tmp_path / "s.json")]) == check.NO_GPU == 2
    err = capsys.readouterr().err
    assert "no GPU" in err and "nothing was measured" in err
    assert not (tmp_path / "s.json").exists()


def test_every_planned_command_parses_with_its_script(capsys, monkeypatch):
    """The plan names options the benchmark scripts really have (their own argparse decides)."""
    check = _load("gpu_check")
    assert check.main(["--dry-run"]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the scripts refuse cuda else
    lines = capsys.readouterr().out.strip().splitlines()
    steps = check.plan(sys.executable, 15)
    assert [s[0] for s in steps] == [line.split(" ")[0] for line in lines]
    assert sum(limit for _, _, limit in steps) <= 8 * 60  # fits the 8-minute slot
    for name, command, _ in steps:
        if name == "cuda_tests":
            assert (SCRIPTS.parent / command[-1]).is_file()
            continue
        script = Path(command[1]).stem
        args = _load(script).parse_args(command[2:])  # SystemExit on an unknown option
        assert getattr(args, "device", "cuda") == "cuda" or script == "bench_data"
    with pytest.raises(SystemExit, match="unknown step"):
        check.main(["--only", "nonsense"])


def test_summary_of_the_steps(monkeypatch, tmp_path, capsys):
    """With a GPU (faked here), every step's JSON, exit code and the loader/step ratio."""
    check = _load("gpu_check")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    results = {
        "step_bf16_eager": {"bitrain_img_s": 2000.0, "reference_img_s": 1500.0},
        "loader": {"folder_img_s": {"1": 300.0, "15": 4000.0}},
    }

    def fake_step(name, command, limit):
        return {"command": shlex.join(command), "rc": 0, "seconds": 1.0,
                "result": results.get(name, {})}  # fmt: skip

    monkeypatch.setattr(check, "run_step", fake_step)
    out = tmp_path / "summary.json"
    assert check.main(["--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary == json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["gpu"] == "NVIDIA H200" and summary["ok"]
    assert set(summary["steps"]) == {s[0] for s in check.plan(sys.executable, 1)}
    assert summary["loader_feeds_step"] == pytest.approx(2.0)
    # A failing step makes the exit code 1; a budget too small skips the rest, recorded.
    monkeypatch.setattr(check, "run_step", lambda n, c, lim: {"rc": 1, "tail": "boom"})
    assert check.main(["--out", str(out), "--budget-s", "0"]) == 1
    assert all("budget" in s["skipped"] for s in json.loads(out.read_text())["steps"].values())


def test_run_step_keeps_the_json_and_the_failure_tail(tmp_path):
    check = _load("gpu_check")
    ok = check.run_step("x", [sys.executable, "-c", "print('table'); print('{\"a\": 1}')"], 30)
    assert ok["rc"] == 0 and ok["result"] == {"a": 1} and "tail" not in ok
    bad = check.run_step("x", [sys.executable, "-c", "import sys; sys.exit('broken')"], 30)
    assert bad["rc"] == 1 and "broken" in bad["tail"] and bad["result"] is None
    slow = check.run_step("x", [sys.executable, "-c", "import time; time.sleep(5)"], 1)
    assert slow["rc"] == 124 and "ran past its limit" in slow["tail"]
