"""Fixtures for the model tests: tiny BeitMIM / BEiT classifier configurations, random inputs."""

from __future__ import annotations

import pytest
import torch

TINY = {
    "img_size": 32,
    "patch_size": 8,
    "vocab_size": 48,
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 4,
    "drop_path_rate": 0.0,
}


# ``create_classifier`` kwargs (less the timm name and num_classes) of a tiny timm BEiT classifier:
# relative position bias per layer, LayerScale, mean pooling.
TINY_BEIT_CLASSIFIER = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 48,
    "depth": 2,
    "num_heads": 3,
    "init_values": 0.1,
    "use_abs_pos_emb": False,
    "use_rel_pos_bias": True,
    "use_shared_rel_pos_bias": False,
    "global_pool": "avg",
}


def make_model(seed: int = 0, perturb: bool = True, **overrides):
    """A tiny BeitMIM in eval mode; ``perturb`` makes zero-initialised tensors non-zero."""
    from bitrain.models.beit import BeitMIM

    torch.manual_seed(seed)
    model = BeitMIM(**{**TINY, **overrides}).eval()
    if perturb:  # biases, rel-pos tables, gammas start at constants: a mix-up would hide
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def fixed_count_mask(batch: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """``[batch, n]`` bool with exactly ``k`` True per row at random positions."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(batch, n, generator=g).argsort(dim=1)[:, :k]
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask


@pytest.fixture
def tiny_model():
    return make_model()


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def make_tiny():
    """Factory: ``make_tiny(seed=0, perturb=True, **BeitMIM overrides)``."""
    return make_model


@pytest.fixture
def beit_spec():
    """A fresh copy of :data:`TINY_BEIT_CLASSIFIER` (for ``beit_base_patch16_224``)."""
    return dict(TINY_BEIT_CLASSIFIER)


@pytest.fixture
def make_mask():
    """Factory: ``make_mask(batch, n, k, seed=0)`` -> ``[batch, n]`` bool, ``k`` True per row."""
    return fixed_count_mask
