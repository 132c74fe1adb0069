import math

import pytest
import torch
from torch import nn

from bitrain.tasks import optim


class TinyViT(nn.Module):
    """Enough of a ViT for the parameter-group rules: tokens, embed, blocks, norm, head."""

    def __init__(self, depth=3, dim=8):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm1": nn.LayerNorm(dim), "fc": nn.Linear(dim, dim)})
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def no_weight_decay(self):
        return {"cls_token"}


def _group_of(groups, param):
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_no_decay_on_norms_biases_tokens():
    model = TinyViT()
    groups = optim.param_groups(model, weight_decay=0.05)
    assert _group_of(groups, model.cls_token)["weight_decay"] == 0.0
    assert _group_of(groups, model.norm.weight)["weight_decay"] == 0.0
    assert _group_of(groups, model.head.bias)["weight_decay"] == 0.0
    assert _group_of(groups, model.head.weight)["weight_decay"] == 0.05
    assert _group_of(groups, model.blocks[1]["fc"].weight)["weight_decay"] == 0.05
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))


def test_layer_ids():
    assert optim.layer_id_for("cls_token", 12) == 0
    assert optim.layer_id_for("patch_embed.proj.weight", 12) == 0
    assert optim.layer_id_for("blocks.0.attn.qkv.weight", 12) == 1
    assert optim.layer_id_for("blocks.11.mlp.fc2.bias", 12) == 12
    assert optim.layer_id_for("head.weight", 12) == 13


def test_schedule_warmup_then_cosine_to_min():
    total, warm, lr, min_lr = 100, 10, 1e-3, 1e-5
    model = TinyViT()
    opt, sched = optim.build(model, total, lr=lr, min_lr=min_lr, warmup_steps=warm)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(lr / warm)
    assert lrs[warm - 1] == pytest.approx(lr)
    assert max(lrs) == pytest.approx(lr)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[warm:], lrs[warm + 1 :]))  # monotone decay
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx(
        min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-6
    )
    assert lrs[-1] == pytest.approx(min_lr, rel=0.05)


def test_warmup_epochs_converted_with_steps_per_epoch():
    opt, sched = optim.build(TinyViT(), 100, lr=1.0, warmup_epochs=2, steps_per_epoch=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 20)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        optim.build(TinyViT(), 100, lr=1.0, warmup_epochs=2)


def test_layer_decay_applied_by_the_scheduler():
    """The decay must show in optimizer.param_groups[*]['lr'] after the scheduler stepped."""
    depth, decay, lr = 3, 0.65, 1e-3
    model = TinyViT(depth=depth)
    opt, sched = optim.build(model, 50, lr=lr, layer_decay=decay, warmup_steps=0)
    for _ in range(5):
        opt.step()
        sched.step()
    mult = optim.cosine_multiplier(5, 50, 0, 0.0)
    head = _group_of(opt.param_groups, model.head.weight)["lr"]
    embed = _group_of(opt.param_groups, model.cls_token)["lr"]
    block0 = _group_of(opt.param_groups, model.blocks[0]["fc"].weight)["lr"]
    assert head == pytest.approx(lr * mult)
    assert embed / head == pytest.approx(decay ** (depth + 1))
    assert block0 / head == pytest.approx(decay**depth)


def test_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        optim.build(TinyViT(), 0, lr=1e-3)
    with pytest.raises(ValueError, match="min_lr"):
        optim.build(TinyViT(), 10, lr=1e-3, min_lr=1.0)


def test_no_weight_decay_list_replaces_the_models_own():
    """An explicit list (official: pos_embed, cls_token) replaces model.no_weight_decay(); an
    entry also matches as a dotted suffix, as --disable_weight_decay_on_rel_pos_bias needs."""
    model = TinyViT()
    model.mask_token = nn.Parameter(torch.zeros(1, 1, 8))
    groups = optim.param_groups(model, 0.05, no_weight_decay=["pos_embed"])
    assert _group_of(groups, model.cls_token)["weight_decay"] == 0.05  # model's list not used
    assert _group_of(groups, model.mask_token)["weight_decay"] == 0.05
    groups = optim.param_groups(model, 0.05, no_weight_decay=["cls_token", "fc.weight"])
    assert _group_of(groups, model.cls_token)["weight_decay"] == 0.0
    assert all(_group_of(groups, b["fc"].weight)["weight_decay"] == 0.0 for b in model.blocks)
    assert _group_of(groups, model.head.weight)["weight_decay"] == 0.05
    with pytest.raises(TypeError, match=r"optim.no_weight_decay must be a list"):
        optim.param_groups(model, 0.05, no_weight_decay="cls_token")


def _bit_lr(step, anchors, base_lr):
    """BiT-HyperRule's lr at ``step`` (big_transfer bit_hyperrule.get_lr, restated): linear warmup
    from 0 to the first anchor, then /10 for every later anchor strictly below the step."""
    if step < anchors[0]:
        return base_lr * step / anchors[0]
    return base_lr * 0.1 ** sum(a < step for a in anchors[1:-1])


@pytest.mark.parametrize("anchors", [(100, 200, 300, 400, 500), (500, 3000, 6000, 9000, 10_000)])
def test_step_schedule_equals_bit_hyperrule(anchors):
    total = anchors[-1]
    marks = [a / total for a in anchors[1:-1]]
    opt, sched = optim.build(
        TinyViT(), total, lr=0.003, name="sgd", weight_decay=0.0, schedule="step",
        milestones=marks, decay_rate=0.1, warmup_steps=anchors[0],
    )  # fmt: skip
    for step in range(total):
        expected = _bit_lr(step, anchors, 0.003)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15), step
        opt.step()
        sched.step()
