"""Optimizer and lr schedule, as in the official BEiT code (``optim_factory.py``, ``utils.py``).

* Parameter groups: no weight decay on 1-D tensors (norms, biases, layer-scale gammas), on
  ``*.bias`` and on a list of names, as ``get_parameter_groups`` (``beit/optim_factory.py``) does.
  The official list is the model's ``no_weight_decay()`` = ``{pos_embed, cls_token}``
  (``modeling_pretrain.py`` / ``modeling_finetune.py``): the mask token and the relative position
  bias tables **are** decayed, in pretraining and fine-tuning (``run_class_finetuning.py`` adds the
  tables only with ``--disable_weight_decay_on_rel_pos_bias``). The BEiT configs give that list as
  ``optim.no_weight_decay``; without it the model's own ``no_weight_decay()`` is used (timm's
  ``Beit`` also lists the tables, a difference from the official runs).
* Optional layer-wise lr decay (BEiT fine-tuning): group ``i`` of ``L + 2`` gets
  ``layer_decay ** (L + 1 - i)``, embeddings are layer 0 and the head layer ``L + 1``, with the
  official layer ids for a ViT / BEiT and the groups of a timm model's ``group_matcher()`` for any
  other model (:func:`layer_ids`). The scale is folded into each group's initial lr, so a plain
  ``LambdaLR`` applies it for real (timm's ``lr_scale`` key is ignored by torch schedulers).
* Schedule: linear warmup then cosine from the peak lr to ``min_lr``, evaluated **per step**
  (``cosine_scheduler`` in the official ``utils.py`` builds the same curve per iteration); or
  ``schedule="step"``: warmup, then the lr times ``decay_rate`` after each of ``milestones``
  (fractions of the run; BiT-HyperRule: x0.1 at 30%, 60% and 90%), step for step as
  big_transfer's ``bit_hyperrule.get_lr``.
* Optimizers: AdamW (BEiT) or SGD with momentum (BiT, ViT fine-tuning), ``name="adamw"|"sgd"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from timm.models import group_parameters
from torch import nn

__all__ = [
    "build",
    "cosine_multiplier",
    "layer_id_for",
    "layer_ids",
    "lightning_optimizers",
    "param_groups",
    "step_multiplier",
]


def layer_id_for(name: str, num_layers: int) -> int:
    """The official BEiT layer id of a parameter of a ViT with ``num_layers`` blocks.

    unilm ``beit/optim_factory.py`` ``get_num_layer_for_vit`` (lines 33-44 at commit 2312c6f):
    ``cls_token``, ``mask_token``, ``pos_embed`` and ``patch_embed.*`` are layer 0, ``blocks.i.*``
    is layer ``i + 1``, everything else (the shared ``rel_pos_bias``, ``norm``, ``fc_norm``,
    ``head``, ``lm_head``) layer ``num_layers + 1``.
    """
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


_BLOCK = re.compile(r"blocks\.(\d+)\.")


def _vit_layout(model: nn.Module) -> bool:
    """A ViT / BEiT laid out as the official code names it: ``patch_embed`` and ``blocks``."""
    blocks = getattr(model, "blocks", None)
    return hasattr(model, "patch_embed") and isinstance(blocks, nn.ModuleList | nn.Sequential)


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Every parameter's layer id for layer-wise lr decay, and the top id (the head's).

    * A ViT / BEiT (``patch_embed`` + ``blocks``: timm's ``VisionTransformer``, ``Beit``, ``Eva``,
      :class:`bitrain.models.beit.BeitMIM`): the official ids (:func:`layer_id_for`), top
      ``len(blocks) + 1``. timm's own matchers for these models differ from the official code in
      three names: ``norm`` joins the last block, a shared ``rel_pos_bias`` the embeddings, and
      the MIM model's ``lm_head`` the last block; the official code puts all three with the head.
    * Any other model: the groups of its timm ``group_matcher(coarse=False)``, numbered by timm's
      own ``group_parameters`` as ``timm.optim.param_groups_layer_decay`` numbers them (the stem
      0, then each block in order, the parameters no pattern matches last); top: the largest id.

    Frozen parameters are numbered too, so freezing a part never shifts the others' ids.

    Raises:
        ValueError: the model is neither, or its matcher puts every parameter in one group
            (layer decay would silently change nothing).
    """
    names = [name for name, _ in model.named_parameters()]
    if _vit_layout(model):
        top = len(model.blocks) + 1
        return {name: layer_id_for(name, top - 1) for name in names}, top
    what = type(model).__name__
    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        raise ValueError(
            f"optim.layer_decay needs the layers of the model, and {what} has neither a ViT "
            "layout (patch_embed + blocks) nor a timm group_matcher(); use a timm model, give "
            f"{what} a group_matcher(coarse=False) in timm's format, or set optim.layer_decay=null"
        )
    ids = group_parameters(model, matcher(coarse=False), reverse=True)
    top = max(ids.values(), default=0)
    if top == 0:
        raise ValueError(
            f"optim.layer_decay: {what}.group_matcher() puts all of its parameters into one "
            "group, so layer decay would change nothing; fix the matcher's patterns or set "
            "optim.layer_decay=null"
        )
    return ids, top


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    skip_list: Sequence[str] = (),
    no_weight_decay: Sequence[str] | None = None,
) -> list[dict]:
    """Split trainable parameters into decay / no-decay groups (and per layer with ``layer_decay``).

    Args:
        model: the model.
        weight_decay: decay for weight matrices.
        layer_decay: if set, multiply each group's lr by ``layer_decay ** (top - layer_id)`` with
            the ids of :func:`layer_ids` (a ViT: ``top = L + 1``).
        skip_list: extra names without weight decay.
        no_weight_decay: the names without weight decay besides 1-D tensors and biases (official
            BEiT: ``["pos_embed", "cls_token"]``); an entry matches a parameter of that name or
            ending in ``.<entry>`` (``relative_position_bias_table`` = every block's table).
            ``None``: the model's ``no_weight_decay()`` (timm convention), if it has one.

    Returns:
        Groups with ``params``, ``weight_decay``, ``lr_scale`` and a readable ``name``.

    Raises:
        ValueError: ``layer_decay`` (other than 1) for a model whose layers are unknown
            (:func:`layer_ids`).
    """
    skip = set(skip_list)
    if no_weight_decay is not None:
        if isinstance(no_weight_decay, str):
            raise TypeError(
                f"optim.no_weight_decay must be a list of parameter names, got the string "
                f"{no_weight_decay!r}; write [{no_weight_decay}]"
            )
        # Names the model lacks are ignored, as the official ``name in skip_list`` does (a model
        # with relative position bias has no pos_embed).
        skip |= {str(n) for n in no_weight_decay}
    elif hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    ids, top = _layers_for_decay(model, layer_decay)
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name in skip or _matches(name, skip)
        layer = ids.get(name, 0)
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            scale = layer_decay ** (top - layer) if layer_decay is not None else 1.0
            groups[key] = {
                "name": key,
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": scale,
            }
        groups[key]["params"].append(param)
    return list(groups.values())


def _layers_for_decay(model: nn.Module, layer_decay: float | None) -> tuple[dict[str, int], int]:
    """:func:`layer_ids` when ``layer_decay`` is set; ``({}, 0)`` (one layer) without it.

    ``layer_decay=1.0`` scales nothing, so a model without layers is accepted there (one layer).
    """
    if layer_decay is None:
        return {}, 0
    try:
        return layer_ids(model)
    except ValueError:
        if float(layer_decay) == 1.0:
            return {}, 0
        raise


def _matches(name: str, skip: set[str]) -> bool:
    # timm lists e.g. "relative_position_bias_table"; match it as a dotted name suffix.
    return any(name == s or name.endswith("." + s) for s in skip if s)


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters (all on CPU, or all on CUDA)."""
    if not params or any(not p.is_floating_point() or p.dtype not in _FUSED_DTYPES for p in params):
        return False
    kinds = {p.device.type for p in params}
    return kinds == {"cpu"} or (kinds == {"cuda"} and torch.cuda.is_available())


def cosine_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Lr / peak lr at ``step``: linear warmup from 0, then cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_multiplier(
    step: int, total_steps: int, warmup_steps: int, milestones: Sequence[float], decay_rate: float
) -> float:
    """Lr / peak lr at ``step`` (0-based): BiT-HyperRule's staircase (``bit_hyperrule.get_lr``).

    Linear warmup ``step / warmup_steps`` (0 at the first step), then ``decay_rate`` to the power
    of the milestones the step is past: a decay applies from the step *after* its anchor, as
    big_transfer's ``if s < step``. ``milestones`` are fractions of ``total_steps`` (BiT: 0.3,
    0.6, 0.9 of 500 / 10k / 20k steps).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    passed = sum(step > round(m * total_steps) for m in milestones)
    return decay_rate**passed


def build(
    model: nn.Module,
    total_steps: int,
    *,
    lr: float,
    name: str = "adamw",
    momentum: float = 0.9,
    nesterov: bool = False,
    schedule: str = "cosine",
    milestones: Sequence[float] = (0.3, 0.6, 0.9),
    decay_rate: float = 0.1,
    weight_decay: float = 0.05,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
    warmup_epochs: float | None = None,
    steps_per_epoch: int | None = None,
    layer_decay: float | None = None,
    no_weight_decay: Sequence[str] | None = None,
    fused: bool | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (or SGD) over :func:`param_groups` plus a per-step warmup + cosine/step ``LambdaLR``.

    Args:
        model: the model to optimize.
        total_steps: optimizer steps of the whole run (Lightning's ``estimated_stepping_batches``).
        lr: peak learning rate (already scaled to the global batch if the recipe asks for it).
        name: ``"adamw"`` or ``"sgd"``.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        schedule: ``"cosine"`` (warmup + cosine to ``min_lr``) or ``"step"`` (warmup + decays).
        milestones: fractions of ``total_steps`` where the step schedule multiplies the lr by
            ``decay_rate``.
        decay_rate: the step schedule's factor.
        weight_decay: AdamW decoupled weight decay on weight matrices.
        betas: AdamW moment coefficients.
        eps: AdamW denominator epsilon.
        min_lr: final lr of the cosine.
        warmup_steps: linear warmup length in steps.
        warmup_epochs: warmup in epochs (overrides ``warmup_steps``, as ``--warmup_epochs`` does).
        steps_per_epoch: optimizer steps per epoch, needed with ``warmup_epochs``.
        layer_decay: layer-wise lr decay factor (fine-tuning), None for pretraining.
        no_weight_decay: names without weight decay (see :func:`param_groups`); None: the
            model's ``no_weight_decay()``.
        fused: use the fused AdamW kernel (default: when every parameter is on CUDA or the CPU,
            where torch has one; on the 2-core CPU it is ~2.7x faster than the default loop).

    Returns:
        ``(optimizer, scheduler)``; step the scheduler once per optimizer step.
    """
    if total_steps < 1:
        raise ValueError(f"optim: total_steps must be >= 1, got {total_steps}")
    if lr <= 0:
        raise ValueError(f"optim.lr must be > 0, got {lr}")
    if not 0 <= min_lr <= lr:
        raise ValueError(f"optim.min_lr must be in [0, optim.lr={lr}], got {min_lr}")
    if warmup_epochs is not None:
        if not steps_per_epoch:
            raise ValueError("optim.warmup_epochs needs steps_per_epoch (set trainer.max_epochs)")
        warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    warmup_steps = min(int(warmup_steps), total_steps)

    if name not in ("adamw", "sgd"):
        raise ValueError(f"optim.name must be 'adamw' or 'sgd', got {name!r}")
    if schedule not in ("cosine", "step"):
        raise ValueError(f"optim.schedule must be 'cosine' or 'step', got {schedule!r}")
    groups = param_groups(model, weight_decay, layer_decay, no_weight_decay=no_weight_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    if fused is None:
        fused = _fused_supported([p for g in groups for p in g["params"]])
    if name == "adamw":
        optimizer = torch.optim.AdamW(
            groups, lr=lr, betas=tuple(betas), eps=eps, fused=bool(fused) or None
        )
    else:
        optimizer = torch.optim.SGD(
            groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=bool(fused) or None
        )
    min_ratio = min_lr / lr
    marks = tuple(float(m) for m in milestones)

    def multiplier(step: int) -> float:
        if schedule == "step":
            return step_multiplier(step, total_steps, warmup_steps, marks, decay_rate)
        return cosine_multiplier(step, total_steps, warmup_steps, min_ratio)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    return optimizer, scheduler


def _amp_clipping(trainer) -> bool:
    """Gradient clipping under fp16 autocast with a grad scaler (``16-mixed``).

    The scaler unscales inside a fused optimizer's step, too late for clipping, so Lightning
    refuses the combination. ``bf16-mixed`` has no scaler: the tasks clip themselves there
    (:meth:`bitrain.tasks.common.NonFiniteGuard.configure_gradient_clipping`) and keep the fused
    optimizer.
    """
    from lightning.pytorch.plugins.precision import MixedPrecision

    clip = getattr(trainer, "gradient_clip_val", None)
    plugin = getattr(trainer, "precision_plugin", None)
    return (
        bool(clip)
        and isinstance(plugin, MixedPrecision)
        and getattr(plugin, "scaler", None) is not None
    )


def lightning_optimizers(model: nn.Module, trainer, optim_cfg: dict) -> dict:
    """What a LightningModule's ``configure_optimizers`` returns: :func:`build` sized to the run.

    The total step count is the trainer's ``estimated_stepping_batches``; ``warmup_epochs`` is
    converted with ``total // max_epochs`` steps per epoch, and the scheduler steps every step.
    """
    total = int(trainer.estimated_stepping_batches)
    cfg = dict(optim_cfg)
    if cfg.get("fused") is None and _amp_clipping(trainer):
        # Under fp16's grad scaler Lightning refuses gradient clipping with a fused optimizer
        # (it unscales inside its step); the foreach kernels are used then.
        cfg["fused"] = False
    if cfg.get("warmup_epochs") is not None and "steps_per_epoch" not in cfg:
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise ValueError(
                "optim.warmup_epochs needs trainer.max_epochs; set optim.warmup_steps instead "
                "when training for trainer.max_steps"
            )
        cfg["steps_per_epoch"] = max(1, total // max_epochs)
    optimizer, scheduler = build(model, total, **cfg)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }
