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


def _official_layer_id(name, num_layers):
    """unilm beit/optim_factory.py get_num_layer_for_vit (lines 33-44 at 2312c6f), restated with
    ``num_max_layer = num_layers + 2`` as run_class_finetuning.py builds its assigner."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return num_layers + 1
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def _ids_and_scales(groups, model):
    """{parameter name: (layer id from the group's name, the group's lr_scale)}."""
    by_param = {id(p): g for g in groups for p in g["params"]}
    out = {}
    for name, param in model.named_parameters():
        group = by_param[id(param)]
        out[name] = (int(group["name"].split("_")[1]), group["lr_scale"])
    return out


def test_beit_base_layer_ids_are_the_official_ones():
    """timm's beit_base_patch16_224 as the fine-tuning recipes build it (mean pooling, fc_norm)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model("beit_base_patch16_224", num_classes=10, global_pool="avg")
    got = _ids_and_scales(optim.param_groups(model, 0.05, layer_decay=0.65), model)
    assert {n: i for n, (i, _) in got.items()} == {
        n: _official_layer_id(n, 12) for n, _ in model.named_parameters()
    }
    assert all(s == pytest.approx(0.65 ** (13 - i)) for i, s in got.values())
    assert got["head.weight"][0] == got["fc_norm.weight"][0] == 13
    assert got["blocks.11.mlp.fc2.weight"][0] == 12 and got["cls_token"][0] == 0


def test_mim_model_layer_ids_are_the_official_ones():
    """BeitMIM's extra names map as the official code maps them: mask_token 0, lm_head and the
    shared relative position bias with the head (L + 1), the final norm too."""
    from bitrain.models.beit import BeitMIM

    model = BeitMIM(img_size=32, patch_size=8, vocab_size=16, embed_dim=16, depth=2, num_heads=2)
    got = _ids_and_scales(optim.param_groups(model, 0.05, layer_decay=0.5), model)
    assert {n: i for n, (i, _) in got.items()} == {
        n: _official_layer_id(n, 2) for n, _ in model.named_parameters()
    }
    assert got["mask_token"] == (0, 0.5**3)
    assert got["lm_head.weight"] == got["rel_pos_bias.relative_position_bias_table"] == (3, 1.0)
    assert got["norm.weight"] == (3, 1.0)


def test_a_model_without_vit_layout_gets_the_layers_of_its_timm_group_matcher():
    """Before, a non-ViT model with layer decay silently got lr scale 1 everywhere."""
    import timm
    from timm.optim import param_groups_layer_decay

    with torch.device("meta"):
        model = timm.create_model("resnetv2_50x1_bit", num_classes=10)
    groups = optim.param_groups(model, 0.0, layer_decay=0.8)
    got = _ids_and_scales(groups, model)
    # The stem is layer 0, the 3 + 4 + 6 + 3 blocks layers 1 to 16 (the final norm with the last
    # block, as timm's matcher says), the head layer 17.
    assert got["stem.conv.weight"] == (0, pytest.approx(0.8**17))
    assert got["stages.0.blocks.0.conv1.weight"][0] == 1
    assert got["stages.3.blocks.2.conv3.weight"][0] == got["norm.weight"][0] == 16
    assert got["head.fc.weight"] == (17, 1.0)
    # The same scales as timm's own layer-decay groups give each parameter.
    timm_scale = {
        id(p): g["lr_scale"]
        for g in param_groups_layer_decay(model, weight_decay=0.0, layer_decay=0.8)
        for p in g["params"]
    }
    for name, param in model.named_parameters():
        assert got[name][1] == pytest.approx(timm_scale[id(param)]), name


def test_layer_decay_for_a_model_without_layers_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Sequential has neither .*optim.layer_decay=null"):
        optim.build(model, 10, lr=1e-3, layer_decay=0.75)
    # layer_decay=1 scales nothing: accepted, one layer.
    opt, _ = optim.build(model, 10, lr=1e-3, layer_decay=1.0)
    assert {g["lr_scale"] for g in opt.param_groups} == {1.0}

    class OneGroup(nn.Sequential):
        def group_matcher(self, coarse=False):
            return {"stem": r"^nothing"}

    with pytest.raises(ValueError, match=r"OneGroup.group_matcher\(\) puts all"):
        optim.param_groups(OneGroup(nn.Linear(2, 2)), 0.05, layer_decay=0.75)
