"""bitrain.io: atomic writes, weights-only loading and the restricted loader for pickled modules."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch

from bitrain.io import (
    CheckpointError,
    PickledModule,
    atomic_save,
    atomic_write_bytes,
    flatten_module_state,
    load_pickled_module,
    load_torch_file,
)


class _Unpicklable:
    def __reduce__(self):
        raise pickle.PicklingError("boom: cannot pickle this on purpose")


class _System:
    """Pickles as ``os.system(cmd)``."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Custom:
    """A harmless but unknown class: weights-only loading must still refuse it."""


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- atomic writes --------------------------------------------------------------------------------


def test_atomic_save_writes_and_leaves_no_temp_file(tmp_path):
    path = atomic_save({"w": torch.arange(3)}, tmp_path / "sub" / "ckpt.pt")
    assert torch.equal(load_torch_file(path)["w"], torch.arange(3))
    assert _leftovers(path.parent) == []


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = atomic_save({"version": 1}, tmp_path / "ckpt.pt")
    # torch.save gets as far as writing the tensor, then fails on the unpicklable entry.
    with pytest.raises(pickle.PicklingError, match="boom"):
        atomic_save({"big": torch.zeros(1000), "bad": _Unpicklable()}, path)
    assert load_torch_file(path) == {"version": 1}
    assert _leftovers(tmp_path) == []


def test_atomic_write_bytes_replaces_whole_file(tmp_path):
    path = atomic_write_bytes(tmp_path / "a.bin", b"old")
    atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert _leftovers(tmp_path) == []


# --- load_torch_file --------------------------------------------------------------------------


def test_load_torch_file_missing_names_path_and_hint(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError) as err:
        load_torch_file(path, what="BEiT checkpoint", hint="See docs/checkpoints.md")
    assert str(path) in str(err.value) and "docs/checkpoints.md" in str(err.value)
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_torch_file(tmp_path)


def test_load_torch_file_empty(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_torch_file(tmp_path / "empty.pt")


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_load_torch_file_truncated(tmp_path, zipped):
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.zeros(4096)}, path, _use_new_zipfile_serialization=zipped)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not read"):
        load_torch_file(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "content",
    [b"hello, this is text\n", pickle.dumps({"a": 1}, protocol=4), b"PK\x03\x04garbage"],
    ids=["text", "plain-pickle", "fake-zip"],
)
def test_load_torch_file_not_a_torch_file(tmp_path, content):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match="could not read"):
        load_torch_file(tmp_path / "x.pt")


def test_load_torch_file_refuses_forbidden_globals_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"w": torch.ones(1), "x": _System(f"touch {marker}")}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refused.*posix\.system"):
        load_torch_file(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"x": _Custom()}, tmp_path / "custom.pt")
    with pytest.raises(CheckpointError, match="_Custom"):
        load_torch_file(tmp_path / "custom.pt")


def test_allow_namespace(tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1.5e-3)}, path)
    with pytest.raises(CheckpointError, match="Namespace"):
        load_torch_file(path)
    ckpt = load_torch_file(path, allow_namespace=True)
    assert ckpt["args"].lr == 1.5e-3 and torch.equal(ckpt["model"]["w"], torch.ones(2))


# --- load_pickled_module ----------------------------------------------------------------------


_SEQ = ["torch.nn.modules.container.Sequential", "torch.nn.modules.linear.Linear"]


def test_pickled_module_becomes_inert_records(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    torch.save(model, tmp_path / "m.pkl")
    root = load_pickled_module(tmp_path / "m.pkl", _SEQ)
    assert isinstance(root, PickledModule) and root.class_path.endswith("Sequential")
    flat = flatten_module_state(root)
    assert flat.keys() == model.state_dict().keys()
    assert all(torch.equal(flat[k], v) for k, v in model.state_dict().items())


def test_pickled_module_refuses_classes_not_listed(tmp_path):
    torch.save(torch.nn.Sequential(torch.nn.ReLU()), tmp_path / "m.pkl")
    with pytest.raises(CheckpointError, match="ReLU"):
        load_pickled_module(tmp_path / "m.pkl", _SEQ)


def test_pickled_module_state_dict_only_when_allowed(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="not a pickled module"):
        load_pickled_module(tmp_path / "sd.pt", _SEQ)
    assert load_pickled_module(tmp_path / "sd.pt", _SEQ, allow_state_dict=True).keys() == {"w"}


def test_flatten_rejects_non_tensor_parameters():
    root = PickledModule()
    root.__setstate__({"_parameters": {"w": "not a tensor"}, "_modules": {}})
    with pytest.raises(CheckpointError, match="expected a tensor"):
        flatten_module_state(root)
    root.__setstate__({"_parameters": [1, 2]})
    with pytest.raises(CheckpointError, match="expected a mapping"):
        flatten_module_state(root)
