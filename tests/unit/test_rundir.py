"""bitrain.training.rundir: a fresh start never overwrites an earlier run; bad run dirs named."""

import errno
from pathlib import Path

import pytest

from bitrain.training.rundir import (
    RunDirError,
    check_fresh_start,
    check_writable,
    earlier_run_files,
    is_first_process,
)


def _earlier_run(run: Path) -> Path:
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("a: 1\n")
    return run


def test_fresh_start_over_an_earlier_run_is_refused_naming_the_ways_out(tmp_path):
    run = _earlier_run(tmp_path / "run")
    with pytest.raises(RunDirError) as err:
        check_fresh_start(run, run / "checkpoints", None, environ={})
    msg = str(err.value)
    for part in (
        str(run),
        "metrics.csv",
        "checkpoints/last.ckpt",
        "ckpt_path=auto",
        "paths.run_name",
    ):
        assert part in msg, msg
    with pytest.raises(RunDirError):
        check_fresh_start(run, run / "checkpoints", "", environ={})


@pytest.mark.parametrize("ckpt_path", ["auto", "/some/run/checkpoints/last.ckpt"])
def test_a_resume_may_use_the_directory(tmp_path, ckpt_path):
    run = _earlier_run(tmp_path / "run")
    check_fresh_start(run, run / "checkpoints", ckpt_path, environ={})


def test_what_hydra_writes_before_a_job_is_not_a_run(tmp_path):
    """A run that failed before training (.hydra/ and the log only) can be started again."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "pretrain.log").write_text("error\n")
    assert earlier_run_files(run, run / "checkpoints") == []
    check_fresh_start(run, run / "checkpoints", None, environ={})


def test_each_kind_of_earlier_file_counts(tmp_path):
    run = tmp_path / "run"
    (run / "elsewhere").mkdir(parents=True)
    (run / "wandb_run_id").write_text("abc\n")
    (run / "hpc_ckpt_1.ckpt").write_bytes(b"x")
    (run / "elsewhere" / "step_0000010.ckpt").write_bytes(b"x")
    found = earlier_run_files(run, run / "elsewhere")
    assert [p.name for p in found] == ["wandb_run_id", "step_0000010.ckpt", "hpc_ckpt_1.ckpt"]


def test_only_the_first_process_checks(tmp_path):
    """Other DDP ranks start while (or after) rank 0 writes this run's own files."""
    run = _earlier_run(tmp_path / "run")
    assert is_first_process({}) and is_first_process({"RANK": "0", "LOCAL_RANK": "0"})
    for env in ({"LOCAL_RANK": "1"}, {"RANK": "3"}, {"SLURM_PROCID": "2"}, {"NODE_RANK": "1"}):
        assert not is_first_process(env)
        check_fresh_start(run, run / "checkpoints", None, environ=env)


def test_a_run_dir_under_a_file_is_named(tmp_path):
    afile = tmp_path / "weights.pt"
    afile.write_bytes(b"x")
    with pytest.raises(RunDirError, match=rf"'{afile}' is a file, not a directory"):
        check_writable(afile / "run")


def test_a_run_dir_in_proc_is_named():
    with pytest.raises(RunDirError, match=r"'/proc/bitrain-test/run'.*/proc is the kernel's"):
        check_writable("/proc/bitrain-test/run")


def test_a_read_only_mount_is_named(tmp_path, monkeypatch):
    """EROFS as the kernel returns it for a read-only mount (this machine has none to test on)."""
    target = tmp_path / "ro" / "run"

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(RunDirError, match=rf"'{target}': it is on a read-only file system"):
        check_writable(target)


def test_writable_dir_is_created_and_left_clean(tmp_path):
    path = check_writable(tmp_path / "a" / "b")
    assert path.is_dir() and list(path.iterdir()) == []
