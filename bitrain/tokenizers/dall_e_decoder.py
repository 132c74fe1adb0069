"""DALL-E's dVAE decoder as a native module: token ids back to pixels, for reconstruction panels.

The architecture follows ``dall_e/decoder.py`` and ``dall_e/utils.py`` of openai/DALL-E (PyPI
``dall-e==0.1``): a 1x1 input conv from the one-hot codes (``vocab_size`` channels) to ``n_init``
channels, ``group_count`` groups of residual blocks whose width halves per group (``8, 4, 2, 1``
times ``n_hid`` for DALL-E's 4 groups), a nearest 2x upsampling after every group but the last,
and a ReLU + 1x1 conv to ``2 * output_channels`` channels: the mean and log-scale of DALL-E's
logit-Laplace distribution per pixel. Each block adds ``post_gain * res_path(x)`` to ``id_path(x)``
with ``post_gain = 1/n_layers**2``; its residual path is a 1x1 conv and three 3x3 convs (the
encoder's is three 3x3 and a 1x1).

Pixels are read off as DALL-E's notebook does: ``unmap_pixels(sigmoid(stats[:, :3]))``, where
``unmap_pixels`` undoes the encoder's ``map_pixels`` (``x -> (x - eps) / (1 - 2 eps)``, eps 0.1)
and clamps to [0, 1]. The one-hot input conv is computed as an embedding lookup of its weight
columns (the same numbers, without building a ``[B, vocab_size, h, w]`` one-hot tensor).

OpenAI's ``decoder.pkl`` is a pickled ``dall_e.decoder.Decoder`` object. Like ``encoder.pkl`` it
is read through :func:`bitrain.io.load_pickled_module`, which admits exactly the classes such a
file names (:data:`DALL_E_DECODER_PICKLE_CLASSES`), each mapped to an inert record, so no code from
the file or from the ``dall_e`` package runs; the tensors are then copied into
:class:`DallEDecoder` (``w``/``b`` renamed to ``weight``/``bias``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bitrain.io import CheckpointError, PickledModule
from bitrain.tokenizers._dall_e_io import DallEFile, conv_layout, load_module, save_module
from bitrain.tokenizers.dall_e_encoder import _check_sizes, _conv, _ResidualBlock, _run, _stack

__all__ = [
    "DALL_E_DECODER_PICKLE_CLASSES",
    "DECODER_HPARAMS",
    "LOGIT_LAPLACE_EPS",
    "DallEDecoder",
    "DallEDecoderBlock",
    "load_dall_e_decoder",
    "save_decoder",
    "unmap_pixels",
]

log = logging.getLogger(__name__)

LOGIT_LAPLACE_EPS = 0.1  # dall_e/utils.py: pixels live in [eps, 1 - eps] for the logit-Laplace loss

# The classes a pickled ``dall_e.decoder.Decoder`` names; any other global in the file is refused.
DALL_E_DECODER_PICKLE_CLASSES: tuple[str, ...] = (
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
)
DECODER_HPARAMS = (
    "group_count",
    "n_init",
    "n_hid",
    "n_blk_per_group",
    "output_channels",
    "vocab_size",
)
DECODER_HINT = (
    "Download OpenAI's DALL-E decoder yourself (https://cdn.openai.com/dall-e/decoder.pkl) and "
    "set tokenizer.decoder_path to it, or leave decoder_path null (no reconstructions in panels); "
    "bitrain never downloads. See docs/tokenizers.md"
)
_FILE = DallEFile(
    noun="decoder",
    pickle_classes=DALL_E_DECODER_PICKLE_CLASSES,
    hparams=DECODER_HPARAMS,
    config_key="tokenizer.decoder_path",
    missing_hint=DECODER_HINT,
    mismatch_advice=(
        "The decoder must decode the encoder's ids to the token view's size: point "
        "tokenizer.decoder_path at the decoder released with the encoder"
    ),
    mistaken=(
        "dall_e.encoder",
        "This looks like DALL-E's encoder.pkl: decoder_path wants decoder.pkl "
        "(https://cdn.openai.com/dall-e/decoder.pkl)",
    ),
)


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """DALL-E's ``unmap_pixels``: ``x -> clamp((x - eps) / (1 - 2 eps), 0, 1)`` (eps = 0.1)."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


class DallEDecoderBlock(_ResidualBlock):
    """Residual block ``id_path(x) + post_gain * res_path(x)`` (``dall_e.decoder.DecoderBlock``).

    Its residual path's kernels are 1, 3, 3, 3 (the encoder's are 3, 3, 3, 1).

    Args:
        n_in: input channels.
        n_out: output channels (multiple of 4); the bottleneck has ``n_out // 4``.
        n_layers: blocks in the whole decoder; ``post_gain = 1 / n_layers**2``.
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__(n_in, n_out, n_layers, (1, 3, 3, 3))


class DallEDecoder(nn.Module):
    """DALL-E's dVAE decoder (``dall_e.decoder.Decoder``) with standard parameter names.

    Module names mirror DALL-E's (``blocks.group_1.block_1.res_path.conv_1``), so that
    :func:`~bitrain.tokenizers.dall_e_encoder.dall_e_key_to_native` maps a ``decoder.pkl`` state
    one to one.

    Args:
        group_count: groups of blocks; width ``n_hid * 2**(group_count - g)`` in group ``g``
            (1-based), and a nearest 2x upsampling after each group but the last (4 groups: a
            14x14 grid decodes to 112 px).
        n_init: channels of the input conv's output.
        n_hid: width of the last group.
        n_blk_per_group: residual blocks per group.
        output_channels: image channels; the output conv has twice as many (mean, log-scale).
        vocab_size: codebook size, the channels of the one-hot input.
    """

    def __init__(
        self,
        group_count: int = 4,
        n_init: int = 128,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        output_channels: int = 3,
        vocab_size: int = 8192,
    ) -> None:
        super().__init__()
        values = (group_count, n_init, n_hid, n_blk_per_group, output_channels, vocab_size)
        self.hparams = dict(zip(DECODER_HPARAMS, values))
        _check_sizes("DallEDecoder", self.hparams, n_hid, vocab_size)
        self.upsample = 2 ** (group_count - 1)
        self.output_channels = output_channels
        self.vocab_size = vocab_size
        self.blocks = _stack(
            _conv(vocab_size, n_init, 1),
            [n_hid * 2 ** (group_count - 1 - g) for g in range(group_count)],
            n_blk_per_group,
            DallEDecoderBlock,
            ("upsample", lambda: nn.Upsample(scale_factor=2, mode="nearest")),
            2 * output_channels,
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logit-Laplace statistics ``[B, 2*C, h*u, w*u]`` of codes ``[B, vocab_size, h, w]``.

        ``z`` is a one-hot (or relaxed) code map, as ``dall_e.decoder.Decoder`` takes it;
        ``u = 2**(group_count-1)``. Channels ``[:C]`` are the means (logits of the mapped pixels),
        ``[C:]`` the log-scales. The input and output convs run in float32 (DALL-E keeps them out
        of fp16).
        """
        if z.ndim != 4 or z.shape[1] != self.vocab_size:
            raise ValueError(
                f"DallEDecoder expects one-hot codes [B, {self.vocab_size}, h, w], got "
                f"{list(z.shape)}; use forward_ids for token ids [B, h, w]"
            )
        with torch.autocast(device_type=z.device.type, enabled=False):
            h = self.blocks.input(z.float())
        return self._trunk(h)

    def forward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` of the one-hot codes of ``ids`` ``[B, h, w]`` (int64 in [0, vocab)).

        The 1x1 input conv of a one-hot map is a lookup of its weight columns, done as such.
        """
        conv = self.blocks.input
        with torch.autocast(device_type=ids.device.type, enabled=False):
            table = conv.weight.float().flatten(1).t()  # [vocab_size, n_init]
            h = F.embedding(ids, table) + conv.bias.float()  # [B, h, w, n_init]
        return self._trunk(h.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))

    def _trunk(self, h: torch.Tensor) -> torch.Tensor:
        return _run(self.blocks, h, skip="input")

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] ``[B, C, h*u, w*u]`` (float32) of token ids ``[B, h, w]``.

        DALL-E's reading of the logit-Laplace mean: ``unmap_pixels(sigmoid(stats[:, :C]))``.
        """
        stats = self.forward_ids(ids)
        return unmap_pixels(torch.sigmoid(stats[:, : self.output_channels].float()))


def _check_upsampling(root: PickledModule, path: Path) -> None:
    """Every ``nn.Upsample`` of the pickle must be DALL-E's: nearest, scale factor 2.

    Our module hard-codes that; a file that says otherwise is not the architecture we build.
    """
    stack = [root]
    while stack:
        node = stack.pop()
        if node.class_path == "torch.nn.modules.upsampling.Upsample":
            scale, mode = node.state.get("scale_factor"), node.state.get("mode")
            if scale not in (2, 2.0, (2.0, 2.0), (2, 2)) or mode != "nearest":
                raise CheckpointError(
                    f"'{path}' upsamples with scale_factor={scale!r}, mode={mode!r}; DALL-E's "
                    "decoder (and bitrain's) uses scale_factor=2, mode='nearest'"
                )
        children = node.state.get("_modules") or {}
        if isinstance(children, Mapping):
            stack.extend(c for c in children.values() if isinstance(c, PickledModule))


def _infer_hparams(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, int]:
    """Architecture from tensor names and shapes (a state dict records nothing else)."""
    first, last, group_count, n_blk_per_group = conv_layout(state, path, _FILE.what)
    if tuple(first.shape[2:]) != (1, 1):
        raise CheckpointError(
            f"'{path}' is not a DALL-E decoder: its input conv is "
            f"{first.shape[2]}x{first.shape[3]}, not 1x1 (is it the encoder? decoder_path "
            "wants decoder.pkl)"
        )
    if last.shape[0] % 2:
        raise CheckpointError(
            f"'{path}' is not a DALL-E decoder: its output conv has {last.shape[0]} channels, "
            "expected an even number (mean and log-scale per image channel)"
        )
    return {
        "group_count": group_count,
        "n_init": int(first.shape[0]),
        "n_hid": int(last.shape[1]),
        "n_blk_per_group": n_blk_per_group,
        "output_channels": int(last.shape[0]) // 2,
        "vocab_size": int(first.shape[1]),
    }


def load_dall_e_decoder(path: str | os.PathLike, **expected: int) -> DallEDecoder:
    """Build a :class:`DallEDecoder` from ``decoder.pkl``, ``.safetensors`` or ``.pt``/``.pth``.

    Read as :func:`~bitrain.tokenizers.dall_e_encoder.load_dall_e_encoder` reads the encoder
    (format sniffed, our names or DALL-E's); a pickle must also upsample as DALL-E's does.

    Args:
        path: the decoder file (``tokenizer.decoder_path``).
        **expected: the tokenizer's hyper-parameters (``vocab_size`` ...), each equal to the file's.

    Raises:
        FileNotFoundError: nothing at ``path`` (the message says where to get the file).
        ValueError: the file's architecture differs from ``expected``.
        CheckpointError: an unsafe, corrupt or encoder file, or tensors that do not fit.
    """
    return load_module(
        path,
        _FILE,
        expected,
        infer=_infer_hparams,
        build=_build,
        check_pickle=_check_upsampling,
    )


def _build(hparams: dict[str, int], path: Path) -> DallEDecoder:
    """The decoder of a file's architecture; one it cannot build is not a usable file."""
    try:
        return DallEDecoder(**hparams)
    except ValueError as err:
        raise CheckpointError(f"'{path}' is not a usable DALL-E decoder: {err}") from err


def save_decoder(decoder: DallEDecoder, path: str | os.PathLike) -> Path:
    """Write ``decoder``'s weights (our names) atomically.

    A ``*.safetensors`` path gets safetensors (with the architecture as metadata), anything else a
    ``torch.save`` of the state dict; both load back without unpickling any code.
    """
    return save_module(decoder, path, _FILE.noun)
