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

Randomness comes only from the ``torch.Generator`` passed in (per DataLoader worker), so a seeded
generator gives the same mask sequence.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["BlockwiseMaskGenerator"]

_ATTEMPTS = 10  # placement attempts per block, as in the official generator


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

    # -- random draws (torch RNG so a DataLoader worker's generator controls everything) --------
    @staticmethod
    def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    @staticmethod
    def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
        """Integer in [low, high], both ends included (like ``random.randint``)."""
        return int(torch.randint(low, high + 1, (), generator=generator))

    def _add_block(
        self, mask: np.ndarray, budget: int, min_size: float, generator: torch.Generator | None
    ) -> int:
        """Try up to 10 placements of one random block; return how many patches it added."""
        for _ in range(_ATTEMPTS):
            # Like the official code, U(a, b) with a > b (budget below min_size) is U(b, a).
            area = self._uniform(min_size, budget, generator)
            aspect = math.exp(self._uniform(*self.log_aspect, generator))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:  # strict, as in the official code
                top = self._randint(0, self.height - h, generator)
                left = self._randint(0, self.width - w, generator)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= budget:
                    window[...] = True
                    return new
        return 0

    def block_phase(
        self, generator: torch.Generator | None = None, mask: np.ndarray | None = None
    ) -> np.ndarray:
        """The official algorithm alone (may stop short of the budget): bool ``[gh, gw]``."""
        mask = np.zeros((self.height, self.width), dtype=bool) if mask is None else mask
        count = int(mask.sum())
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, self.min_num_patches, generator)
            if added == 0:
                break
            count += added
        return mask

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one mask.

        Args:
            generator: Source of randomness (``None``: torch's global RNG).

        Returns:
            BoolTensor ``[gh, gw]`` with exactly ``num_masking_patches`` True entries.
        """
        mask = self.block_phase(generator)
        count = int(mask.sum())
        # Top-up 1: smaller blocks (size ~ U(1, remaining)) until they stall too.
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, 1, generator)
            if added == 0:
                break
            count += added
        # Top-up 2: single random unmasked patches.
        missing = self.num_masking_patches - count
        if missing > 0:
            free = np.flatnonzero(~mask)
            pick = torch.randperm(len(free), generator=generator)[:missing].numpy()
            mask.flat[free[pick]] = True
        return torch.from_numpy(mask)
