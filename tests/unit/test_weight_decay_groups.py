"""Weight-decay groups of real one-step runs equal the official ones (``optim_factory.py``).

Official ``get_parameter_groups`` exempts 1-D tensors, ``*.bias`` and ``no_weight_decay()`` =
{pos_embed, cls_token}: the mask token and the relative position bias tables are decayed, in
pretraining (``run_beit_pretraining.py``) and in fine-tuning (``run_class_finetuning.py`` without
``--disable_weight_decay_on_rel_pos_bias``). Each run below is composed from the experiment
config, shrunk to a tiny model, trained for one step, and its optimizer's groups are read back.
"""

from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir

from bitrain.training import runner

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY_MIM = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=48", "model.depth=2"]
TINY_CLS = ["model.img_size=32", "+model.patch_size=8", "+model.embed_dim=48", "+model.depth=2"]


class _StopAfterOne(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = True


def _run_one_step(name, overrides, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            name,
            overrides=[
                *overrides,
                "trainer=cpu",
                "trainer.precision=32-true",
                "trainer.max_steps=1",
                "+trainer.limit_val_batches=0",
                "trainer.enable_progress_bar=false",
                "logger=csv",
                "data.num_workers=0",
                "data.persistent_workers=false",
                f"paths.output_dir={tmp_path}",
            ],
        )
    datamodule, task, trainer = runner.build(cfg, callbacks=[_StopAfterOne()])
    trainer.fit(task, datamodule=datamodule)
    assert trainer.global_step == 1
    names = {id(p): n for n, p in task.model.named_parameters()}
    decayed, exempt = set(), set()
    for group in trainer.optimizers[0].param_groups:
        for param in group["params"]:
            (decayed if group["weight_decay"] > 0 else exempt).add(names[id(param)])
    assert decayed and exempt and not decayed & exempt
    return decayed, exempt


def _pretrain_overrides(experiment, encoder_pkl):
    return [
        f"+experiment={experiment}",
        "data=synthetic",
        "data.global_batch_size=2",
        "data.max_batch_per_device=2",
        *TINY_MIM,
        "model.num_heads=3",
        f"tokenizer.weights_path={encoder_pkl}",
        "tokenizer.input_size=32",
        "tokenizer.vocab_size=64",
        "tokenizer.n_hid=16",
        "tokenizer.n_blk_per_group=1",
        "masking.num_masking_patches=6",
        "masking.min_num_patches=2",
    ]


def test_pretraining_decays_mask_token_and_shared_rel_pos_table(tmp_path, dall_e_encoder_pkl):
    decayed, exempt = _run_one_step(
        "pretrain", _pretrain_overrides("beit_base", dall_e_encoder_pkl), tmp_path
    )
    assert {"mask_token", "rel_pos_bias.relative_position_bias_table"} <= decayed
    assert {"blocks.0.attn.qkv.weight", "lm_head.weight", "patch_embed.proj.weight"} <= decayed
    assert "cls_token" in exempt
    assert {"blocks.0.gamma_1", "blocks.1.norm1.weight", "norm.bias", "lm_head.bias"} <= exempt
    assert {"blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "patch_embed.proj.bias"} <= exempt


def test_vanilla_pretraining_exempts_pos_embed(tmp_path, dall_e_encoder_pkl):
    decayed, exempt = _run_one_step(
        "pretrain", _pretrain_overrides("beit_base_vanilla", dall_e_encoder_pkl), tmp_path
    )
    assert {"pos_embed", "cls_token"} <= exempt and "mask_token" in decayed
    assert not any("gamma" in n or "relative_position" in n for n in decayed | exempt)


@pytest.mark.parametrize("experiment", ["beit_base_ft1k", "beit_base_vanilla_ft1k"])
def test_finetuning_decays_every_blocks_rel_pos_table(experiment, tmp_path):
    decayed, exempt = _run_one_step(
        "finetune",
        [
            f"+experiment={experiment}",
            "data=cls/demo",
            "model.pretrained=null",
            "data.global_batch_size=4",
            "data.max_batch_per_device=4",
            *TINY_CLS,
            "+model.num_heads=3",
        ],
        tmp_path,
    )
    assert "cls_token" in exempt
    assert {"fc_norm.weight", "fc_norm.bias", "head.bias", "blocks.1.attn.proj.bias"} <= exempt
    assert {"head.weight", "blocks.1.mlp.fc2.weight"} <= decayed
    if experiment == "beit_base_ft1k":
        tables = {f"blocks.{i}.attn.relative_position_bias_table" for i in range(2)}
        assert tables <= decayed
        assert {"blocks.0.gamma_1", "blocks.1.gamma_2"} <= exempt
    else:
        assert "pos_embed" in exempt
