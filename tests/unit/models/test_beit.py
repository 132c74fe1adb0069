"""BeitMIM: shapes, masked-only logits in raster order, checks, official init, configs."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bitrain.models.beit import BeitMIM

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "model"


def test_forward_shapes(tiny_model, images, make_mask):
    mask = make_mask(2, 16, 5)
    logits = tiny_model(images, mask)
    assert logits.shape == (2, 5, 48)
    feats = tiny_model.forward_features(images)
    assert feats.shape == (2, 17, 64)
    assert tiny_model.grid_size == (4, 4) and tiny_model.num_patches == 16
    # A [B, gh, gw] mask is the same mask in raster order.
    torch.testing.assert_close(tiny_model(images, mask.view(2, 4, 4)), logits)


def test_masked_logits_are_raster_ordered_and_head_only_on_masked(tiny_model, images, make_mask):
    mask = make_mask(2, 16, 6, seed=3)
    logits = tiny_model(images, mask)
    full = tiny_model.lm_head(tiny_model.forward_features(images, mask)[:, 1:])  # [B, N, V]
    for b in range(2):
        positions = mask[b].nonzero().flatten()  # ascending = raster order
        torch.testing.assert_close(logits[b], full[b, positions])


def test_mask_token_replaces_masked_patches(tiny_model, images):
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 0] = True
    a = tiny_model.forward_features(images, mask)
    other = images.clone()
    other[:, :, :8, :8] = 0.0  # patch 0 is masked: its pixels must not matter
    torch.testing.assert_close(tiny_model.forward_features(other, mask), a)
    unmasked = tiny_model.forward_features(images)
    assert not torch.allclose(tiny_model.forward_features(other), unmasked)


def test_unequal_mask_counts_raise(tiny_model, images):
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, :4] = True
    with pytest.raises(ValueError, match=r"same number of masked patches.*\[3, 4\]"):
        tiny_model(images, mask)


def test_bad_masks_raise(tiny_model, images):
    with pytest.raises(ValueError, match="4x4 patch grid"):
        tiny_model(images, torch.zeros(2, 5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="must be bool"):
        tiny_model(images, torch.zeros(2, 16))


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        BeitMIM(img_size=30, patch_size=8, embed_dim=64, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        BeitMIM(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=5)


def test_official_init_statistics():
    torch.manual_seed(0)
    model = BeitMIM(img_size=32, patch_size=4, vocab_size=512, embed_dim=192, depth=3, num_heads=3)
    std = 0.02
    # trunc_normal_(std, a=-std, b=std): inside [-std, std], std of N(0,1) cut at +-1 = 0.5396.
    pdf1, mass = math.exp(-0.5) / math.sqrt(2 * math.pi), math.erf(1 / 2**0.5)
    expected = std * math.sqrt(1 - 2 * pdf1 / mass)
    for name in (
        "blocks.0.attn.qkv.weight",
        "blocks.1.mlp.fc1.weight",
        "lm_head.weight",
        "patch_embed.proj.weight",
        "cls_token",
        "mask_token",
    ):
        w = model.get_parameter(name)
        assert w.abs().max() <= std + 1e-7, name
    for w in (model.blocks[0].mlp.fc1.weight, model.lm_head.weight):
        assert abs(w.std().item() - expected) < 0.05 * expected
    for layer_id, blk in enumerate(model.blocks, start=1):
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            scale = math.sqrt(2.0 * layer_id)
            assert w.abs().max() <= std / scale + 1e-7
            assert abs(w.std().item() * scale - expected) < 0.1 * expected
        assert torch.all(blk.gamma_1 == 0.1) and torch.all(blk.gamma_2 == 0.1)
        assert torch.all(blk.attn.q_bias == 0) and torch.all(blk.attn.v_bias == 0)
        assert torch.all(blk.norm1.weight == 1) and torch.all(blk.norm1.bias == 0)
    assert torch.all(model.lm_head.bias == 0)
    assert torch.all(model.rel_pos_bias.relative_position_bias_table == 0)
    assert model.norm.eps == 1e-6 and isinstance(model.norm, torch.nn.LayerNorm)


def test_no_weight_decay_and_group_matcher(tiny_model):
    # The official model's list (modeling_pretrain.py): the mask token and the relative position
    # bias table are decayed (timm's Beit.no_weight_decay also lists the tables).
    assert tiny_model.no_weight_decay() == {"pos_embed", "cls_token"}
    matcher = tiny_model.group_matcher()
    assert "mask_token" in matcher["stem"]


def test_attention_kernel_per_device(tiny_model, images, make_mask, monkeypatch):
    """CPU: timm's explicit attention; off the CPU: fused SDPA with the rel-pos bias as
    ``attn_mask``. Both give the same logits and gradients (float32 rounding)."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():  # a non-zero bias, so that both paths really add it
        tiny_model.rel_pos_bias.relative_position_bias_table.normal_(std=0.5)
    mask = make_mask(2, 16, 4)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tiny_model.zero_grad(set_to_none=True)
        out = tiny_model(images, mask)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
        return out.detach(), grads

    assert not any(blk.attn.fused_attn for blk in tiny_model.blocks)  # built on the CPU
    explicit, explicit_grads = run()
    assert seen == []
    for blk in tiny_model.blocks:  # what the model runs on a GPU
        blk.attn.fused_attn = True
    fused, fused_grads = run()
    assert len(seen) == 2 and all(m is not None and m.shape[-2:] == (17, 17) for m in seen)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-6)
    assert explicit_grads.keys() == fused_grads.keys()
    assert "rel_pos_bias.relative_position_bias_table" in fused_grads
    for name, grad in fused_grads.items():
        torch.testing.assert_close(explicit_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    # Any device move re-selects: back to explicit on the CPU, fused elsewhere (meta stands in).
    tiny_model.to(torch.float32)
    assert not any(blk.attn.fused_attn for blk in tiny_model.blocks)
    tiny_model.to("meta")
    assert all(blk.attn.fused_attn for blk in tiny_model.blocks)


def test_variants_without_layer_scale_and_with_per_layer_bias(make_tiny, images, make_mask):
    model = make_tiny(
        init_values=0,
        use_rel_pos_bias=True,
        use_shared_rel_pos_bias=False,
        use_abs_pos_emb=True,
        layer_norm_eps=1e-12,
    )
    keys = set(model.state_dict())
    assert "blocks.0.gamma_1" not in keys and "pos_embed" in keys
    assert "blocks.1.attn.relative_position_bias_table" in keys and model.rel_pos_bias is None
    assert model.norm.eps == 1e-12 and model.model_kwargs["init_values"] is None
    assert model(images, make_mask(2, 16, 3)).shape == (2, 3, 48)


def test_gradients_reach_mask_token_and_head(make_tiny, images, make_mask):
    model = make_tiny().train()
    model(images, make_mask(2, 16, 4)).logsumexp(-1).sum().backward()
    assert model.mask_token.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0


def _build(name: str, vocab: int = 8192) -> BeitMIM:
    cfg = OmegaConf.create({"tokenizer": {"vocab_size": vocab}})
    cfg.model = OmegaConf.load(CONFIGS / f"{name}.yaml")
    return hydra.utils.instantiate(cfg.model)


def test_tiny_config_is_the_demo_model():
    model = _build("beit_tiny_mim", vocab=512)
    assert model.grid_size == (4, 4) and model.embed_dim == 192 and len(model.blocks) == 4
    assert model.vocab_size == 512 and model.rel_pos_bias is not None and model.pos_embed is None


def test_static_masked_count_gathers_what_boolean_indexing_selects(tiny_model, images, make_mask):
    """forward(num_masked=k): the sync-free gather equals x[mask], and a wrong k is refused."""
    mask = make_mask(2, 16, 6, seed=5)
    torch.testing.assert_close(tiny_model(images, mask, num_masked=6), tiny_model(images, mask))
    index = BeitMIM.masked_index(mask, 6)
    assert torch.equal(index, torch.stack([m.nonzero().flatten() for m in mask]))
    with pytest.raises(ValueError, match="exactly 5 masked patches"):
        tiny_model(images, mask, num_masked=5)
