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
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from bitrain.io import (
    CheckpointError,
    PickledModule,
    atomic_save,
    atomic_write_bytes,
    flatten_module_state,
    load_pickled_module,
)
from bitrain.tokenizers.base import Tokenizer

__all__ = [
    "DALL_E_PICKLE_CLASSES",
    "DallEEncoder",
    "DallEEncoderBlock",
    "DallETokenizer",
    "convert",
    "dall_e_key_to_native",
    "load_dall_e_encoder",
    "map_pixels",
    "native_key_to_dall_e",
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
LOGIT_LAPLACE_EPS = 0.1  # dall_e/utils.py: pixels live in [eps, 1 - eps] for the logit-Laplace loss
WEIGHTS_HINT = (
    "Download OpenAI's DALL-E encoder yourself (https://cdn.openai.com/dall-e/encoder.pkl, or the "
    "copy linked from BEiT's README) and put it at that path, or set tokenizer.weights_path; "
    "bitrain never downloads. See docs/tokenizers.md"
)
_AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """DALL-E's pixel mapping ``x -> (1 - 2 eps) x + eps`` (eps = 0.1), any shape, [0, 1] in."""
    if not x.is_floating_point():
        raise TypeError(
            f"DALL-E pixel mapping expects float pixels in [0, 1], got {x.dtype}; divide uint8 "
            "images by 255 first"
        )
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def _conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    """A 'same'-padded conv initialised as DALL-E's: N(0, 1/(n_in k^2)) weights, zero bias."""
    conv = nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)
    nn.init.normal_(conv.weight, std=1 / math.sqrt(n_in * kernel**2))
    nn.init.zeros_(conv.bias)
    return conv


class DallEEncoderBlock(nn.Module):
    """Residual block ``id_path(x) + post_gain * res_path(x)`` (``dall_e.encoder.EncoderBlock``).

    Args:
        n_in: input channels.
        n_out: output channels (multiple of 4); the bottleneck has ``n_out // 4``.
        n_layers: blocks in the whole encoder; ``post_gain = 1 / n_layers**2`` keeps the residual
            stream's scale near the identity at initialisation.
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                relu_1=nn.ReLU(),  # not in place: x also feeds id_path
                conv_1=_conv(n_in, n_hid, 3),
                relu_2=nn.ReLU(inplace=True),
                conv_2=_conv(n_hid, n_hid, 3),
                relu_3=nn.ReLU(inplace=True),
                conv_3=_conv(n_hid, n_hid, 3),
                relu_4=nn.ReLU(inplace=True),
                conv_4=_conv(n_hid, n_out, 1),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n_in, H, W] -> [B, n_out, H, W]``."""
        return self.id_path(x) + self.post_gain * self.res_path(x)


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
        for name, value in zip(HPARAMS, (group_count, n_hid, n_blk_per_group, input_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DallEEncoder: {name} must be a positive int, got {value!r}")
        if vocab_size < 2 or n_hid % 4:
            raise ValueError(
                f"DallEEncoder: need vocab_size >= 2 and n_hid divisible by 4, got "
                f"vocab_size={vocab_size}, n_hid={n_hid}"
            )
        self.hparams = dict(zip(HPARAMS, (group_count, n_hid, n_blk_per_group, input_channels)))
        self.hparams["vocab_size"] = vocab_size
        self.downsample = 2 ** (group_count - 1)
        n_layers = group_count * n_blk_per_group
        layers: OrderedDict[str, nn.Module] = OrderedDict(input=_conv(input_channels, n_hid, 7))
        n_in = n_hid
        for g in range(group_count):
            n_out = n_hid * 2**g
            group: OrderedDict[str, nn.Module] = OrderedDict()
            for i in range(n_blk_per_group):
                group[f"block_{i + 1}"] = DallEEncoderBlock(n_in, n_out, n_layers)
                n_in = n_out
            if g < group_count - 1:
                group["pool"] = nn.MaxPool2d(kernel_size=2)
            layers[f"group_{g + 1}"] = nn.Sequential(group)
        layers["output"] = nn.Sequential(
            OrderedDict(relu=nn.ReLU(), conv=_conv(n_in, vocab_size, 1))
        )
        self.blocks = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, vocab_size, H/d, W/d]`` (``d = 2**(group_count-1)``) of ``[B, C, H, W]``.

        The output conv always runs in float32 (DALL-E keeps it out of fp16), so an autocast
        around the trunk changes the argmax as little as possible.
        """
        for name, layer in self.blocks.named_children():
            if name == "output":
                with torch.autocast(device_type=x.device.type, enabled=False):
                    x = layer(x.float())
            else:
                x = layer(x)
        return x


def dall_e_key_to_native(key: str) -> str:
    """``blocks.input.w`` -> ``blocks.input.weight`` (and ``.b`` -> ``.bias``); others unchanged."""
    if key.endswith(".w"):
        return key[:-2] + ".weight"
    if key.endswith(".b"):
        return key[:-2] + ".bias"
    return key


def native_key_to_dall_e(key: str) -> str:
    """Inverse of :func:`dall_e_key_to_native`."""
    if key.endswith(".weight"):
        return key[: -len(".weight")] + ".w"
    if key.endswith(".bias"):
        return key[: -len(".bias")] + ".b"
    return key


def _is_safetensors(path: Path) -> bool:
    """Content sniff: 8-byte little-endian header length, then a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 2 <= n <= path.stat().st_size - 8


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Tensors of an encoder file in native naming, and its architecture.

    The architecture comes from tensor names and shapes; ``encoder.pkl`` also records it as
    attributes (``n_hid``, ``vocab_size`` ...), which must agree with the shapes.
    """
    recorded: dict[str, int] = {}
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: Mapping[str, object] = load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"could not read DALL-E encoder '{path}': {err}") from err
    else:
        obj = load_pickled_module(
            path, DALL_E_PICKLE_CLASSES, what="DALL-E encoder", allow_state_dict=True
        )
        if isinstance(obj, PickledModule):
            if obj.class_path != "dall_e.encoder.Encoder":
                raise CheckpointError(
                    f"'{path}' holds a pickled {obj.class_path}, not a dall_e.encoder.Encoder; "
                    "point tokenizer.weights_path at DALL-E's encoder.pkl"
                )
            # encoder.pkl records its attrs fields; group_count is a class attribute there.
            recorded = {k: obj.state[k] for k in HPARAMS if isinstance(obj.state.get(k), int)}
            raw = flatten_module_state(obj)
        else:
            raw = obj
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"'{path}' is not a DALL-E encoder state dict: entry {key!r} is a "
                f"{type(value).__name__}, expected a tensor under a string key"
            )
        native = dall_e_key_to_native(key)
        if native in state:
            raise CheckpointError(f"'{path}' holds '{native}' twice (in both namings)")
        state[native] = value
    inferred = _infer_hparams(state, path)
    odd = {k: (v, inferred[k]) for k, v in recorded.items() if v != inferred[k]}
    if odd:  # build from the tensors, never from attributes alone (a crafted n_hid=10**9)
        raise CheckpointError(
            f"'{path}' is inconsistent: its attributes and tensor shapes disagree on "
            + ", ".join(f"{k} ({a} vs {b})" for k, (a, b) in odd.items())
        )
    return state, inferred


def _infer_hparams(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, int]:
    """Architecture from tensor names and shapes (a state dict records nothing else)."""
    for key in ("blocks.input.weight", "blocks.output.conv.weight"):
        if key not in state:
            raise CheckpointError(
                f"'{path}' is not a DALL-E encoder: it has no '{key}' (nor its DALL-E name "
                f"'{native_key_to_dall_e(key)}'); found {sorted(state)[:5]}..."
            )
    if state["blocks.input.weight"].ndim != 4 or state["blocks.output.conv.weight"].ndim != 4:
        raise CheckpointError(f"'{path}' is not a DALL-E encoder: its convolutions are not 4-D")
    groups = {k.split(".")[1] for k in state if k.startswith("blocks.group_")}
    blocks = {k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")}
    n_hid, input_channels = state["blocks.input.weight"].shape[:2]
    return {
        "group_count": len(groups),
        "n_hid": int(n_hid),
        "n_blk_per_group": len(blocks),
        "input_channels": int(input_channels),
        "vocab_size": int(state["blocks.output.conv.weight"].shape[0]),
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
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"DALL-E encoder weights not found: expected a file at '{path}'. {WEIGHTS_HINT}"
        )
    state, hparams = _read_state(path)
    wrong = {k: (v, hparams[k]) for k, v in expected.items() if k in hparams and hparams[k] != v}
    if wrong:
        listed = ", ".join(
            f"{k}={want} in the config but {got} in the file" for k, (want, got) in wrong.items()
        )
        raise ValueError(
            f"DALL-E encoder '{path}' does not match the tokenizer config: {listed}. Set the "
            "tokenizer's keys to the file's values (the model's vocab_size follows "
            "${tokenizer.vocab_size}) or point weights_path at the matching file"
        )
    encoder = DallEEncoder(**{k: hparams[k] for k in HPARAMS})
    _copy_strict(encoder, state, path)
    return encoder


def _copy_strict(encoder: DallEEncoder, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Copy every tensor into ``encoder``, or fail listing what is missing, extra or misshapen."""
    own = encoder.state_dict()
    problems = [f"missing '{k}'" for k in own if k not in state]
    problems += [f"unexpected '{k}'" for k in state if k not in own]
    problems += [
        f"'{k}' is {tuple(state[k].shape)} in the file but {tuple(v.shape)} in the encoder"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (
            f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        )
        raise CheckpointError(f"DALL-E encoder '{path}' does not fit {encoder.hparams}: {shown}")
    encoder.load_state_dict({k: v.float() for k, v in state.items()})


def save_encoder(encoder: DallEEncoder, path: str | os.PathLike) -> Path:
    """Write ``encoder``'s weights (our names) atomically.

    A ``*.safetensors`` path gets safetensors (with the architecture as metadata), anything else a
    ``torch.save`` of the state dict; both load back without unpickling any code.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        meta = {
            "format": "bitrain.dall_e_encoder",
            **{k: str(v) for k, v in encoder.hparams.items()},
        }
        return atomic_write_bytes(path, save(state, metadata=meta))
    return atomic_save(state, path)


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert a DALL-E encoder file (``encoder.pkl`` or a state dict) to ``dst``.

    The architecture is read from ``src``; ``dst`` is written by :func:`save_encoder`.
    """
    encoder = load_dall_e_encoder(src)
    out = save_encoder(encoder, dst)
    log.info("wrote %s (%s) from %s", out, encoder.hparams, src)
    return out


class DallETokenizer(Tokenizer):
    """BEiT's visual tokenizer: argmax of DALL-E's encoder logits, frozen.

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
            trunk (the output conv stays float32), for speed on GPUs.
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
        self.freeze()
        log.info("DALL-E tokenizer from %s: %s", weights_path, self.encoder.hparams)

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
