"""The tokenizer protocol every visual tokenizer implements (BEiT §2.1.2, "image tokenizer").

A tokenizer maps the *token view* of an image (pixels in [0, 1], ``input_size`` square) to a grid
of discrete ids ``[B, gh, gw]`` in ``[0, vocab_size)``. The grid must equal the encoder's patch
grid, so the id at ``(i, j)`` is the target of patch ``(i, j)``. DALL-E's dVAE, a self-trained
dVAE, or a later tokenizer plug in by config because they share this small surface:

* ``vocab_size``, ``input_size`` (pixels), ``grid_size`` (``(gh, gw)``)
* ``preprocess(images_01)``: the tokenizer's own pixel mapping (DALL-E's ``map_pixels``)
* ``encode(x)``: ids, computed without gradients
* ``decode(ids)`` (optional): pixels in [0, 1], for reconstructions in panels
"""

from __future__ import annotations

import torch
from torch import nn


class Tokenizer(nn.Module):
    """Base class: a frozen ``nn.Module`` (so it moves with ``.to(device)``) with the protocol."""

    vocab_size: int
    input_size: int
    grid_size: tuple[int, int]

    def preprocess(self, images_01: torch.Tensor) -> torch.Tensor:
        """Map pixels in [0, 1] ``[B, 3, H, W]`` to what :meth:`encode` expects (default: as is)."""
        return images_01

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, gh, gw]`` (int64) of preprocessed images ``[B, 3, H, W]``; no grad."""
        raise NotImplementedError

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] ``[B, 3, H, W]`` from ids ``[B, gh, gw]``; optional."""
        raise NotImplementedError(f"{type(self).__name__} cannot decode token ids")

    @property
    def can_decode(self) -> bool:
        """Whether :meth:`decode` is available."""
        return type(self).decode is not Tokenizer.decode

    def freeze(self) -> Tokenizer:
        """Eval mode and no gradients: a tokenizer is never trained by the MIM step."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> Tokenizer:
        """Stay in eval mode: Lightning calls ``train()`` on the whole task each epoch."""
        return super().train(False)
