"""The demo retrains a tokenizer left by another configuration instead of failing on it."""

import torch

from bitrain.demo import _tokenizer_is_stale
from bitrain.tokenizers.dvae import DiscreteVAE, save_dvae


def _save(path, **kwargs):
    torch.manual_seed(0)
    save_dvae(DiscreteVAE(vocab_size=512, input_size=32, **kwargs), path)
    return path


def test_current_tokenizer_is_kept(tmp_path):
    assert not _tokenizer_is_stale(_save(tmp_path / "a.pt", num_downsamples=3))


def test_tokenizer_of_another_grid_or_width_is_stale(tmp_path):
    # The 8x8-grid tokenizer of earlier demos (two downsamples) no longer fits the 4x4 patch grid.
    assert _tokenizer_is_stale(_save(tmp_path / "old.pt", num_downsamples=2))
    assert _tokenizer_is_stale(_save(tmp_path / "wide.pt", num_downsamples=3, hidden_dim=32))
