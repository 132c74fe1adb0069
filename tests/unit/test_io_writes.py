"""bitrain.io atomic writes: a full disk is named, the old file kept; modes follow the umask."""

from __future__ import annotations

import errno
import io
import os
import stat

import pytest
import torch

from bitrain.io import atomic_save, atomic_write_bytes
from bitrain.training.resume import SafeCheckpointIO


class _FullDisk(io.FileIO):
    """A raw file on a disk with ``room`` bytes left: write(2) then fails with ENOSPC."""

    room = 4096

    def write(self, data) -> int:
        left = self.room - self.tell()
        if left <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(bytes(data)[:left])  # a short write, as the kernel's


@pytest.fixture
def full_disk(monkeypatch):
    """``os.fdopen(fd, "wb")`` (what the atomic writes open) gets the full disk's file."""
    real = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        if mode == "wb":
            return io.BufferedWriter(_FullDisk(fd, "wb", closefd=True))
        return real(fd, mode, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)


def _tensors(n: int) -> dict:
    return {"state_dict": {"w": torch.arange(n, dtype=torch.float32)}, "global_step": n}


def test_a_full_disk_is_named_with_its_free_space_and_the_old_checkpoint_is_kept(tmp_path, request):
    last = tmp_path / "checkpoints" / "last.ckpt"
    SafeCheckpointIO().save_checkpoint(_tensors(10), last)
    before = last.read_bytes()
    request.getfixturevalue("full_disk")  # from here on the disk is full
    with pytest.raises(OSError) as err:
        SafeCheckpointIO().save_checkpoint(_tensors(100_000), last)  # 400 kB > 4 kB of room
    assert err.value.errno == errno.ENOSPC
    msg = str(err.value)
    assert f"no space left on {last.parent} while writing last.ckpt" in msg, msg
    assert "MiB free there" in msg and "the previous last.ckpt is kept" in msg, msg
    assert "unexpected pos" not in msg
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temp file left


def test_a_full_disk_with_no_previous_file(tmp_path, full_disk):
    with pytest.raises(OSError, match="nothing was written as out.bin"):
        atomic_write_bytes(tmp_path / "out.bin", b"x" * 100_000)
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_pass_through_unchanged(tmp_path):
    class Boom:
        def __reduce__(self):
            raise ValueError("not a disk problem")

    with pytest.raises(ValueError, match="not a disk problem"):
        atomic_save({"x": Boom()}, tmp_path / "a.pt")


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        saved = atomic_save(_tensors(3), tmp_path / "last.ckpt")
        raw = atomic_write_bytes(tmp_path / "model.safetensors", b"abc")
    finally:
        os.umask(old)
    assert stat.S_IMODE(saved.stat().st_mode) == mode
    assert stat.S_IMODE(raw.stat().st_mode) == mode
