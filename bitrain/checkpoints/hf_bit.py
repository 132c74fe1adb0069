"""Hugging Face BiT (``BitForImageClassification`` / ``BitModel``) <-> timm ``ResNetV2``.

timm's ``resnetv2_{50x1,101x1,152x2}_bit`` (weight standardised convs with eps 1e-8, group norm,
pre-activation bottlenecks, the "fixed" stem of conv, zero pad 1, max pool 3/2) fix the depths
(:data:`TIMM_BIT`); the widths travel as ``channels`` / ``stem_chs`` and HF's ``num_groups`` (timm
builds 32) as ``create_classifier``'s ``group_norm_groups``. Any other network is a
:class:`CheckpointError`. Key map (HF = timm): ``bit.embedder.convolution`` = ``stem.conv``;
``bit.encoder.stages.s.layers.j.X`` = ``stages.s.blocks.j.X``; ``bit.norm`` = ``norm``;
``classifier.1`` (a Linear ``[C, F]``) = ``head.fc`` (a 1x1 conv ``[C, F, 1, 1]``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from timm.layers import StdConv2d
from timm.models.resnetv2 import PreActBottleneck
from torch import nn

from bitrain.checkpoints.hf import config_square, one_value, weight_bias
from bitrain.io import CheckpointError

__all__ = ["TIMM_BIT", "TIMM_GROUPS", "bit_from_hf", "bit_to_hf"]

# BiT depths -> (timm name, its fixed width factor).
TIMM_BIT: dict[tuple[int, ...], tuple[str, int]] = {
    (3, 4, 6, 3): ("resnetv2_50x1_bit", 1),
    (3, 4, 23, 3): ("resnetv2_101x1_bit", 1),
    (3, 8, 36, 3): ("resnetv2_152x2_bit", 2),
}
TIMM_GROUPS = 32  # partial(GroupNormAct, num_groups=32) in timm's ResNetV2
BIT_CONV_EPS = 1e-8  # HF's BiT weight standardisation eps (hard-coded), timm's *_bit models too
BIT_GROUP_NORM_EPS = 1e-5  # HF's BitGroupNormActivation (hard-coded), timm's GroupNormAct too
# The BitConfig values for which HF's BiT is timm's network (pre-activation bottlenecks, symmetric
# padding, a fixed stem, no dilation).
_TIMM_NETWORK = {
    "layer_type": "preactivation",
    "global_padding": None,
    "embedding_dynamic_padding": False,
    "hidden_act": "relu",
    "output_stride": 32,
    "width_factor": 1,
}

_BIT_BLOCK = re.compile(
    r"^bit\.encoder\.stages\.(\d+)\.layers\.(\d+)\."
    r"(conv[123]\.weight|norm[123]\.(?:weight|bias)|downsample\.conv\.weight)$"
)
_BIT_TOP: dict[str, str] = {
    "bit.embedder.convolution.weight": "stem.conv.weight",
    **weight_bias("bit.norm", "norm"),
    **weight_bias("classifier.1", "head.fc"),
}


def _make_div(value: float, divisor: int = 8) -> int:
    """Channel rounding of HF's BiT and timm's ResNetV2 (``make_div`` / ``make_divisible``)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def bit_from_hf(
    sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """HF BiT weights (``bit.`` prefix) -> ``(timm state dict, create_classifier spec)``."""
    spec = _bit_spec(config)  # the config's clear errors before the weights'
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if match := _BIT_BLOCK.match(key):
            out["stages.{}.blocks.{}.{}".format(*match.groups())] = value
        elif key in _BIT_TOP:
            is_fc = key == "classifier.1.weight"
            out[_BIT_TOP[key]] = value.reshape(*value.shape, 1, 1) if is_fc else value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"Hugging Face BiT weights have keys with no timm name: {sorted(unknown)[:6]}"
        )
    return out, spec


def _bit_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """``create_classifier`` kwargs (less ``num_classes``) of a BiT config."""
    for name, wanted in _TIMM_NETWORK.items():
        if config.get(name, wanted) != wanted:
            raise CheckpointError(
                f"Hugging Face BiT config has {name}={config[name]!r}; timm's ResNetV2 BiT models "
                f"are the same network only for {name}={wanted!r}, so it cannot be imported"
            )
    depths = tuple(int(d) for d in config.get("depths", (3, 4, 6, 3)))
    if depths not in TIMM_BIT:
        raise CheckpointError(
            f"Hugging Face BiT config has depths={list(depths)}; timm names BiT models only with "
            f"depths {[list(d) for d in TIMM_BIT]} (resnetv2_50x1_bit, resnetv2_101x1_bit, "
            "resnetv2_152x2_bit), and create_classifier cannot override a timm name's depths"
        )
    name, wf = TIMM_BIT[depths]
    hidden = [int(h) for h in config.get("hidden_sizes", (256, 512, 1024, 2048))]
    stem = int(config.get("embedding_size", 64))
    for what, chs in (("hidden_sizes", hidden), ("embedding_size", [stem])):
        if any(_make_div(c) != c or c % wf for c in chs):
            raise CheckpointError(
                f"Hugging Face BiT config has {what}={chs if len(chs) > 1 else chs[0]}: timm "
                f"rounds widths to multiples of 8 (and {name} multiplies them by {wf}), so these "
                "cannot be built exactly"
            )
    groups = int(config.get("num_groups", TIMM_GROUPS))
    normed = sorted({stem, *hidden, *(_make_div(h * 0.25) for h in hidden)})
    bad = [c for c in normed if c % TIMM_GROUPS or c % groups]
    if bad:
        raise CheckpointError(
            f"Hugging Face BiT config has group-normed widths {bad} not divisible by "
            f"{TIMM_GROUPS} (timm builds every BiT group norm with 32 groups before bitrain sets "
            f"num_groups={groups}) or by num_groups; such a model cannot be rebuilt by "
            "create_classifier"
        )
    return {
        "model_name": name,
        "img_size": config_square(config, "image_size", 224),
        "in_chans": int(config.get("num_channels", 3)),
        "channels": [c // wf for c in hidden],
        "stem_chs": stem // wf,
        "group_norm_groups": groups,
    }


def bit_to_hf(model: nn.Module) -> tuple[dict, dict[str, Any]]:
    """A timm BiT ``ResNetV2`` as HF weights and config (labels are the caller's).

    Raises:
        CheckpointError: a ResNetV2 that is not HF's BiT network (stem, convs, blocks, norms).
    """
    stem = model.stem
    problems = []
    if not isinstance(getattr(stem, "conv", None), StdConv2d):
        problems.append("the stem conv is not a weight-standardised StdConv2d")
    if not isinstance(getattr(stem, "pad", None), nn.ConstantPad2d) or not isinstance(
        getattr(stem, "pool", None), nn.MaxPool2d
    ):
        problems.append("the stem is not BiT's 'fixed' stem (conv, zero pad 1, max pool 3/2)")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m is not model.head.fc]
    if any(not isinstance(m, StdConv2d) or m.eps != BIT_CONV_EPS for m in convs):
        problems.append(f"not every conv is a StdConv2d with eps={BIT_CONV_EPS}")
    blocks = [b for stage in model.stages for b in stage.blocks]
    if any(not isinstance(b, PreActBottleneck) for b in blocks):
        problems.append("the blocks are not pre-activation bottlenecks")
    if any(m.dilation != (1, 1) for m in convs):
        problems.append("it uses dilation (output_stride < 32)")
    if not isinstance(model.norm, nn.GroupNorm):
        problems.append("it has no final group norm (not pre-activation)")
    if one_value(model, nn.GroupNorm, "eps") != BIT_GROUP_NORM_EPS:
        problems.append(f"its group norms do not use eps={BIT_GROUP_NORM_EPS}")
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    if any(not isinstance(getattr(m, "act", None), nn.ReLU) for m in norms):
        problems.append("its activation is not ReLU")
    if problems:
        raise CheckpointError(
            "this ResNetV2 is not a Hugging Face BiT network: " + "; ".join(problems)
        )
    back = {v: k for k, v in _BIT_TOP.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach()
        if match := re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$", key):
            out["bit.encoder.stages.{}.layers.{}.{}".format(*match.groups())] = value
        elif key in back:
            out[back[key]] = value.flatten(1) if key == "head.fc.weight" else value
        else:
            raise CheckpointError(f"to Hugging Face: no name for timm key {key!r}")
    spec = getattr(model, "bitrain_spec", {})
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224))[1]
    config = {
        "architectures": ["BitForImageClassification"],
        "model_type": "bit",
        "num_channels": int(stem.conv.in_channels),
        "embedding_size": int(stem.conv.out_channels),
        "hidden_sizes": [int(stage.blocks[0].conv3.out_channels) for stage in model.stages],
        "depths": [len(stage.blocks) for stage in model.stages],
        **_TIMM_NETWORK,
        "num_groups": int(one_value(model, nn.GroupNorm, "num_groups")),
        "drop_path_rate": 0.0,
        "image_size": int(spec.get("img_size", size)),
    }
    return out, config
