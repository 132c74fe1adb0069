"""Fixtures of the tokenizer tests: a tiny bitrain dVAE tokenizer file (random weights)."""

from __future__ import annotations

import pytest
import torch

# A tiny dVAE: 16 px -> 4x4 grid over 32 codes (~10k parameters).
DVAE_TINY = {
    "vocab_size": 32,
    "input_size": 16,
    "num_downsamples": 2,
    "hidden_dim": 16,
    "num_res_blocks": 1,
    "codebook_dim": 8,
}


@pytest.fixture(scope="session")
def dvae_file(tmp_path_factory):
    """A random tiny dVAE (``DVAE_TINY``, seed 0) saved by ``save_dvae``; returns the path."""
    from bitrain.tokenizers.dvae import DiscreteVAE, save_dvae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DiscreteVAE(**DVAE_TINY)
    path = tmp_path_factory.mktemp("dvae") / "tiny_dvae.pt"
    save_dvae(model, path, stats={"codebook_usage": 0.5, "perplexity": 10.0})
    return path


@pytest.fixture
def dvae_tokenizer(dvae_file):
    """A ``DVAETokenizer`` on the tiny file: 16 px -> 4x4 ids in [0, 32)."""
    from bitrain.tokenizers.dvae import DVAETokenizer

    return DVAETokenizer(dvae_file)


@pytest.fixture(scope="session")
def dvae_tiny_kwargs():
    """The tiny dVAE architecture of ``dvae_file`` (a copy of ``DVAE_TINY``)."""
    return dict(DVAE_TINY)
