"""DALL-E's discrete VAE encoder as BEiT's image tokenizer, re-implemented as a native module.

BEiT (Bao et al., 2021, §2.1.2) takes the targets of masked image modeling from the encoder of
DALL-E's dVAE (Ramesh et al., 2021): a 112x112 token view becomes a 14x14 grid of ids in [0, 8192),
the argmax of the encoder's logits (``beit/modeling_discrete_vae.py``,
``Dalle_VAE.get_codebook_indices``). The architecture follows ``dall_e/encoder.py`` and
``dall_e/utils.py`` of openai/DALL-E (PyPI ``dall-e==0.1``): a 7x7 input conv, ``group_count``
groups of residual blocks whose width doubles per group, a 2x max-pool after every group but the
last, and a ReLU + 1x1 conv to the vocabulary. Each block adds ``post_gain * res_path(x)`` to
``id_path(x)`` with ``post_gain = 1 / n_layers**2`` (``n_layers = group_count * n_blk_per_group``).

OpenAI's ``encoder.pkl`` is a pickled ``dall_e.encoder.Encoder`` object, not a state dict. It is
read through :func:`bitrain.io.load_pickled_module`, which maps exactly the classes such a file
needs to inert records, so no code from the file or from the ``dall_e`` package runs; the tensors
are then copied into :class:`DallEEncoder`, whose parameters are plain ``nn.Conv2d`` ones named
``weight``/``bias`` instead of DALL-E's ``w``/``b``. Convert once to ``.safetensors`` with
``python -m bitrain.tokenizers.dall_e convert encoder.pkl encoder.safetensors``.

With ``decoder_path`` (OpenAI's ``decoder.pkl``, read the same way into
:class:`~bitrain.tokenizers.dall_e_decoder.DallEDecoder`) the tokenizer can also :meth:`decode`
ids back to pixels, for the reconstruction columns of the MIM panels.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from bitrain.io import CheckpointError
from bitrain.tokenizers.base import Tokenizer
from bitrain.tokenizers.dall_e_decoder import (
    LOGIT_LAPLACE_EPS,
    DallEDecoder,
    load_dall_e_decoder,
    unmap_pixels,
)
from bitrain.tokenizers.dall_e_encoder import (
    DALL_E_PICKLE_CLASSES,
    DallEEncoder,
    DallEEncoderBlock,
    convert,
    dall_e_key_to_native,
    load_dall_e_encoder,
    native_key_to_dall_e,
    save_encoder,
)

__all__ = [
    "DALL_E_PICKLE_CLASSES",
    "LOGIT_LAPLACE_EPS",
    "DallEDecoder",
    "DallEEncoder",
    "DallEEncoderBlock",
    "DallETokenizer",
    "convert",
    "dall_e_key_to_native",
    "load_dall_e_decoder",
    "load_dall_e_encoder",
    "map_pixels",
    "native_key_to_dall_e",
    "unmap_pixels",
]

log = logging.getLogger(__name__)

_AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """DALL-E's pixel mapping ``x -> (1 - 2 eps) x + eps`` (eps = 0.1), any shape, [0, 1] in."""
    if not x.is_floating_point():
        raise TypeError(
            f"DALL-E pixel mapping expects float pixels in [0, 1], got {x.dtype}; divide uint8 "
            "images by 255 first"
        )
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


class DallETokenizer(Tokenizer):
    """BEiT's visual tokenizer: argmax of DALL-E's encoder logits, frozen; optionally a decoder.

    The architecture keys must equal what the weights file holds (a mismatch is a ``ValueError``
    naming both values): ``vocab_size`` sizes the model's LM head by interpolation, so silently
    following the file would only move the error elsewhere.

    Args:
        weights_path: ``encoder.pkl`` (OpenAI's pickled module), or a ``.safetensors`` /
            ``.pt`` / ``.pth`` state dict in our or DALL-E's naming (detected by content).
        input_size: side of the token view in pixels (112 for BEiT's 14x14 grid).
        vocab_size: codebook size (8192).
        group_count: encoder groups (4: three 2x pools, grid = input_size // 8).
        n_hid: width of the first group (256).
        n_blk_per_group: residual blocks per group (2).
        precision: ``"float32"`` (default), or ``"bfloat16"``/``"float16"`` autocast for the
            trunk (the output conv stays float32), for speed on GPUs; the decoder's too.
        decoder_path: optional ``decoder.pkl`` (OpenAI's pickled ``dall_e.decoder.Decoder``) or a
            state dict of it; with it :meth:`decode` turns ids back into pixels (for panels) and
            ``can_decode`` is True. Its ``vocab_size`` and ``group_count`` must equal the
            encoder's. ``None`` (default): no decoder, ``decode`` raises NotImplementedError.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike,
        input_size: int = 112,
        vocab_size: int = 8192,
        group_count: int = 4,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        precision: str = "float32",
        decoder_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if precision not in _AUTOCAST:
            raise ValueError(
                f"DallETokenizer: precision must be one of {list(_AUTOCAST)}, got {precision!r}"
            )
        downsample = 2 ** (group_count - 1)
        if input_size % downsample:
            raise ValueError(
                f"DallETokenizer: input_size={input_size} must be divisible by {downsample} "
                f"(2**(group_count-1)) so the token grid is whole"
            )
        self.encoder = load_dall_e_encoder(
            weights_path,
            group_count=group_count,
            n_hid=n_hid,
            n_blk_per_group=n_blk_per_group,
            input_channels=3,
            vocab_size=vocab_size,
        )
        # channels_last: the layout cuDNN and oneDNN convolutions prefer.
        self.encoder.to(memory_format=torch.channels_last)
        self.weights_path = str(weights_path)
        self.vocab_size = vocab_size
        self.input_size = input_size
        self.grid_size = (input_size // downsample, input_size // downsample)
        self.precision = precision
        self.decoder: DallEDecoder | None = None
        self.decoder_path = None if decoder_path is None else str(decoder_path)
        if decoder_path is not None:
            # Expected from the encoder: the same codes, and as many 2x upsamplings as it pools,
            # so a grid decodes to input_size pixels.
            self.decoder = load_dall_e_decoder(
                decoder_path, vocab_size=vocab_size, group_count=group_count, output_channels=3
            )
            self.decoder.to(memory_format=torch.channels_last)
            log.info("DALL-E decoder from %s: %s", decoder_path, self.decoder.hparams)
        self.freeze()  # encoder and decoder: eval mode, no gradients
        log.info("DALL-E tokenizer from %s: %s", weights_path, self.encoder.hparams)

    @property
    def can_decode(self) -> bool:
        """Whether :meth:`decode` is available: True when built with a ``decoder_path``."""
        return self.decoder is not None

    def preprocess(self, images_01: torch.Tensor) -> torch.Tensor:
        """DALL-E's ``map_pixels``: ``[..., H, W]`` pixels in [0, 1] -> [0.1, 0.9], same shape."""
        return map_pixels(images_01)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder logits ``[B, vocab_size, gh, gw]`` (float32) of preprocessed ``[B, 3, H, W]``."""
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (self.input_size,) * 2:
            raise ValueError(
                f"DallETokenizer expects preprocessed images [B, 3, {self.input_size}, "
                f"{self.input_size}], got {list(x.shape)}; resize the token view to "
                "tokenizer.input_size"
            )
        x = x.to(dtype=torch.float32, memory_format=torch.channels_last)
        amp = _AUTOCAST[self.precision]
        with torch.autocast(device_type=x.device.type, dtype=amp, enabled=amp is not None):
            return self.encoder(x)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, gh, gw]`` (int64) of preprocessed images ``[B, 3, H, W]``; no grad.

        Safe under ``torch.inference_mode``: the ids are cloned out of inference mode so that they
        can still serve as cross-entropy targets of a loss that is backpropagated.
        """
        ids = self.logits(x).argmax(dim=1)
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                ids = ids.clone()
        return ids

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] ``[B, 3, H, W]`` (float32) of token ids ``[B, gh, gw]``; no grad.

        DALL-E's reconstruction: ``unmap_pixels(sigmoid(decoder(one_hot(ids))[:, :3]))``;
        ``H = gh * 2**(group_count-1)`` (``input_size`` for a grid of ``grid_size``).

        Raises:
            NotImplementedError: the tokenizer was built without ``decoder_path``.
            ValueError: ``ids`` is not an integer ``[B, gh, gw]`` tensor in ``[0, vocab_size)``.
        """
        if self.decoder is None:
            raise NotImplementedError(
                "this DallETokenizer has no decoder, so it cannot decode token ids: pass "
                "tokenizer.decoder_path=.../decoder.pkl (OpenAI's DALL-E decoder, from "
                "https://cdn.openai.com/dall-e/decoder.pkl; see docs/tokenizers.md)"
            )
        if ids.ndim != 3 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(
                f"DallETokenizer.decode expects integer token ids [B, gh, gw], got "
                f"{ids.dtype} {list(ids.shape)}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(
                f"DallETokenizer.decode: ids must lie in [0, {self.vocab_size}), got "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )
        ids = ids.long()
        amp = _AUTOCAST[self.precision]
        with torch.autocast(device_type=ids.device.type, dtype=amp, enabled=amp is not None):
            return self.decoder.decode(ids).float()

    def save_state_dict(self, path: str | os.PathLike) -> Path:
        """Write the encoder's weights to ``path`` (``.safetensors`` or torch); see :func:`convert`.

        Returns:
            The path written.
        """
        return save_encoder(self.encoder, path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bitrain.tokenizers.dall_e convert SRC DST``: encoder.pkl -> .safetensors."""
    parser = argparse.ArgumentParser(
        prog="python -m bitrain.tokenizers.dall_e", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser(
        "convert", help="convert encoder.pkl (or a state dict) to .safetensors/.pt"
    )
    conv.add_argument("src", type=Path, help="DALL-E encoder.pkl, .safetensors, .pt or .pth")
    conv.add_argument("dst", type=Path, help="output file; .safetensors recommended")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert(args.src, args.dst)
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        log.error("error: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
