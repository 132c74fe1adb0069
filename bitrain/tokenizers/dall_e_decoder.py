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
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bitrain.io import (
    CheckpointError,
    PickledModule,
    atomic_save,
    atomic_write_bytes,
    flatten_module_state,
    load_pickled_module,
)
from bitrain.tokenizers.dall_e_encoder import (
    _conv,
    _is_safetensors,
    dall_e_key_to_native,
    native_key_to_dall_e,
)

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


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """DALL-E's ``unmap_pixels``: ``x -> clamp((x - eps) / (1 - 2 eps), 0, 1)`` (eps = 0.1)."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


class DallEDecoderBlock(nn.Module):
    """Residual block ``id_path(x) + post_gain * res_path(x)`` (``dall_e.decoder.DecoderBlock``).

    Args:
        n_in: input channels.
        n_out: output channels (multiple of 4); the bottleneck has ``n_out // 4``.
        n_layers: blocks in the whole decoder; ``post_gain = 1 / n_layers**2``.
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                relu_1=nn.ReLU(),  # not in place: x also feeds id_path
                conv_1=_conv(n_in, n_hid, 1),
                relu_2=nn.ReLU(inplace=True),
                conv_2=_conv(n_hid, n_hid, 3),
                relu_3=nn.ReLU(inplace=True),
                conv_3=_conv(n_hid, n_hid, 3),
                relu_4=nn.ReLU(inplace=True),
                conv_4=_conv(n_hid, n_out, 3),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n_in, H, W] -> [B, n_out, H, W]``."""
        return self.id_path(x) + self.post_gain * self.res_path(x)


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
        for name, value in zip(DECODER_HPARAMS, values):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DallEDecoder: {name} must be a positive int, got {value!r}")
        if vocab_size < 2 or n_hid % 4:
            raise ValueError(
                f"DallEDecoder: need vocab_size >= 2 and n_hid divisible by 4, got "
                f"vocab_size={vocab_size}, n_hid={n_hid}"
            )
        self.hparams = dict(zip(DECODER_HPARAMS, values))
        self.upsample = 2 ** (group_count - 1)
        self.output_channels = output_channels
        self.vocab_size = vocab_size
        n_layers = group_count * n_blk_per_group
        layers: OrderedDict[str, nn.Module] = OrderedDict(input=_conv(vocab_size, n_init, 1))
        n_in = n_init
        for g in range(group_count):
            n_out = n_hid * 2 ** (group_count - 1 - g)
            group: OrderedDict[str, nn.Module] = OrderedDict()
            for i in range(n_blk_per_group):
                group[f"block_{i + 1}"] = DallEDecoderBlock(n_in, n_out, n_layers)
                n_in = n_out
            if g < group_count - 1:
                group["upsample"] = nn.Upsample(scale_factor=2, mode="nearest")
            layers[f"group_{g + 1}"] = nn.Sequential(group)
        layers["output"] = nn.Sequential(
            OrderedDict(relu=nn.ReLU(), conv=_conv(n_in, 2 * output_channels, 1))
        )
        self.blocks = nn.Sequential(layers)

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
        for name, layer in self.blocks.named_children():
            if name == "input":
                continue
            if name == "output":
                with torch.autocast(device_type=h.device.type, enabled=False):
                    h = layer(h.float())
            else:
                h = layer(h)
        return h

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] ``[B, C, h*u, w*u]`` (float32) of token ids ``[B, h, w]``.

        DALL-E's reading of the logit-Laplace mean: ``unmap_pixels(sigmoid(stats[:, :C]))``.
        """
        stats = self.forward_ids(ids)
        return unmap_pixels(torch.sigmoid(stats[:, : self.output_channels].float()))


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Tensors of a decoder file in native naming, and its architecture.

    The architecture comes from tensor names and shapes; ``decoder.pkl`` also records it as
    attributes (``n_init``, ``n_hid`` ...), which must agree with the shapes.
    """
    recorded: dict[str, int] = {}
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: Mapping[str, object] = load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"could not read DALL-E decoder '{path}': {err}") from err
    else:
        try:
            obj = load_pickled_module(
                path, DALL_E_DECODER_PICKLE_CLASSES, what="DALL-E decoder", allow_state_dict=True
            )
        except CheckpointError as err:
            if "dall_e.encoder" in str(err):
                raise CheckpointError(
                    f"{err}. This looks like DALL-E's encoder.pkl: decoder_path wants "
                    "decoder.pkl (https://cdn.openai.com/dall-e/decoder.pkl)"
                ) from err
            raise
        if isinstance(obj, PickledModule):
            if obj.class_path != "dall_e.decoder.Decoder":
                raise CheckpointError(
                    f"'{path}' holds a pickled {obj.class_path}, not a dall_e.decoder.Decoder; "
                    "point tokenizer.decoder_path at DALL-E's decoder.pkl"
                )
            _check_upsampling(obj, path)
            # decoder.pkl records its attrs fields; group_count is a class attribute there.
            recorded = {
                k: obj.state[k]
                for k in DECODER_HPARAMS
                if isinstance(obj.state.get(k), int) and not isinstance(obj.state.get(k), bool)
            }
            raw = flatten_module_state(obj)
        else:
            raw = obj
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"'{path}' is not a DALL-E decoder state dict: entry {key!r} is a "
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
    for key in ("blocks.input.weight", "blocks.output.conv.weight"):
        if key not in state:
            raise CheckpointError(
                f"'{path}' is not a DALL-E decoder: it has no '{key}' (nor its DALL-E name "
                f"'{native_key_to_dall_e(key)}'); found {sorted(state)[:5]}..."
            )
    first, last = state["blocks.input.weight"], state["blocks.output.conv.weight"]
    if first.ndim != 4 or last.ndim != 4:
        raise CheckpointError(f"'{path}' is not a DALL-E decoder: its convolutions are not 4-D")
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
    groups = {k.split(".")[1] for k in state if k.startswith("blocks.group_")}
    blocks = {k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")}
    return {
        "group_count": len(groups),
        "n_init": int(first.shape[0]),
        "n_hid": int(last.shape[1]),
        "n_blk_per_group": len(blocks),
        "output_channels": int(last.shape[0]) // 2,
        "vocab_size": int(first.shape[1]),
    }


def load_dall_e_decoder(path: str | os.PathLike, **expected: int) -> DallEDecoder:
    """Build a :class:`DallEDecoder` from ``decoder.pkl``, ``.safetensors`` or ``.pt``/``.pth``.

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
            f"DALL-E decoder weights not found: expected a file at '{path}'. {DECODER_HINT}"
        )
    state, hparams = _read_state(path)
    wrong = {k: (v, hparams[k]) for k, v in expected.items() if k in hparams and hparams[k] != v}
    if wrong:
        listed = ", ".join(
            f"{k}={want} in the config but {got} in the file" for k, (want, got) in wrong.items()
        )
        raise ValueError(
            f"DALL-E decoder '{path}' does not match the tokenizer config: {listed}. The "
            "decoder must decode the encoder's ids to the token view's size: point "
            "tokenizer.decoder_path at the decoder released with the encoder"
        )
    try:
        decoder = DallEDecoder(**hparams)
    except ValueError as err:
        raise CheckpointError(f"'{path}' is not a usable DALL-E decoder: {err}") from err
    _copy_strict(decoder, state, path)
    return decoder


def _copy_strict(decoder: DallEDecoder, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Copy every tensor into ``decoder``, or fail listing what is missing, extra or misshapen."""
    own = decoder.state_dict()
    problems = [f"missing '{k}'" for k in own if k not in state]
    problems += [f"unexpected '{k}'" for k in state if k not in own]
    problems += [
        f"'{k}' is {tuple(state[k].shape)} in the file but {tuple(v.shape)} in the decoder"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (
            f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        )
        raise CheckpointError(f"DALL-E decoder '{path}' does not fit {decoder.hparams}: {shown}")
    decoder.load_state_dict({k: v.float() for k, v in state.items()})


def save_decoder(decoder: DallEDecoder, path: str | os.PathLike) -> Path:
    """Write ``decoder``'s weights (our names) atomically.

    A ``*.safetensors`` path gets safetensors (with the architecture as metadata), anything else a
    ``torch.save`` of the state dict; both load back without unpickling any code.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        meta = {
            "format": "bitrain.dall_e_decoder",
            **{k: str(v) for k, v in decoder.hparams.items()},
        }
        return atomic_write_bytes(path, save(state, metadata=meta))
    return atomic_save(state, path)
