"""Every primary config composes, alone and with every experiment; every experiment builds its
full-size task on the meta device as the architecture it names; typos fail at once."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def _entry(experiment: str) -> str:
    """The entry point an experiment belongs to, from its task_name (pretrain_* / finetune_*)."""
    for line in (CONFIGS / "experiment" / f"{experiment}.yaml").read_text().splitlines():
        if line.startswith("task_name:"):
            return line.split(":", 1)[1].strip().split("_", 1)[0]
    raise AssertionError(f"experiment {experiment} sets no task_name")


PRETRAIN_EXPERIMENTS = [e for e in EXPERIMENTS if _entry(e) == "pretrain"]
FINETUNE_EXPERIMENTS = [e for e in EXPERIMENTS if _entry(e) == "finetune"]


def test_every_experiment_belongs_to_an_entry_point():
    assert set(PRETRAIN_EXPERIMENTS) | set(FINETUNE_EXPERIMENTS) == set(EXPERIMENTS)
    assert len(FINETUNE_EXPERIMENTS) == 6


def _compose(name, overrides, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(name, overrides=[*overrides, f"paths.output_dir={tmp_path}"])
    OmegaConf.resolve(cfg)
    return cfg


@pytest.mark.parametrize("name", ["pretrain", "train_tokenizer", "finetune"])
def test_primary_configs_compose(name, tmp_path):
    # finetune's default model.pretrained is the newest demo pretraining checkpoint: none in CI.
    cfg = _compose(name, ["model.pretrained=null"] if name == "finetune" else [], tmp_path)
    assert cfg.task._target_
    assert cfg.trainer._target_ == "lightning.Trainer"


# What each experiment says it builds, as the timm architecture of the released weights (name +
# the keyword arguments that differ from timm's defaults) and the parameter count in millions.
# Pretraining: the encoder of the official modeling_pretrain.py is timm's Beit (no head, final norm)
# plus mask_token and lm_head; its relative position bias is shared by all blocks (BEiT+).
_MIM = {"num_classes": 0, "global_pool": "", "use_rel_pos_bias": False}
_SHARED = {**_MIM, "use_shared_rel_pos_bias": True}
# --disable_rel_pos_bias --abs_pos_emb --layer_scale_init_value 0 (unilm beit/README.md line 190).
_VANILLA = {"use_abs_pos_emb": True, "use_rel_pos_bias": False, "init_values": 0.0}
ARCHITECTURES = {
    # experiment: (timm reference, its kwargs, classes, parameters in millions)
    "beit_base": ("beit_base_patch16_224", _SHARED, 8192, 92.0),  # 85.7M encoder + LM head
    "beit_base_in22k": ("beit_base_patch16_224", _SHARED, 8192, 92.0),
    "beit_base_vanilla": ("beit_base_patch16_224", {**_MIM, **_VANILLA}, 8192, 92.1),
    "beit_large": ("beit_large_patch16_224", _SHARED, 8192, 311.5),  # 303.1M encoder
    "beit_base_ft1k": ("beit_base_patch16_224", {}, 1000, 86.5),
    "beit_base_ft21k": ("beit_base_patch16_224", {}, 21841, 102.6),
    "beit_base_ft21k_to1k": ("beit_base_patch16_224", {}, 1000, 86.5),
    "beit_base_vanilla_ft1k": ("beit_base_patch16_224", _VANILLA, 1000, 86.6),
    "vit_b32_in21k_ft1k": ("vit_base_patch32_384", {}, 1000, 88.3),  # fine-tuned at 384 px
    "bit_r50x1_hyperrule": ("resnetv2_50x1_bit", {}, 1000, 25.5),
}


def test_every_experiment_has_an_architecture():
    assert sorted(ARCHITECTURES) == EXPERIMENTS


def _shapes(module: torch.nn.Module, drop: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.startswith(drop)}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_builds_its_task_on_the_meta_device(experiment, tmp_path, monkeypatch):
    """Each experiment's task, full size, built on the meta device (shapes, no memory, no data).

    The model equals the timm architecture the experiment names, tensor by tensor. Pretraining
    builds the whole MaskedImageModeling task, the tokenizer included: its weights file (DALL-E's
    encoder.pkl) is the one input not read; the encoder is built from the config's architecture
    keys, which are what loading checks the file against. The task's own checks run (tokenizer
    grid and vocabulary = the model's), and the mask generator's grid is the model's patch grid.
    """
    import hydra
    import timm

    import bitrain.tokenizers.dall_e as dall_e

    entry = _entry(experiment)
    overrides = [f"+experiment={experiment}"]
    if entry == "finetune":
        overrides.append("model.pretrained=null")  # a random init: no checkpoint to read
    cfg = _compose(entry, overrides, tmp_path)
    assert cfg.trainer.precision == "bf16-mixed"
    monkeypatch.setattr(
        dall_e, "load_dall_e_encoder", lambda path, **arch: dall_e.DallEEncoder(**arch)
    )
    name, kwargs, classes, millions = ARCHITECTURES[experiment]
    with torch.device("meta"):
        task = hydra.utils.instantiate(cfg.task)
        reference = timm.create_model(name, pretrained=False, **{"num_classes": classes, **kwargs})
    model = task.model
    assert all(p.device.type == "meta" for p in model.parameters())
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions
    if entry == "pretrain":
        grid = tuple(model.patch_embed.grid_size)
        assert _shapes(model, ("mask_token", "lm_head")) == _shapes(reference)
        assert tuple(model.mask_token.shape) == (1, 1, model.embed_dim)
        assert tuple(model.lm_head.weight.shape) == (classes, model.embed_dim)
        assert task.tokenizer.vocab_size == classes and tuple(task.tokenizer.grid_size) == grid
        # As dall_e.encoder.Encoder() (what wrote encoder.pkl): 53,786,240 parameters.
        assert sum(p.numel() for p in task.tokenizer.parameters()) == 53_786_240
        masks = hydra.utils.instantiate(cfg.masking)
        assert masks.grid_size == grid == (14, 14) and masks.num_masking_patches == 75
        sizes = (cfg.data.transform.input_size, cfg.data.transform.second_input_size)
        assert sizes == (224, 112)
    else:
        assert _shapes(model) == _shapes(reference)
        assert task.num_classes == cfg.data.num_classes == classes
        assert task.hparams["eval_transform"] is not None  # predict preprocesses as evaluation


def test_command_line_group_beats_experiment(tmp_path):
    cfg = _compose("pretrain", ["+experiment=beit_base", "data=synthetic"], tmp_path)
    assert "Synthetic" in cfg.data.source._target_


@pytest.mark.parametrize(
    "typo", ["trainer.max_stepz=1", "data.batch_sise=8", "task.max_nonfinite=3"]
)
def test_typo_in_override_fails(tmp_path, typo):
    """A misspelt key of a group (trainer, data) or of the primary config's own task node."""
    path = typo.split("=")[0]
    with pytest.raises(ConfigCompositionException, match=f"Could not override '{path}'") as err:
        _compose("pretrain", [typo], tmp_path)
    assert f"Key '{path.split('.')[-1]}' is not in struct" in str(err.value.__cause__)


def test_unknown_config_group_option_fails(tmp_path):
    with pytest.raises(ConfigCompositionException):
        _compose("pretrain", ["model=does_not_exist"], tmp_path)
