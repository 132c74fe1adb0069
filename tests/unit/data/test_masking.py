"""BlockwiseMaskGenerator: exact counts, BEiT block statistics, reproducibility, validation."""

import math
import random

import numpy as np
import pytest
import torch
from scipy import ndimage

from bitrain.data.masking import BlockwiseMaskGenerator


def official_mask(rng: random.Random, height=14, width=14, n=75, min_p=16, min_aspect=0.3):
    """A faithful re-statement of unilm beit/masking_generator.py (MaskingGenerator.__call__).

    Returns the mask and the size of the first accepted block (no top-up: may stop short of n).
    """
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros((height, width), dtype=int)

    def add_block(max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(min_p, max_mask_patches)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    count, first = 0, None
    while count < n:
        delta = add_block(n - count)
        if delta == 0:
            break
        first = delta if first is None else first
        count += delta
    return mask.astype(bool), first


def _components(mask: np.ndarray) -> int:
    return ndimage.label(mask)[1]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # BEiT: 14x14, 75, min 16
        {"input_size": 8, "num_masking_patches": 26, "min_num_patches": 4},
        {"input_size": 4, "num_masking_patches": 6, "min_num_patches": 2},  # the demo
        {"input_size": (6, 10), "num_masking_patches": 30, "min_num_patches": 4},
        {"input_size": 4, "num_masking_patches": 16, "min_num_patches": 4},  # full grid
        {"input_size": 4, "num_masking_patches": 15, "min_num_patches": 4},
        {"input_size": 4, "num_masking_patches": 1, "min_num_patches": 4},
        {"input_size": 4, "num_masking_patches": 0},
        {"input_size": 1, "num_masking_patches": 1, "min_num_patches": 1},
    ],
)
def test_exact_count_every_draw(kwargs):
    gen = BlockwiseMaskGenerator(**kwargs)
    g = torch.Generator().manual_seed(0)
    draws = 300 if gen.num_patches > 20 else 100
    for _ in range(draws):
        mask = gen(generator=g)
        assert mask.dtype == torch.bool
        assert tuple(mask.shape) == gen.grid_size
        assert int(mask.sum()) == gen.num_masking_patches


def test_block_statistics_match_official():
    """Block phase = official algorithm: first-block size, components, short-fall rate."""
    n = 2000
    gen = BlockwiseMaskGenerator()
    g = torch.Generator().manual_seed(1)
    rng = random.Random(1)
    official = [official_mask(rng) for _ in range(n)]
    ours_blocks = [gen.block_phase(g) for _ in range(n)]
    ours_full = [gen(generator=g).numpy() for _ in range(n)]

    off_full_rate = np.mean([m.sum() == 75 for m, _ in official])
    our_full_rate = np.mean([m.sum() == 75 for m in ours_blocks])
    assert 0.62 < off_full_rate < 0.71  # ~2/3 (RECIPES.md §2.1: 66.6% over 20,000 masks)
    assert abs(our_full_rate - off_full_rate) < 0.05

    off_comp = np.mean([_components(m) for m, _ in official])
    our_comp = np.mean([_components(m) for m in ours_blocks])
    assert abs(our_comp - off_comp) < 0.1 * off_comp
    # The top-up adds a few small pieces at most.
    full_comp = np.mean([_components(m) for m in ours_full])
    assert off_comp <= full_comp < off_comp + 1.0

    # First block: the official first block is drawn from U(16, 75); compare its mean size with
    # the number of patches of a fresh generator's first block (one block-phase step).
    off_first = np.mean([f for _, f in official])
    first = BlockwiseMaskGenerator(num_masking_patches=75)
    rng2 = random.Random(2)
    our_first = np.mean([first._add_block(0, 75, 16, rng2)[1] for _ in range(n)])
    assert abs(our_first - off_first) < 0.08 * off_first
    assert 25 < our_first < 50  # mean of U(16, 75) is 45.5; rounding and rejections lower it


def test_masks_are_blocky_not_scattered():
    """Most masked patches have a masked 4-neighbour (blocks), unlike a random scatter."""
    gen = BlockwiseMaskGenerator()
    g = torch.Generator().manual_seed(3)
    masks = torch.stack([gen(generator=g) for _ in range(200)]).numpy()
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    neighbours = (
        padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
    )
    assert (neighbours & masks).sum() / masks.sum() > 0.95


def test_same_seed_same_masks_different_seed_different():
    gen = BlockwiseMaskGenerator()
    a = [gen(torch.Generator().manual_seed(7)) for _ in range(3)]
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    seq1 = torch.stack([gen(g1) for _ in range(20)])
    seq2 = torch.stack([gen(g2) for _ in range(20)])
    assert torch.equal(seq1, seq2)
    assert torch.equal(a[0], a[1])
    g3 = torch.Generator().manual_seed(8)
    seq3 = torch.stack([gen(g3) for _ in range(20)])
    assert not torch.equal(seq1, seq3)
    # Consecutive draws differ too.
    assert len({m.numpy().tobytes() for m in seq1}) == 20


def test_global_rng_when_no_generator():
    gen = BlockwiseMaskGenerator(8, 26, 4)
    torch.manual_seed(0)
    a = gen()
    torch.manual_seed(0)
    assert torch.equal(a, gen())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_size": 4, "num_masking_patches": 17}, "num_masking_patches"),
        ({"num_masking_patches": -1}, "num_masking_patches"),
        ({"input_size": 0}, "input_size"),
        ({"input_size": (14, 14, 3)}, "input_size"),
        ({"min_num_patches": 0}, "min_num_patches"),
        ({"min_num_patches": 16, "max_num_patches": 8}, "max_num_patches"),
        ({"min_aspect": 0.0}, "min_aspect"),
        ({"min_aspect": -1.0}, "min_aspect"),
        ({"min_aspect": 2.0, "max_aspect": 1.0}, "max_aspect"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockwiseMaskGenerator(**kwargs)


def test_repr_and_sizes():
    gen = BlockwiseMaskGenerator((6, 10), 30, 4, max_num_patches=12, min_aspect=0.5)
    assert gen.num_patches == 60 and gen.grid_size == (6, 10)
    assert gen.max_aspect == pytest.approx(2.0)
    text = repr(gen)
    assert "(6, 10)" in text and "num_masking_patches=30" in text and "max_num_patches=12" in text


def test_max_num_patches_caps_block_phase_blocks():
    gen = BlockwiseMaskGenerator(14, 75, 4, max_num_patches=8)
    rng = random.Random(0)
    for _ in range(50):
        assert gen._add_block(0, 8, 4, rng)[1] <= 8


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"input_size": (6, 10), "num_masking_patches": 30, "min_num_patches": 4}],
)
def test_block_phase_is_the_official_mask_for_the_same_python_rng(kwargs):
    """Handed a ``random.Random``, the block phase makes the official MaskingGenerator's draws
    in its order, so its mask IS the official mask; the top-up only adds patches to it."""
    gen = BlockwiseMaskGenerator(**kwargs)
    h, w = gen.grid_size
    n, min_p = gen.num_masking_patches, gen.min_num_patches
    short = 0
    for seed in range(300):
        official, _ = official_mask(random.Random(seed), h, w, n, min_p)
        np.testing.assert_array_equal(gen.block_phase(random.Random(seed)), official)
        full = gen(random.Random(seed)).numpy()
        assert full.sum() == n and (full & official).sum() == official.sum()
        short += int(official.sum() < n)
    assert short > 10  # the top-up was exercised (BEiT: a third of official masks stop short)


def test_a_mask_takes_one_draw_from_the_torch_generator():
    """The algorithm runs on a Python RNG seeded by ONE draw of the torch generator (it made
    ~100 small torch calls per mask before); Python's global ``random`` is left alone."""
    gen = BlockwiseMaskGenerator()
    g, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    random.seed(11)
    python_state = random.getstate()
    for _ in range(20):
        gen(generator=g)
        torch.randint(0, 2**63 - 1, (), generator=ref)
        assert torch.equal(g.get_state(), ref.get_state())
    assert random.getstate() == python_state
