"""Shared test fixtures: offline environment, loopback-only socket guard, tiny images and files."""

from __future__ import annotations

import os
import socket

import pytest

from bitrain.training.resolvers import register_resolvers

# Tests compose configs with Hydra's compose API (no entry point ran): the resolvers the entry
# points register (${div:...}, ${required:...}, ${run_dir:...}, ${latest_checkpoint:...}).
register_resolvers()

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")


_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (
        host in ("localhost", "::1") or host.startswith("127.") or self.family == socket.AF_UNIX
    ):
        return _real_connect(self, address)
    raise RuntimeError(f"test tried to reach the network: {address!r} (tests run offline)")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Every test runs offline: wandb offline, HF offline, and no socket beyond loopback."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    yield


# --- DALL-E encoder.pkl fixtures (random weights, written exactly as OpenAI's file: a pickled
# --- dall_e.encoder.Encoder object). The reference package `dall_e` is a test dependency only.

# A tiny DALL-E encoder: 16 -> 128 channels, one block per group, 64 codes (~77k parameters).
DALL_E_TINY = {"n_hid": 16, "n_blk_per_group": 1, "vocab_size": 64}


def build_dall_e_reference(seed: int = 0, **encoder_kwargs):
    """A random ``dall_e.encoder.Encoder`` (reference implementation), random biases included.

    DALL-E initialises biases to zero, which would hide a bias mix-up in parity tests, so they are
    drawn from N(0, 0.1). attrs validators are disabled so tiny sizes (n_hid < 64, vocab < 512)
    are allowed. The global RNG is left untouched.
    """
    import attr
    import torch
    from dall_e.encoder import Encoder

    kwargs = {"use_mixed_precision": False, **encoder_kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with attr.validators.disabled():
            encoder = Encoder(**kwargs)
        with torch.no_grad():
            for module in encoder.modules():
                if isinstance(getattr(module, "b", None), torch.nn.Parameter):
                    module.b.normal_(std=0.1)
    return encoder


def make_dall_e_encoder_pkl(path, seed: int = 0, **encoder_kwargs):
    """Write a random DALL-E ``encoder.pkl`` to ``path`` and return the path.

    With no ``encoder_kwargs`` it is full size (n_hid=256, 8192 codes, ~54M parameters, ~215 MB,
    about a second to write); pass ``**DALL_E_TINY`` for a tiny one.
    """
    from pathlib import Path

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_dall_e_reference(seed, **encoder_kwargs), path)
    return path


@pytest.fixture(scope="session", name="make_dall_e_encoder_pkl")
def make_dall_e_encoder_pkl_fixture():
    """The factory ``make_dall_e_encoder_pkl(path, seed=0, **encoder_kwargs) -> Path``."""
    return make_dall_e_encoder_pkl


@pytest.fixture(scope="session")
def dall_e_encoder_pkl(tmp_path_factory):
    """A tiny random DALL-E ``encoder.pkl`` (architecture ``DALL_E_TINY``, seed 0)."""
    return make_dall_e_encoder_pkl(tmp_path_factory.mktemp("dall_e") / "encoder.pkl", **DALL_E_TINY)


@pytest.fixture
def dall_e_tokenizer(dall_e_encoder_pkl):
    """A ``DallETokenizer`` on the tiny encoder: 32 px token view -> 4x4 grid of ids in [0, 64)."""
    from bitrain.tokenizers.dall_e import DallETokenizer

    return DallETokenizer(dall_e_encoder_pkl, input_size=32, **DALL_E_TINY)


@pytest.fixture(scope="session")
def dall_e_tiny_kwargs():
    """The tiny DALL-E architecture of ``dall_e_encoder_pkl`` (a copy of ``DALL_E_TINY``)."""
    return dict(DALL_E_TINY)


@pytest.fixture(scope="session")
def dall_e_reference():
    """The factory ``build_dall_e_reference(seed=0, **encoder_kwargs) -> dall_e.Encoder``."""
    return build_dall_e_reference
