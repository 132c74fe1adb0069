"""The tokenizer contract (docs/architecture.md): every tokenizer in bitrain passes this class.

To add a tokenizer, add one line to ``FACTORIES``: a name and a function of pytest's ``request``
that returns a small instance (it may pull any fixture with ``request.getfixturevalue``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bitrain.tokenizers.base import Tokenizer

FACTORIES: dict[str, Callable[[pytest.FixtureRequest], Tokenizer]] = {
    "dall_e": lambda r: r.getfixturevalue("dall_e_tokenizer"),  # tiny encoder.pkl, 32 px
    "dvae": lambda r: r.getfixturevalue("dvae_tokenizer"),  # tiny dVAE file, 16 px
}


@pytest.fixture(params=sorted(FACTORIES))
def tokenizer(request) -> Tokenizer:
    return FACTORIES[request.param](request)


def _pixels(tok: Tokenizer, n: int = 4, seed: int = 0) -> torch.Tensor:
    """Token-view images in [0, 1], ``[n, 3, input_size, input_size]``."""
    size = tok.input_size
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class TestTokenizerContract:
    def test_attributes(self, tokenizer):
        assert isinstance(tokenizer, Tokenizer)
        assert isinstance(tokenizer.vocab_size, int) and tokenizer.vocab_size > 1
        assert isinstance(tokenizer.input_size, int) and tokenizer.input_size > 0
        grid = tokenizer.grid_size
        assert isinstance(grid, tuple) and len(grid) == 2
        assert all(isinstance(g, int) and 0 < g <= tokenizer.input_size for g in grid)
        assert isinstance(tokenizer.can_decode, bool)

    def test_preprocess_keeps_shape(self, tokenizer):
        x = _pixels(tokenizer)
        y = tokenizer.preprocess(x)
        assert y.shape == x.shape and y.is_floating_point()
        assert torch.isfinite(y).all()

    def test_encode_ids(self, tokenizer):
        ids = tokenizer.encode(tokenizer.preprocess(_pixels(tokenizer, n=3)))
        assert ids.dtype == torch.int64
        assert ids.shape == (3, *tokenizer.grid_size)
        assert 0 <= int(ids.min()) and int(ids.max()) < tokenizer.vocab_size

    def test_no_gradients_and_weights_unchanged(self, tokenizer):
        before = {k: v.clone() for k, v in tokenizer.state_dict().items()}
        x = tokenizer.preprocess(_pixels(tokenizer)).requires_grad_(True)
        with torch.enable_grad():
            ids = tokenizer.encode(x)
        assert not ids.requires_grad and ids.grad_fn is None
        assert not any(p.requires_grad for p in tokenizer.parameters())
        after = tokenizer.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)

    def test_deterministic(self, tokenizer):
        x = tokenizer.preprocess(_pixels(tokenizer))
        assert torch.equal(tokenizer.encode(x), tokenizer.encode(x))

    def test_batch_independent(self, tokenizer):
        x = tokenizer.preprocess(_pixels(tokenizer, n=4, seed=1))
        one_by_one = torch.cat([tokenizer.encode(x[i : i + 1]) for i in range(len(x))])
        assert torch.equal(tokenizer.encode(x), one_by_one)

    def test_decode_consistent_with_can_decode(self, tokenizer):
        ids = tokenizer.encode(tokenizer.preprocess(_pixels(tokenizer, n=2)))
        if tokenizer.can_decode:
            out = tokenizer.decode(ids)
            assert out.shape == (2, 3, tokenizer.input_size, tokenizer.input_size)
            assert out.is_floating_point() and 0 <= out.min() and out.max() <= 1
        else:
            with pytest.raises(NotImplementedError):
                tokenizer.decode(ids)

    def test_stays_in_eval_mode(self, tokenizer):
        tokenizer.train()
        assert not tokenizer.training
        assert not any(m.training for m in tokenizer.modules())
