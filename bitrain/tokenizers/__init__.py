"""Visual tokenizers: images in, grids of discrete token ids out (see :mod:`bitrain.tokenizers.base`)."""

from bitrain.tokenizers.base import Tokenizer

__all__ = ["Tokenizer"]
