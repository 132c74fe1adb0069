"""Hugging Face classifier interop: BEiT / ViT / BiT logit parity both ways, labels, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from bitrain.checkpoints import build_classifier, load_classifier, save_classifier
from bitrain.checkpoints.formats import read_hf
from bitrain.checkpoints.hf import label_names
from bitrain.io import CheckpointError
from bitrain.models.classifier import apply_norm_settings, create_classifier

transformers = pytest.importorskip("transformers")

TOL = 1e-4
LABELS = ["cat", "dog", "fox", "owl", "yak"]
BEIT_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "image_size": 32,
    "patch_size": 8,
    "drop_path_rate": 0.0,
}
# name -> (transformers config class, kwargs, image size)
HF_VARIANTS = {
    "beit_per_layer_relpos": (
        "BeitConfig",
        {**BEIT_TINY, "use_relative_position_bias": True, "layer_norm_eps": 1e-6},
        32,
    ),
    "beit_shared_relpos_abspos": (
        "BeitConfig",
        {
            **BEIT_TINY,
            "use_shared_relative_position_bias": True,
            "use_absolute_position_embeddings": True,
            "layer_norm_eps": 1e-6,
        },
        32,
    ),
    "beit_eps1e-12_cls_pooling": (  # HF's default eps; CLS token + beit.layernorm
        "BeitConfig",
        {**BEIT_TINY, "use_relative_position_bias": True, "use_mean_pooling": False},
        32,
    ),
    "beit_eps1e-6_no_layerscale": (
        "BeitConfig",
        {
            **BEIT_TINY,
            "use_shared_relative_position_bias": True,
            "use_relative_position_bias": True,
            "layer_scale_init_value": 0.0,
            "layer_norm_eps": 1e-6,
        },
        32,
    ),
    "vit_patch32": (
        "ViTConfig",
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "image_size": 64,
            "patch_size": 32,
        },
        64,
    ),
    "bit": (  # timm names fix BiT depths; widths small, num_groups != timm's 32
        "BitConfig",
        {
            "embedding_size": 32,
            "hidden_sizes": [128, 128, 128, 256],
            "depths": [3, 4, 6, 3],
            "num_groups": 8,
        },
        64,
    ),
}
_HEADS = {"BeitConfig": "Beit", "ViTConfig": "ViT", "BitConfig": "Bit"}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights, biases, lambdas, tables): a wrong map shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            std = (0.02, 0.1, 0.3)[i % 3]
            p.add_(torch.randn(p.shape, generator=g) * std)


def make_hf(variant: str, seed: int = 0, labels=LABELS):
    cls_name, kwargs, size = HF_VARIANTS[variant]
    config = getattr(transformers, cls_name)(
        **kwargs,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{_HEADS[cls_name]}ForImageClassification")(config).eval()
    _randomize(model, seed)
    return model, size


def images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_hf_to_bitrain_logits(variant, tmp_path):
    hf, size = make_hf(variant)
    hf.save_pretrained(tmp_path / "hf")
    model = load_classifier(tmp_path / "hf")
    assert not model.training
    x = images(size)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
        out = model(x)
    assert max_diff(out, ref) <= TOL, variant
    assert model.label_names == LABELS
    # HF's norm settings are applied after creation (timm: LayerNorm eps 1e-6, 32 groups)
    if variant == "bit":
        groups = {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
        assert groups == {hf.config.num_groups}
    else:
        eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
        assert eps == {hf.config.layer_norm_eps}

    # the spec rebuilds the model through create_classifier, strict load
    state, spec, config = read_hf(tmp_path / "hf")
    assert spec["num_classes"] == len(LABELS)
    assert label_names(config, spec["num_classes"]) == LABELS
    create_classifier(**spec).load_state_dict(state, strict=True)


def test_hf_5x_spelling_and_default_labels(tmp_path):
    """Weights in transformers 5.x in-memory spelling load too; LABEL_i means no names."""
    hf, size = make_hf("beit_shared_relpos_abspos", labels=[f"LABEL_{i}" for i in range(3)])
    hf.save_pretrained(tmp_path / "hf")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(".layers.0.attention.q_proj." in k for k in state)  # really the 5.x names
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    model = load_classifier(tmp_path / "hf")
    assert model.label_names is None
    x = images(size)
    with torch.no_grad():
        assert max_diff(model(x), hf(pixel_values=x).logits) <= TOL


# name -> (create_classifier kwargs, norm settings applied after creation, image size)
BITRAIN_VARIANTS = {
    "beit_avg_per_layer_relpos": (
        {
            "model_name": "beit_base_patch16_224",
            "img_size": 32,
            "patch_size": 8,
            "embed_dim": 64,
            "depth": 2,
            "num_heads": 4,
            "mlp_ratio": 2.0,
            "use_abs_pos_emb": False,
            "use_rel_pos_bias": True,
            "init_values": 0.1,
            "global_pool": "avg",
        },
        {},
        32,
    ),
    "beit_token_shared_relpos_eps1e-12": (
        {
            "model_name": "beit_base_patch16_224",
            "img_size": 32,
            "patch_size": 8,
            "embed_dim": 64,
            "depth": 2,
            "num_heads": 4,
            "use_abs_pos_emb": True,
            "use_rel_pos_bias": False,
            "use_shared_rel_pos_bias": True,
            "init_values": 0.0,  # no layer scale (None would mean timm's default)
            "global_pool": "token",
        },
        {"layer_norm_eps": 1e-12},
        32,
    ),
    "vit_patch32": (
        {
            "model_name": "vit_base_patch32_224",
            "img_size": 64,
            "embed_dim": 64,
            "depth": 2,
            "num_heads": 4,
        },
        {},
        64,
    ),
    "bit": (
        {
            "model_name": "resnetv2_50x1_bit",
            "img_size": 64,
            "channels": [128, 128, 128, 128],
            "stem_chs": 32,
        },
        {},
        64,
    ),
}


@pytest.mark.parametrize("variant", list(BITRAIN_VARIANTS))
def test_bitrain_to_hf_logits(variant, tmp_path):
    kwargs, norm, size = BITRAIN_VARIANTS[variant]
    torch.manual_seed(0)
    model = create_classifier(num_classes=len(LABELS), **kwargs).eval()
    apply_norm_settings(model, **norm)
    _randomize(model, 3)
    save_classifier(model, tmp_path / "hf", "hf", label_names=LABELS)

    hf, info = transformers.AutoModelForImageClassification.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    hf.eval()
    x = images(size)
    with torch.no_grad():
        ref = model(x)
        assert max_diff(hf(pixel_values=x).logits, ref) <= TOL, variant
        # and back: the same model, labels included
        again = load_classifier(tmp_path / "hf")
        assert max_diff(again(x), ref) <= TOL
    assert [hf.config.id2label[i] for i in range(len(LABELS))] == LABELS
    assert again.label_names == LABELS
    assert again.bitrain_spec["model_name"] == kwargs["model_name"]


def test_headless_folder_needs_num_classes(tmp_path):
    config = transformers.ViTConfig(**HF_VARIANTS["vit_patch32"][1])
    torch.manual_seed(0)
    transformers.ViTModel(config).save_pretrained(tmp_path / "hf")
    state, spec, config = read_hf(tmp_path / "hf")
    assert spec["num_classes"] is None and label_names(config, None) is None
    assert not any(k.startswith("head.") for k in state)
    with pytest.raises(CheckpointError, match="head-less ViTModel, not a classifier: fine-tune"):
        load_classifier(tmp_path / "hf")
    # fine-tuning's way: the architecture named, the encoder from the folder, a fresh head
    model = build_classifier(**{**spec, "num_classes": 3}, pretrained=tmp_path / "hf")
    assert model.head.out_features == 3
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_checkpoints_folder_state_uses_classifier_import(tmp_path):
    from bitrain.checkpoints import load_encoder_state

    hf, _ = make_hf("vit_patch32")
    hf.save_pretrained(tmp_path / "hf")
    state, fmt = load_encoder_state(tmp_path / "hf")
    assert fmt == "hf" and "blocks.0.attn.qkv.weight" in state and "head.weight" in state


def _fake_folder(path, config):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, str(path / "model.safetensors"))
    return path


def test_other_architecture_is_refused(tmp_path):
    folder = _fake_folder(
        tmp_path / "convnext",
        {"architectures": ["ConvNextForImageClassification"], "model_type": "convnext"},
    )
    with pytest.raises(CheckpointError, match="ConvNextForImageClassification.*BeitForImage"):
        read_hf(folder)
    with pytest.raises(CheckpointError, match="ViTForImageClassification"):
        load_classifier(folder)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"layer_type": "bottleneck"}, "layer_type='bottleneck'"),
        ({"global_padding": "SAME"}, "global_padding='SAME'"),
        ({"depths": [1, 1, 1, 1]}, r"depths=\[1, 1, 1, 1\]"),
    ],
)
def test_bit_config_timm_cannot_build_is_refused(tmp_path, overrides, match):
    config = {"architectures": ["BitForImageClassification"], "model_type": "bit", **overrides}
    with pytest.raises(CheckpointError, match=match):
        read_hf(_fake_folder(tmp_path / "bit", config))


def test_label_names_must_fit(tmp_path):
    model = create_classifier(**BITRAIN_VARIANTS["vit_patch32"][0], num_classes=2)
    with pytest.raises(ValueError, match="3 label_names for a 2-class model"):
        save_classifier(model, tmp_path / "hf", "hf", label_names=["a", "b", "c"])


@pytest.mark.parametrize(
    "architecture", ["BeitForImageClassification", "ViTForImageClassification", "BitModel"]
)
def test_a_non_square_image_size_is_refused_by_name(architecture):
    from bitrain.checkpoints.hf import from_hf as from_hf_classifier
    from bitrain.io import CheckpointError

    config = {"architectures": [architecture], "image_size": [224, 192]}
    with pytest.raises(CheckpointError, match=r"Hugging Face config: image_size=\[224, 192\]"):
        from_hf_classifier({}, config)


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_the_rules_read_backwards_give_transformers_state_back(variant):
    """HF 5.x state -> from_hf -> timm -> to_hf(spelling="5.x") is the identity, and loads."""
    from bitrain.checkpoints.hf import from_hf, to_hf

    hf, size = make_hf(variant)
    hf_state = {k: v for k, v in hf.state_dict().items() if "relative_position_index" not in k}
    state, spec = from_hf(hf_state, {**hf.config.to_dict(), "architectures": [type(hf).__name__]})
    model = create_classifier(**spec).eval()
    model.load_state_dict(state, strict=True)
    back, config = to_hf(model, LABELS, spelling="5.x")
    assert sorted(back) == sorted(hf_state)
    for key, value in hf_state.items():
        assert torch.equal(back[key], value), key
    rebuilt = getattr(transformers, config["architectures"][0])(
        transformers.AutoConfig.for_model(**config)
    ).eval()
    rebuilt.load_state_dict(back, strict=True)  # transformers 5's in-memory names
    x = images(size)
    with torch.no_grad():
        assert max_diff(rebuilt(pixel_values=x).logits, hf(pixel_values=x).logits) <= TOL
    assert rebuilt.config.id2label == dict(enumerate(LABELS))
