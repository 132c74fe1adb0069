"""Visual tokenizers: images in, grids of token ids out (see :mod:`bitrain.tokenizers.base`)."""

from bitrain.tokenizers.base import Tokenizer

__all__ = ["Tokenizer"]
