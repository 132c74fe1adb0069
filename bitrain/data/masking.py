"""Blockwise masking for masked image modeling (BEiT §2.3, Algorithm 1).

Follows the official ``beit/masking_generator.py`` (``MaskingGenerator``), with the settings of
``run_beit_pretraining.py`` as defaults (75 of 14x14 patches, blocks of at least 16 patches,
aspect ratio log-uniform in [0.3, 1/0.3]):

    repeat
        s ~ U(min_num_patches, max_per_block)   # max_per_block = remaining budget (or the cap)
        r ~ logU(min_aspect, max_aspect)
        h, w = round(sqrt(s r)), round(sqrt(s / r))   # up to 10 placements per block
        accept the block if it adds > 0 and <= remaining-budget new patches
    until the budget is reached or a block adds nothing

The official loop stops at the first block that adds nothing, so about a third of its masks have
fewer than 75 patches (docs/data.md). Here the mask always has EXACTLY ``num_masking_patches``
patches: when the block phase stalls, smaller blocks (size ~ U(1, remaining)) top it up, and any
rest is filled with single random unmasked patches. A fixed count keeps the masked logits at a
static shape ``[B, 75, V]`` (``torch.compile``, CUDA graphs).

Randomness comes only from the generator passed in (a ``torch.Generator`` per DataLoader worker,
reseeded per sample by the data module), so a seeded generator gives the same mask sequence. The
algorithm itself runs in pure Python: one seed drawn from the torch generator starts a
``random.Random`` (the official code's Mersenne Twister, drawn from in the official order) and the
mask is a Python integer with one bit per patch, so placing a block is a few integer operations.
The earlier implementation made about 50 torch draws and 15 NumPy window sums a 14x14 mask (113
against 26 us; docs/data.md, "Masks"); the masks of a given seed differ from its masks, their
statistics do not.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

__all__ = ["BlockwiseMaskGenerator"]

_ATTEMPTS = 10  # placement attempts per block, as in the official generator
_SEED_BOUND = 2**63 - 1  # seeds of the per-mask Python RNG: [0, 2**63 - 1)


def _grid(input_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        size = (input_size, input_size)
    else:
        size = tuple(input_size)  # type: ignore[assignment]
    if len(size) != 2 or any(int(v) != v or int(v) <= 0 for v in size):
        raise ValueError(
            f"input_size is the patch grid (height, width) or one side, positive integers; got "
            f"{input_size!r}"
        )
    return int(size[0]), int(size[1])


class BlockwiseMaskGenerator:
    """Draw BEiT block-wise masks with exactly ``num_masking_patches`` True entries.

    Args:
        input_size: Patch grid ``(gh, gw)`` or one side ``g`` (image size // patch size).
        num_masking_patches: Patches to mask per image (BEiT: 75 of 196, ~40%).
        min_num_patches: Smallest block in the block phase (BEiT pretraining: 16).
        max_num_patches: Largest block; ``None`` means the remaining budget.
        min_aspect: Smallest block aspect ratio h/w (sampled log-uniformly).
        max_aspect: Largest aspect ratio; ``None`` means ``1 / min_aspect``.

    Raises:
        ValueError: an argument is out of range (message names it and the valid range).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = (14, 14),
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = _grid(input_size)
        self.num_patches = self.height * self.width
        if int(num_masking_patches) != num_masking_patches or not (
            0 <= num_masking_patches <= self.num_patches
        ):
            raise ValueError(
                f"num_masking_patches must be an integer in [0, {self.num_patches}] for a "
                f"{self.height}x{self.width} grid, got {num_masking_patches!r}"
            )
        self.num_masking_patches = int(num_masking_patches)
        if int(min_num_patches) != min_num_patches or min_num_patches < 1:
            raise ValueError(f"min_num_patches must be an integer >= 1, got {min_num_patches!r}")
        self.min_num_patches = int(min_num_patches)
        if max_num_patches is None:
            max_num_patches = self.num_masking_patches
        elif int(max_num_patches) != max_num_patches or max_num_patches < self.min_num_patches:
            raise ValueError(
                f"max_num_patches ({max_num_patches!r}) must be an integer >= min_num_patches "
                f"({self.min_num_patches}), or null for the remaining budget"
            )
        self.max_num_patches = int(max_num_patches)
        if not float(min_aspect) > 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect!r}")
        max_aspect = 1.0 / float(min_aspect) if max_aspect is None else float(max_aspect)
        if max_aspect < float(min_aspect):
            raise ValueError(
                f"max_aspect ({max_aspect}) must be >= min_aspect ({min_aspect}); leave it null "
                "for 1 / min_aspect"
            )
        self.min_aspect, self.max_aspect = float(min_aspect), max_aspect
        self.log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))
        # _row_stack[h]: bit 0 of each of h rows; times a row's run of w ones = an h x w block.
        rows = range(self.height + 1)
        self._row_stack = [sum(1 << (r * self.width) for r in range(h)) for h in rows]
        self._num_bytes = (self.num_patches + 7) // 8

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid ``(gh, gw)`` of the masks."""
        return self.height, self.width

    def __repr__(self) -> str:
        return (
            f"BlockwiseMaskGenerator(input_size=({self.height}, {self.width}), "
            f"num_masking_patches={self.num_masking_patches}, "
            f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
            f"min_aspect={self.min_aspect:.4g}, max_aspect={self.max_aspect:.4g})"
        )

    # -- randomness: one torch draw seeds Python's Mersenne Twister for the whole mask ----------
    @staticmethod
    def _rng(generator: torch.Generator | random.Random | None) -> random.Random:
        """The Python RNG a mask draws from.

        A ``random.Random`` is used as it is (the official generator's stream: its block phase
        then equals the official mask). From a ``torch.Generator`` (or torch's global RNG for
        ``None``) ONE 63-bit seed is drawn, so masks stay a function of that generator's state:
        a torch call per draw (about 50 a mask) cost more than the whole mask in pure Python.
        """
        if isinstance(generator, random.Random):
            return generator
        seed = int(torch.randint(0, _SEED_BOUND, (), generator=generator))
        return random.Random(seed)

    def _add_block(
        self, bits: int, budget: int, min_size: float, rng: random.Random
    ) -> tuple[int, int]:
        """Try up to 10 placements of one random block: ``(new bits, patches added)``.

        ``bits`` holds the mask row by row (bit ``i * width + j`` is patch ``(i, j)``); a block of
        ``h`` x ``w`` at ``(top, left)`` is ``w`` ones repeated on ``h`` rows, so counting and
        adding its new patches are two integer operations. The draws are the official ones, in
        its order: area, log-aspect, then top and left only for a block that fits.
        """
        for _ in range(_ATTEMPTS):
            # Like the official code, U(a, b) with a > b (budget below min_size) is U(b, a).
            area = rng.uniform(min_size, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:  # strict, as in the official code
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = ((1 << w) - 1) * self._row_stack[h] << (top * self.width + left)
                new = (block & ~bits).bit_count()
                if 0 < new <= budget:
                    return bits | block, new
        return bits, 0

    def _block_phase(self, rng: random.Random) -> tuple[int, int]:
        """The official loop on the bit mask: ``(bits, count)``, stopping at a block adding 0."""
        bits, count = 0, 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            bits, added = self._add_block(bits, budget, self.min_num_patches, rng)
            if added == 0:
                break
            count += added
        return bits, count

    def _to_array(self, bits: int) -> np.ndarray:
        """Bit mask -> bool ``[gh, gw]``."""
        packed = np.frombuffer(bits.to_bytes(self._num_bytes, "little"), dtype=np.uint8)
        flat = np.unpackbits(packed, count=self.num_patches, bitorder="little")
        return flat.view(np.bool_).reshape(self.height, self.width)

    def block_phase(self, generator: torch.Generator | random.Random | None = None) -> np.ndarray:
        """The official algorithm alone (may stop short of the budget): bool ``[gh, gw]``.

        With a ``random.Random`` in the state the official ``MaskingGenerator`` would find
        Python's global RNG in, this is its mask (tested).
        """
        bits, _ = self._block_phase(self._rng(generator))
        return self._to_array(bits)

    def __call__(self, generator: torch.Generator | random.Random | None = None) -> torch.Tensor:
        """Draw one mask.

        Args:
            generator: Source of randomness: a ``torch.Generator`` (``None``: torch's global RNG),
                from which one seed is drawn per mask, or a ``random.Random`` drawn from directly.

        Returns:
            BoolTensor ``[gh, gw]`` with exactly ``num_masking_patches`` True entries.
        """
        rng = self._rng(generator)
        bits, count = self._block_phase(rng)
        # Top-up 1: smaller blocks (size ~ U(1, remaining)) until they stall too.
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            bits, added = self._add_block(bits, budget, 1, rng)
            if added == 0:
                break
            count += added
        # Top-up 2: single random unmasked patches.
        missing = self.num_masking_patches - count
        if missing > 0:
            free = [i for i in range(self.num_patches) if not bits >> i & 1]
            for i in rng.sample(free, missing):
                bits |= 1 << i
        return torch.from_numpy(self._to_array(bits))
