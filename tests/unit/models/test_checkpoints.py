"""Checkpoint interop: HF parity, lossless round trips, official .pth, safety, format errors."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from bitrain.checkpoints import load_mim_model, save_mim_model
from bitrain.checkpoints.hf import from_hf, to_hf
from bitrain.checkpoints.official import from_official as from_official_beit
from bitrain.checkpoints.official import to_official as to_official_beit
from bitrain.io import CheckpointError

transformers = pytest.importorskip("transformers")

HF_TINY = {
    "vocab_size": 48,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "image_size": 32,
    "patch_size": 8,
    "use_mask_token": True,
    "drop_path_rate": 0.0,
}
HF_VARIANTS = {
    "shared_relpos_layerscale": {
        "use_shared_relative_position_bias": True,
        "layer_scale_init_value": 0.1,
        "layer_norm_eps": 1e-6,
    },
    "per_layer_relpos_abspos_no_layerscale": {
        "use_relative_position_bias": True,
        "use_absolute_position_embeddings": True,
        "layer_scale_init_value": 0.0,
    },  # and HF's default layer_norm_eps 1e-12
}


def make_hf(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BeitConfig(**HF_TINY, **HF_VARIANTS[variant])
    model = transformers.BeitForMaskedImageModeling(config).eval()
    with torch.no_grad():  # non-zero lambdas, biases, tables, tokens
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_masked_logits(hf, images, mask):
    with torch.no_grad():
        logits = hf(pixel_values=images, bool_masked_pos=mask).logits  # [B, N, V]
    return logits[mask].view(mask.shape[0], -1, logits.shape[-1])


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_hf_parity(variant, tmp_path, images, make_mask):
    hf = make_hf(variant)
    hf.save_pretrained(tmp_path / "hf")
    model = load_mim_model(tmp_path / "hf").eval()
    assert model.norm.eps == hf.config.layer_norm_eps
    mask = make_mask(2, 16, 6)
    with torch.no_grad():
        ours = model(images, mask)
    assert (ours - hf_masked_logits(hf, images, mask)).abs().max() <= 1e-4


def test_hf_in_memory_spelling_loads(images, make_mask):
    """The transformers 5.x spelling (hf.state_dict()) and the 4.x one (save_pretrained) agree."""
    hf = make_hf("shared_relpos_layerscale")
    new_keys = hf.state_dict()
    assert any(".q_proj." in k for k in new_keys)
    config = {**hf.config.to_dict(), "architectures": ["BeitForMaskedImageModeling"]}
    state, kwargs = from_hf(new_keys, config)
    from bitrain.models.beit import BeitMIM

    model = BeitMIM(**kwargs).eval()
    model.load_state_dict(state, strict=True)
    mask = make_mask(2, 16, 5)
    with torch.no_grad():
        assert (model(images, mask) - hf_masked_logits(hf, images, mask)).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_hf_mim_rules_read_backwards_give_transformers_state_back(variant):
    """HF 5.x state -> from_hf -> BeitMIM -> to_hf(spelling="5.x") is the identity."""
    from bitrain.models.beit import BeitMIM

    hf = make_hf(variant)
    hf_state = {k: v for k, v in hf.state_dict().items() if "relative_position_index" not in k}
    config = {**hf.config.to_dict(), "architectures": ["BeitForMaskedImageModeling"]}
    state, kwargs = from_hf(hf_state, config)
    model = BeitMIM(**kwargs)
    model.load_state_dict(state, strict=True)
    back, _ = to_hf(model, spelling="5.x")
    assert sorted(back) == sorted(hf_state)
    for key, value in hf_state.items():
        assert torch.equal(back[key], value), key


def test_to_hf_refuses_other_models_and_spellings(make_tiny):
    with pytest.raises(CheckpointError, match="a Linear has no Hugging Face counterpart"):
        to_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="spelling must be '4.x' or '5.x'"):
        to_hf(make_tiny(), spelling="6.x")
    state, _ = to_hf(make_tiny(qkv_bias=False), spelling="5.x")  # HF's BEiT always has q/v biases
    assert not state["beit.layers.0.attention.q_proj.bias"].any()
    assert "beit.layers.0.attention.k_proj.bias" not in state


def test_hf_legacy_spelling_with_index_buffers_loads(tmp_path, make_tiny):
    """A 4.x-era state dict (attention.attention.query, relative_position_index) loads."""
    model = make_tiny()
    state, config = to_hf(model, spelling="4.x")
    assert "beit.encoder.layer.0.attention.attention.query.weight" in state
    state["beit.encoder.relative_position_bias.relative_position_index"] = torch.zeros(17, 17)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_same_state(load_mim_model(tmp_path), model)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "init_values": 0,
            "use_rel_pos_bias": True,
            "use_shared_rel_pos_bias": False,
            "use_abs_pos_emb": True,
        },
    ],
)
def test_written_hf_folder_loads_in_transformers(overrides, tmp_path, make_tiny, images, make_mask):
    model = make_tiny(**overrides)
    save_mim_model(model, tmp_path / "hf", "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    hf, info = transformers.BeitForMaskedImageModeling.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    mask = make_mask(2, 16, 7)
    with torch.no_grad():
        ours = model(images, mask)
    assert (ours - hf_masked_logits(hf.eval(), images, mask)).abs().max() <= 1e-4
    assert_same_state(load_mim_model(tmp_path / "hf"), model)  # bitrain -> hf -> bitrain


@pytest.mark.parametrize("fmt", ["bitrain", "official"])
def test_round_trip_is_lossless(fmt, tmp_path, make_tiny):
    model = make_tiny(init_values=1e-5, drop_path_rate=0.2, layer_norm_eps=1e-5)
    path = save_mim_model(model, tmp_path / "m.pt", fmt)
    back = load_mim_model(path)
    assert_same_state(back, model)
    assert back.model_kwargs == model.model_kwargs
    assert back.bitrain_source_format == fmt  # what convert() checks --src-format against


def test_official_key_helpers(make_tiny):
    state = make_tiny().state_dict()
    official = to_official_beit(state)
    assert official["rel_pos_bias.relative_position_index"].shape == (17, 17)
    wrapped = {f"module.{k}": v for k, v in official.items()}  # saved from a DDP model
    assert from_official_beit(wrapped).keys() == state.keys()


def official_checkpoint(model, with_namespace=True):
    """The dict unilm's utils.save_model writes, without bitrain's extra args field."""
    args = argparse.Namespace(
        model="beit_custom_patch8_32",
        input_size=32,
        second_input_size=16,
        drop_path=0.0,
        layer_scale_init_value=0.1,
        rel_pos_bias=True,
        abs_pos_emb=False,
        window_size=(4, 4),
        patch_size=(8, 8),
        opt_betas=[0.9, 0.999],
        lr=1.5e-3,
    )
    sd = to_official_beit(model.state_dict())
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}}, "param_groups": []}
    out = {"model": sd, "optimizer": opt, "epoch": 7, "scaler": {"scale": 65536.0}}
    if with_namespace:
        out["args"] = args
    return out


def test_official_pth_with_namespace_loads_weights_only(tmp_path, make_tiny, images, make_mask):
    model = make_tiny()
    torch.save(official_checkpoint(model), tmp_path / "checkpoint-799.pth")
    back = load_mim_model(tmp_path / "checkpoint-799.pth")
    assert_same_state(back, model)
    kw = back.model_kwargs
    assert (kw["embed_dim"], kw["depth"], kw["num_heads"], kw["vocab_size"]) == (64, 2, 4, 48)
    assert (kw["img_size"], kw["patch_size"], kw["layer_norm_eps"]) == (32, 8, 1e-6)
    assert kw["use_shared_rel_pos_bias"] and not kw["use_abs_pos_emb"]
    mask = make_mask(2, 16, 4)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(images, mask), model(images, mask))


def test_bare_official_state_dict_loads_from_shapes(tmp_path, make_tiny):
    model = make_tiny(use_abs_pos_emb=True, use_shared_rel_pos_bias=False, init_values=None)
    torch.save(to_official_beit(model.state_dict()), tmp_path / "bare.pth")
    back = load_mim_model(tmp_path / "bare.pth")
    assert_same_state(back, model)
    assert back.model_kwargs["init_values"] is None and back.model_kwargs["use_abs_pos_emb"]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused(tmp_path, make_tiny):
    marker = tmp_path / "pwned"
    ckpt = official_checkpoint(make_tiny())
    ckpt["args"] = _Evil(marker)
    torch.save(ckpt, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        load_mim_model(tmp_path / "evil.pth")
    assert not marker.exists()


def test_lightning_ckpt_layout_loads(tmp_path, make_tiny):
    model = make_tiny()
    ckpt = {
        "epoch": 0,
        "global_step": 10,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {
            "model": {"_target_": "bitrain.models.beit.BeitMIM", **model.model_kwargs},
            "tokenizer": {"_target_": "x.Tok", "vocab_size": 48},
            "optim": {"lr": 1e-3},
            "compile": False,
        },
        "optimizer_states": [{"state": {}, "param_groups": []}],
        "lr_schedulers": [{}],
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 0}}}},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert_same_state(load_mim_model(tmp_path / "last.ckpt"), model)


def test_missing_path_and_wrong_models(tmp_path, make_tiny):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_mim_model(tmp_path / "nope.pth")
    torch.save({"foo": torch.zeros(1), "bar": 3}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="foo"):
        load_mim_model(tmp_path / "odd.pt")
    classifier = {"model": {"cls_token": torch.zeros(1, 1, 8), "head.weight": torch.zeros(10, 8)}}
    torch.save(classifier, tmp_path / "cls.pth")
    with pytest.raises(CheckpointError, match="not a BEiT masked-image-modeling.*head.weight"):
        load_mim_model(tmp_path / "cls.pth")
    ckpt = {"state_dict": {}, "hyper_parameters": {"model": {"_target_": "timm.models.Beit"}}}
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="timm.models.Beit"):
        load_mim_model(tmp_path / "other.ckpt")
    model = make_tiny()
    save_mim_model(model, tmp_path / "hf", "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "use_mask_token": False}))
    with pytest.raises(CheckpointError, match="use_mask_token"):
        load_mim_model(tmp_path / "hf")


def test_hf_second_final_norm_is_refused(tmp_path):
    config = transformers.BeitConfig(**HF_TINY, use_mean_pooling=False)
    transformers.BeitForMaskedImageModeling(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="two final norms"):
        load_mim_model(tmp_path)


def test_convert_checkpoint_cli_round_trip(tmp_path, make_tiny):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[3] / "scripts" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    model = make_tiny()
    save_mim_model(model, tmp_path / "a.ckpt", "bitrain")
    steps = [
        ("a.ckpt", "bitrain", "b.pth", "official"),
        ("b.pth", None, "c_hf", "hf"),
        ("c_hf", "hf", "d.ckpt", "bitrain"),
    ]
    for src, src_fmt, dst, dst_fmt in steps:
        argv = ["--src", str(tmp_path / src), "--dst", str(tmp_path / dst), "--dst-format", dst_fmt]
        if src_fmt:
            argv += ["--src-format", src_fmt]
        assert cli.main(argv) == 0
    assert load_mim_model(tmp_path / "b.pth").bitrain_source_format == "official"
    assert_same_state(load_mim_model(tmp_path / "d.ckpt"), model)
    wrong = [
        "--src",
        str(tmp_path / "b.pth"),
        "--src-format",
        "hf",
        "--dst",
        str(tmp_path / "e"),
        "--dst-format",
        "hf",
    ]
    assert cli.main(wrong) == 2
