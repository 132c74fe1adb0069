"""Helpers of ``python -m bitrain.demo``: stale tokenizers, and how figures are printed."""

import torch

from bitrain.tokenizers.dvae import DiscreteVAE, save_dvae
from bitrain.tools.demo import _mean_spread, _tokenizer_is_stale


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


def test_accuracies_print_as_percent_and_gaps_as_signed_points():
    assert _mean_spread([0.716]) == "71.6%"
    assert _mean_spread([0.063], difference=True) == "+6.3 points"
    assert _mean_spread([-0.023], difference=True) == "-2.3 points"
    three = _mean_spread([0.063, 0.164, 0.13], difference=True)
    assert three == "+11.9 points +- 5.1 (n=3: +6.3, +16.4, +13.0)"
    assert _mean_spread([0.70, 0.72, 0.74]) == "72.0% +- 2.0 (n=3: 70.0, 72.0, 74.0)"
