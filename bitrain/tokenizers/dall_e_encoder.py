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
from collections.abc import Mapping
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
