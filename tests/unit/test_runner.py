"""bitrain.training.resume.resolve_ckpt_path: explicit paths, ckpt_path=auto, corrupt files."""

import logging
from pathlib import Path

import pytest
import torch

from bitrain.io import CheckpointError
from bitrain.training.resume import resolve_ckpt_path
from bitrain.training.rundir import checkpoint_dir_of


def _ckpt(path: Path, step: int) -> Path:
    """A minimal Lightning-style checkpoint (state_dict + global_step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": {"model.w": torch.full((4,), float(step))}, "global_step": step}, path
    )
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_none_and_empty_mean_fresh_start(tmp_path):
    assert resolve_ckpt_path(None, tmp_path) is None
    assert resolve_ckpt_path("", tmp_path) is None


def test_auto_without_checkpoints_is_a_logged_fresh_start(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="bitrain.training"):
        assert resolve_ckpt_path("auto", tmp_path / "checkpoints") is None  # dir missing
        (tmp_path / "checkpoints").mkdir()
        assert resolve_ckpt_path("auto", tmp_path / "checkpoints") is None  # dir empty
    assert "fresh run" in caplog.text


def test_auto_prefers_last_ckpt(tmp_path):
    d = tmp_path / "checkpoints"
    _ckpt(d / "step_0000100.ckpt", 100)
    _ckpt(d / "step_0000200.ckpt", 200)
    _ckpt(d / "last.ckpt", 250)
    assert resolve_ckpt_path("auto", d) == str(d / "last.ckpt")


def test_auto_without_last_picks_highest_step_not_name_order(tmp_path):
    d = tmp_path / "checkpoints"
    _ckpt(d / "step_0000900.ckpt", 900)
    _ckpt(d / "step_0001000.ckpt", 1000)
    _ckpt(d / "step_0000100.ckpt", 100)
    (d / "notes.ckpt").write_bytes(b"not a step file")  # ignored: not last.ckpt nor step_*
    assert resolve_ckpt_path("auto", d) == str(d / "step_0001000.ckpt")


def test_auto_skips_corrupt_last_for_newest_step_file(tmp_path, caplog):
    d = tmp_path / "checkpoints"
    _ckpt(d / "step_0000100.ckpt", 100)
    _ckpt(d / "step_0000200.ckpt", 200)
    _truncate(_ckpt(d / "last.ckpt", 250))
    with caplog.at_level(logging.WARNING, logger="bitrain.training"):
        assert resolve_ckpt_path("auto", d) == str(d / "step_0000200.ckpt")
    assert "last.ckpt" in caplog.text and "skipping" in caplog.text


def test_auto_skips_every_unreadable_file_in_turn(tmp_path):
    d = tmp_path / "checkpoints"
    _ckpt(d / "step_0000100.ckpt", 100)
    _truncate(_ckpt(d / "step_0000200.ckpt", 200))
    (d / "last.ckpt").write_bytes(b"")  # empty: killed before anything was written
    torch.save({"just": "a dict"}, d / "step_0000300.ckpt")  # loads, but no state_dict
    assert resolve_ckpt_path("auto", d) == str(d / "step_0000100.ckpt")


def test_auto_all_corrupt_is_a_fresh_start_with_warning(tmp_path, caplog):
    d = tmp_path / "checkpoints"
    _truncate(_ckpt(d / "last.ckpt", 2))
    _truncate(_ckpt(d / "step_0000002.ckpt", 2))
    with caplog.at_level(logging.WARNING, logger="bitrain.training"):
        assert resolve_ckpt_path("auto", d) is None
    assert "none of the 2 checkpoints" in caplog.text


def test_auto_needs_a_directory():
    with pytest.raises(ValueError, match="checkpoint directory"):
        resolve_ckpt_path("auto")


def test_explicit_path_is_returned_when_readable(tmp_path):
    path = _ckpt(tmp_path / "run" / "last.ckpt", 3)
    assert resolve_ckpt_path(str(path)) == str(path)


def test_explicit_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"))


def test_explicit_corrupt_path_is_a_clear_error(tmp_path):
    path = _truncate(_ckpt(tmp_path / "checkpoints" / "last.ckpt", 3))
    with pytest.raises(CheckpointError, match=r"cannot resume from ckpt_path=.*last\.ckpt.*auto"):
        resolve_ckpt_path(str(path))


def test_checkpoint_dir_follows_the_callback_config(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    assert checkpoint_dir_of(cfg) == tmp_path / "checkpoints"
    cfg.callbacks = {"model_checkpoint": {"dirpath": str(tmp_path / "ck")}}
    assert checkpoint_dir_of(cfg) == tmp_path / "ck"


def test_auto_takes_the_newest_of_lightnings_versioned_last_files(tmp_path):
    import os

    d = tmp_path / "checkpoints"
    _ckpt(d / "last.ckpt", 4)
    _ckpt(d / "last-v1.ckpt", 6)
    _ckpt(d / "step_0000006.ckpt", 6)
    os.utime(d / "last.ckpt", (1_000, 1_000))  # the stale one is older
    assert resolve_ckpt_path("auto", d) == str(d / "last-v1.ckpt")
    (d / "lastly.ckpt").write_bytes(b"x")  # not a last file
    assert resolve_ckpt_path("auto", d) == str(d / "last-v1.ckpt")


def test_auto_reads_the_chosen_checkpoint_in_full_once(tmp_path, monkeypatch):
    """ckpt_path=auto checks candidates without reading their tensors (torch.load mmap=True);
    Lightning's load (SafeCheckpointIO) is then the one full read of the chosen file. The old
    check loaded every candidate in full, so a multi-GB resume read the file twice."""
    from bitrain.training.resume import SafeCheckpointIO

    d = tmp_path / "checkpoints"
    _truncate(_ckpt(d / "last.ckpt", 250))
    _ckpt(d / "step_0000200.ckpt", 200)
    loads = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        out = real_load(f, *args, **kwargs)
        loads.append((Path(f).name, bool(kwargs.get("mmap"))))
        return out

    monkeypatch.setattr(torch, "load", counting_load)
    chosen = resolve_ckpt_path("auto", d)
    assert chosen == str(d / "step_0000200.ckpt")
    checkpoint = SafeCheckpointIO().load_checkpoint(chosen)
    assert checkpoint["global_step"] == 200
    assert [name for name, mmap in loads if not mmap] == ["step_0000200.ckpt"], loads
