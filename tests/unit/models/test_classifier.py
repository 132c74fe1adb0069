"""bitrain.models.classifier: timm classifiers initialised from MIM / classifier checkpoints."""

import pytest
import torch

from bitrain.checkpoints import adapt_state_dict, build_classifier, save_mim_model
from bitrain.io import CheckpointError
from bitrain.models.beit import BeitMIM
from bitrain.models.classifier import create_classifier

MIM = dict(
    img_size=32,
    patch_size=8,
    vocab_size=64,
    embed_dim=48,
    depth=2,
    num_heads=3,
    drop_path_rate=0.0,
    use_shared_rel_pos_bias=True,
)
NAME = "beit_base_patch16_224"


@pytest.fixture(scope="module")
def mim():
    torch.manual_seed(0)
    model = BeitMIM(**MIM)
    with torch.no_grad():  # a non-trivial shared table, so a wrong expansion cannot pass
        model.rel_pos_bias.relative_position_bias_table.normal_()
    return model


def test_random_init_and_spec(beit_spec):
    model = create_classifier(NAME, 5, **beit_spec)
    assert model.bitrain_spec == {"model_name": NAME, "num_classes": 5, **beit_spec}
    assert model.head.out_features == 5
    assert model.head.weight.abs().max() < 1e-3  # head_init_scale 0.001 (timm's default for BEiT)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="num_classes"):
        create_classifier(NAME, 0, **beit_spec)


@pytest.mark.parametrize("fmt", ["bitrain", "official", "hf"])
def test_from_every_mim_format(tmp_path, mim, fmt, beit_spec):
    path = save_mim_model(mim, tmp_path / ("ckpt" if fmt == "hf" else f"m.{fmt}"), format=fmt)
    model = build_classifier(NAME, 7, pretrained=str(path), **beit_spec)
    shared = mim.rel_pos_bias.relative_position_bias_table
    for block in model.blocks:  # the shared bias, copied into every block
        assert torch.equal(block.attn.relative_position_bias_table, shared)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, mim.blocks[1].mlp.fc2.weight)
    assert torch.equal(model.patch_embed.proj.weight, mim.patch_embed.proj.weight)
    assert torch.equal(model.blocks[0].gamma_1, mim.blocks[0].gamma_1)
    assert model.head.weight.abs().max() < 1e-3  # fresh head, scaled
    # The pretraining norm is not the fine-tuning fc_norm (mean pooling): fc_norm is fresh.
    assert torch.equal(model.fc_norm.weight, torch.ones(48))


def test_resolution_change_resizes_tables(tmp_path, mim, beit_spec):
    path = save_mim_model(mim, tmp_path / "m.ckpt")
    model = build_classifier(NAME, 3, pretrained=str(path), **{**beit_spec, "img_size": 48})
    table = model.blocks[0].attn.relative_position_bias_table
    assert table.shape == ((2 * 6 - 1) ** 2 + 3, 3)
    # The 3 cls-token entries are kept as they are.
    assert torch.equal(table[-3:], mim.rel_pos_bias.relative_position_bias_table[-3:])
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_constant_table_stays_constant_when_resized(beit_spec):
    model = create_classifier(NAME, 3, **{**beit_spec, "img_size": 48})
    table = torch.full(((2 * 4 - 1) ** 2 + 3, 3), 0.5)
    state = {"rel_pos_bias.relative_position_bias_table": table}
    out, notes = adapt_state_dict(state, model)
    resized = out["blocks.0.attn.relative_position_bias_table"]
    assert resized.shape == ((2 * 6 - 1) ** 2 + 3, 3)
    assert torch.allclose(resized, torch.full_like(resized, 0.5))
    assert any("expanded" in n for n in notes) and any("resized" in n for n in notes)


def test_other_shape_is_a_clear_error_unless_partial(tmp_path, mim, beit_spec):
    path = save_mim_model(mim, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match=r"shape mismatch: .*\(48,\) != \(96,\)"):
        build_classifier(NAME, 3, pretrained=str(path), **{**beit_spec, "embed_dim": 96})
    model = build_classifier(
        NAME, 3, pretrained=str(path), pretrained_strict=False, **{**beit_spec, "depth": 3}
    )
    assert torch.equal(model.blocks[0].mlp.fc1.weight, mim.blocks[0].mlp.fc1.weight)


def test_create_classifier_builds_the_architecture_only(beit_spec):
    # models never import checkpoints: initialising is bitrain.checkpoints.build_classifier's job
    with pytest.raises(ValueError, match="build_classifier"):
        create_classifier(NAME, 3, pretrained="x.pth", **beit_spec)


def test_classifier_checkpoint_keeps_its_head_when_classes_match(tmp_path, beit_spec):
    torch.manual_seed(1)
    source = create_classifier(NAME, 4, **beit_spec)
    torch.save({"model": source.state_dict()}, tmp_path / "ft.pth")  # official fine-tuned layout
    same = build_classifier(NAME, 4, pretrained=str(tmp_path / "ft.pth"), **beit_spec)
    assert torch.equal(same.head.weight, source.head.weight)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(same.eval()(x), source.eval()(x))
    other = build_classifier(NAME, 9, pretrained=str(tmp_path / "ft.pth"), **beit_spec)
    assert other.head.out_features == 9 and torch.equal(other.fc_norm.weight, source.fc_norm.weight)


def test_missing_checkpoint_says_what_to_give(tmp_path, beit_spec):
    with pytest.raises(FileNotFoundError, match="official BEiT .pth"):
        build_classifier(NAME, 3, pretrained=str(tmp_path / "nope.pth"), **beit_spec)
