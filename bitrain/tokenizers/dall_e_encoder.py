"""DALL-E's dVAE encoder as a native module, and reading/writing its weights without pickles.

The architecture follows ``dall_e/encoder.py`` and ``dall_e/utils.py`` of openai/DALL-E (PyPI
``dall-e==0.1``): a 7x7 input conv, ``group_count`` groups of residual blocks whose width doubles
per group, a 2x max-pool after every group but the last, and a ReLU + 1x1 conv to the vocabulary.
Each block adds ``post_gain * res_path(x)`` to ``id_path(x)`` with ``post_gain = 1/n_layers**2``.

OpenAI's ``encoder.pkl`` is a pickled ``dall_e.encoder.Encoder`` object, not a state dict. It is
read through :func:`bitrain.io.load_pickled_module`, which maps exactly the classes such a file
needs to inert records, so no code from the file or from the ``dall_e`` package runs; the tensors
are then copied into :class:`DallEEncoder`, whose parameters are plain ``nn.Conv2d`` ones named
``weight``/``bias`` instead of DALL-E's ``w``/``b``. The tokenizer built on it is
:class:`bitrain.tokenizers.dall_e.DallETokenizer`.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from bitrain.tokenizers._dall_e_io import (
    DallEFile,
    conv_layout,
    dall_e_key_to_native,
    load_module,
    native_key_to_dall_e,
    save_module,
)

__all__ = [
    "DALL_E_PICKLE_CLASSES",
    "DallEEncoder",
    "DallEEncoderBlock",
    "convert",
    "dall_e_key_to_native",
    "load_dall_e_encoder",
    "native_key_to_dall_e",
    "save_encoder",
]

log = logging.getLogger(__name__)

# The classes a pickled ``dall_e.encoder.Encoder`` names; any other global in the file is refused.
DALL_E_PICKLE_CLASSES: tuple[str, ...] = (
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.linear.Identity",
)
HPARAMS = ("group_count", "n_hid", "n_blk_per_group", "input_channels", "vocab_size")
WEIGHTS_HINT = (
    "Download OpenAI's DALL-E encoder yourself (https://cdn.openai.com/dall-e/encoder.pkl, or the "
    "copy linked from BEiT's README) and put it at that path, or set tokenizer.weights_path; "
    "bitrain never downloads. See docs/tokenizers.md"
)
_FILE = DallEFile(
    noun="encoder",
    pickle_classes=DALL_E_PICKLE_CLASSES,
    hparams=HPARAMS,
    config_key="tokenizer.weights_path",
    missing_hint=WEIGHTS_HINT,
    mismatch_advice=(
        "Set the tokenizer's keys to the file's values (the model's vocab_size follows "
        "${tokenizer.vocab_size}) or point weights_path at the matching file"
    ),
)


def _conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    """A 'same'-padded conv initialised as DALL-E's: N(0, 1/(n_in k^2)) weights, zero bias."""
    conv = nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)
    nn.init.normal_(conv.weight, std=1 / math.sqrt(n_in * kernel**2))
    nn.init.zeros_(conv.bias)
    return conv


class _ResidualBlock(nn.Module):
    """DALL-E's residual block ``id_path(x) + post_gain * res_path(x)`` (encoder and decoder).

    ``res_path`` is four ReLU + conv pairs ``n_in -> n_out/4 -> n_out/4 -> n_out/4 -> n_out``
    with the given kernel sizes; ``id_path`` a 1x1 conv, or the identity when ``n_in == n_out``.
    """

    def __init__(
        self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]
    ) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        k1, k2, k3, k4 = kernels
        self.res_path = nn.Sequential(
            OrderedDict(
                relu_1=nn.ReLU(),  # not in place: x also feeds id_path
                conv_1=_conv(n_in, n_hid, k1),
                relu_2=nn.ReLU(inplace=True),
                conv_2=_conv(n_hid, n_hid, k2),
                relu_3=nn.ReLU(inplace=True),
                conv_3=_conv(n_hid, n_hid, k3),
                relu_4=nn.ReLU(inplace=True),
                conv_4=_conv(n_hid, n_out, k4),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n_in, H, W] -> [B, n_out, H, W]``.

        The residual is scaled and summed in place in the residual path's fresh output (its last
        layer is a conv, which keeps nothing for backward): the same float operations as
        ``id_path(x) + post_gain * res_path(x)`` (addition commutes exactly), without two
        temporaries the size of the feature map.
        """
        res = self.res_path(x)
        ident = self.id_path(x)
        if res.dtype != ident.dtype or res.shape != ident.shape:
            return ident + self.post_gain * res  # type promotion / broadcasting: out of place
        return res.mul_(self.post_gain).add_(ident)


def _check_sizes(owner: str, sizes: Mapping[str, object], n_hid: int, vocab_size: int) -> None:
    """Each of ``sizes`` a positive int, ``vocab_size >= 2`` and ``n_hid`` divisible by 4."""
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    if vocab_size < 2 or n_hid % 4:
        raise ValueError(
            f"{owner}: need vocab_size >= 2 and n_hid divisible by 4, got "
            f"vocab_size={vocab_size}, n_hid={n_hid}"
        )


def _stack(
    first: nn.Conv2d,
    widths: list[int],
    n_blk_per_group: int,
    block: Callable[[int, int, int], nn.Module],
    resample: tuple[str, Callable[[], nn.Module]],
    n_out: int,
) -> nn.Sequential:
    """DALL-E's ``blocks``: ``input``, ``group_g`` of ``block_i`` (+ resampling), ``output``.

    Args:
        first: the input conv.
        widths: the width of each group.
        n_blk_per_group: residual blocks per group.
        block: ``block(n_in, n_out, n_layers)``, a residual block.
        resample: ``(name, factory)`` of the layer after every group but the last.
        n_out: channels of the output (ReLU + 1x1 conv).
    """
    n_layers = len(widths) * n_blk_per_group
    layers: OrderedDict[str, nn.Module] = OrderedDict(input=first)
    n_in = first.out_channels
    for g, width in enumerate(widths):
        group: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(n_blk_per_group):
            group[f"block_{i + 1}"] = block(n_in, width, n_layers)
            n_in = width
        if g < len(widths) - 1:
            group[resample[0]] = resample[1]()
        layers[f"group_{g + 1}"] = nn.Sequential(group)
    layers["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=_conv(n_in, n_out, 1)))
    return nn.Sequential(layers)


def _run(blocks: nn.Sequential, x: torch.Tensor, skip: str | None = None) -> torch.Tensor:
    """``blocks`` in order (but ``skip``), the ``output`` one in float32 outside autocast."""
    for name, layer in blocks.named_children():
        if name == skip:
            continue
        if name == "output":
            with torch.autocast(device_type=x.device.type, enabled=False):
                x = layer(x.float())
        else:
            x = layer(x)
    return x


class DallEEncoderBlock(_ResidualBlock):
    """Residual block ``id_path(x) + post_gain * res_path(x)`` (``dall_e.encoder.EncoderBlock``).

    Its residual path's kernels are 3, 3, 3, 1.

    Args:
        n_in: input channels.
        n_out: output channels (multiple of 4); the bottleneck has ``n_out // 4``.
        n_layers: blocks in the whole encoder; ``post_gain = 1 / n_layers**2`` keeps the residual
            stream's scale near the identity at initialisation.
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__(n_in, n_out, n_layers, (3, 3, 3, 1))


class DallEEncoder(nn.Module):
    """DALL-E's dVAE encoder (``dall_e.encoder.Encoder``) with standard parameter names.

    Module names mirror DALL-E's (``blocks.group_1.block_1.res_path.conv_1``) so that
    :func:`dall_e_key_to_native` is a rename of ``w``/``b`` to ``weight``/``bias`` only.

    Args:
        group_count: groups of blocks; width ``n_hid * 2**g`` in group ``g``, and a 2x max-pool
            after each group but the last (4 groups: 112 px in, 14x14 logits out).
        n_hid: width of the first group.
        n_blk_per_group: residual blocks per group.
        input_channels: image channels.
        vocab_size: codebook size, the channels of the output logits.
    """

    def __init__(
        self,
        group_count: int = 4,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        input_channels: int = 3,
        vocab_size: int = 8192,
    ) -> None:
        super().__init__()
        sizes = dict(zip(HPARAMS, (group_count, n_hid, n_blk_per_group, input_channels)))
        _check_sizes("DallEEncoder", sizes, n_hid, vocab_size)
        self.hparams = {**sizes, "vocab_size": vocab_size}
        self.downsample = 2 ** (group_count - 1)
        self.blocks = _stack(
            _conv(input_channels, n_hid, 7),
            [n_hid * 2**g for g in range(group_count)],
            n_blk_per_group,
            DallEEncoderBlock,
            ("pool", lambda: nn.MaxPool2d(kernel_size=2)),
            vocab_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, vocab_size, H/d, W/d]`` (``d = 2**(group_count-1)``) of ``[B, C, H, W]``.

        The output conv always runs in float32 (DALL-E keeps it out of fp16), so an autocast
        around the trunk changes the argmax as little as possible.
        """
        return _run(self.blocks, x)


def _infer_hparams(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, int]:
    """Architecture from tensor names and shapes (a state dict records nothing else)."""
    first, last, group_count, n_blk_per_group = conv_layout(state, path, _FILE.what)
    n_hid, input_channels = first.shape[:2]
    return {
        "group_count": group_count,
        "n_hid": int(n_hid),
        "n_blk_per_group": n_blk_per_group,
        "input_channels": int(input_channels),
        "vocab_size": int(last.shape[0]),
    }


def load_dall_e_encoder(path: str | os.PathLike, **expected: int) -> DallEEncoder:
    """Build a :class:`DallEEncoder` from ``encoder.pkl``, ``.safetensors`` or ``.pt``/``.pth``.

    The format is detected from the file's content. State dicts may use our names or DALL-E's.

    Args:
        path: the weights file.
        **expected: hyper-parameters the caller was configured with (``vocab_size=8192`` ...);
            each must equal what the file holds.

    Raises:
        FileNotFoundError: no file at ``path`` (the message says where to get it).
        ValueError: the file's architecture differs from ``expected``.
        CheckpointError: the file is unsafe, corrupt, or its tensors do not fit the architecture.
    """
    return load_module(
        path,
        _FILE,
        expected,
        infer=_infer_hparams,
        build=lambda hparams, _: DallEEncoder(**{k: hparams[k] for k in HPARAMS}),
    )


def save_encoder(encoder: DallEEncoder, path: str | os.PathLike) -> Path:
    """Write ``encoder``'s weights (our names) atomically.

    A ``*.safetensors`` path gets safetensors (with the architecture as metadata), anything else a
    ``torch.save`` of the state dict; both load back without unpickling any code.
    """
    return save_module(encoder, path, _FILE.noun)


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert a DALL-E encoder file (``encoder.pkl`` or a state dict) to ``dst``.

    The architecture is read from ``src``; ``dst`` is written by :func:`save_encoder`.
    """
    encoder = load_dall_e_encoder(src)
    out = save_encoder(encoder, dst)
    log.info("wrote %s (%s) from %s", out, encoder.hparams, src)
    return out
