"""The vanilla-ViT BEiT (the paper's 83.2 model): its pretraining layout, and fine-tuning from it.

The released ``beit_base_patch16_224_pt1k_800ep.pth`` was pretrained with
``--disable_rel_pos_bias --abs_pos_emb --layer_scale_init_value 0`` (unilm ``beit/README.md``):
learned absolute positions, no relative position bias, no LayerScale. The reference is
transformers' ``BeitForMaskedImageModeling`` in that configuration (``layer_scale_init_value=0``
makes its ``lambda_1 = lambda_2 = 1.0``, no scaling), with random weights. The test writes its
weights as an official ``{"model": state_dict}`` ``.pth`` with its own key table (official names
<- transformers' in-memory names, the fused ``qkv`` of ``modeling_pretrain.py`` built from
q/k/v), so no bitrain converter is involved in making the file.
``+experiment=beit_base_vanilla_ft1k`` (shrunk to a tiny width) must load it and give the
reference encoder's outputs, then train a step.
"""

from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from bitrain.training import runner

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
DEPTH, WIDTH, HEADS = 2, 48, 3
TINY = [
    "model.img_size=32",
    "+model.patch_size=8",
    f"+model.embed_dim={WIDTH}",
    f"+model.depth={DEPTH}",
    f"+model.num_heads={HEADS}",
]


def _vanilla_reference(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BeitConfig(
        vocab_size=40,
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH,
        image_size=32,
        patch_size=8,
        use_mask_token=True,
        use_absolute_position_embeddings=True,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=False,
        layer_scale_init_value=0.0,
        layer_norm_eps=1e-6,  # the official partial(nn.LayerNorm, eps=1e-6)
        drop_path_rate=0.0,
    )
    model = transformers.BeitForMaskedImageModeling(config).eval()
    with torch.no_grad():  # non-zero biases, tokens, positions: a mix-up cannot hide
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _official_state_dict(hf) -> dict[str, torch.Tensor]:
    """Official ``modeling_pretrain.py`` names <- transformers' in-memory names."""
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    out = {
        "cls_token": sd["beit.embeddings.cls_token"],
        "mask_token": sd["beit.embeddings.mask_token"],
        "pos_embed": sd["beit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["beit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["beit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
        "lm_head.weight": sd["lm_head.weight"],
        "lm_head.bias": sd["lm_head.bias"],
    }
    for i in range(DEPTH):
        hf_layer, block = f"beit.layers.{i}.", f"blocks.{i}."
        attention = hf_layer + "attention."
        out[block + "attn.qkv.weight"] = torch.cat(
            [sd[attention + f"{n}_proj.weight"] for n in ("q", "k", "v")], dim=0
        )
        out[block + "attn.q_bias"] = sd[attention + "q_proj.bias"]
        out[block + "attn.v_bias"] = sd[attention + "v_proj.bias"]
        pairs = {
            "attn.proj": "attention.o_proj",
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        }
        for ours, theirs in pairs.items():
            for kind in ("weight", "bias"):
                out[f"{block}{ours}.{kind}"] = sd[f"{hf_layer}{theirs}.{kind}"]
    return out


class _StopAfterOne(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = True


def test_vanilla_pretraining_checkpoint_finetunes_with_the_reference_encoder(tmp_path):
    hf = _vanilla_reference()
    official = _official_state_dict(hf)
    path = tmp_path / "beit_base_patch16_224_pt1k_800ep.pth"
    torch.save({"model": official}, path)

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            "finetune",
            overrides=[
                "+experiment=beit_base_vanilla_ft1k",
                f"model.pretrained={path}",
                "data=cls/demo",
                "data.global_batch_size=4",
                "data.max_batch_per_device=4",
                *TINY,
                "trainer=cpu",
                "trainer.precision=32-true",
                "trainer.max_steps=1",
                "+trainer.limit_val_batches=0",
                "trainer.enable_progress_bar=false",
                "logger=csv",
                f"paths.output_dir={tmp_path / 'run'}",
            ],
        )
    model = hydra.utils.instantiate(cfg.model).eval()
    assert model.pos_embed is not None and model.rel_pos_bias is None
    assert all(blk.gamma_1 is None and blk.attn.relative_position_bias_table is None
               for blk in model.blocks)  # fmt: skip
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.forward_features(images)  # [B, 1 + N, D]; mean pooling: no final norm
        reference = hf.beit(pixel_values=images).last_hidden_state
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
    # Every encoder tensor came from the file: only the pooling norm and the head are fresh.
    encoder = {
        k: v for k, v in model.state_dict().items() if not k.startswith(("fc_norm.", "head."))
    }
    assert encoder.keys() <= official.keys()
    assert all(torch.equal(v, official[k]) for k, v in encoder.items())

    datamodule, task, trainer = runner.build(cfg, callbacks=[_StopAfterOne()])
    trainer.fit(task, datamodule=datamodule)
    assert trainer.global_step == 1


def test_vanilla_pretraining_experiment_has_the_official_layout_and_logits(tmp_path):
    """``+experiment=beit_base_vanilla`` (shrunk) builds the official vanilla MIM model: the same
    tensors as the official file, and with its weights the reference's masked-token logits."""
    hf = _vanilla_reference()
    official = _official_state_dict(hf)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            "pretrain",
            overrides=[
                "+experiment=beit_base_vanilla",
                "model.img_size=32",
                "model.patch_size=8",
                f"model.embed_dim={WIDTH}",
                f"model.depth={DEPTH}",
                f"model.num_heads={HEADS}",
                "model.vocab_size=40",
                "model.drop_path_rate=0.0",
                f"paths.output_dir={tmp_path}",
            ],
        )
    model = hydra.utils.instantiate(cfg.model).eval()
    ours = {k: v for k, v in model.state_dict().items() if "relative_position_index" not in k}
    assert ours.keys() == official.keys()
    assert all(ours[k].shape == official[k].shape for k in ours)
    model.load_state_dict(official)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [1, 4, 5, 9, 14]] = True
    with torch.no_grad():
        logits = model(images, mask)  # [B, 5, V]
        reference = hf(pixel_values=images, bool_masked_pos=mask).logits[mask].view(2, 5, -1)
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-4)
