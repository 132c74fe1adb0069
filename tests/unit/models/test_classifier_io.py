"""Classifier checkpoints: every format loads, exports and converts to the same logits.

Tiny random-weight BEiT / ViT / BiT classifiers; every file is written in ``tmp_path``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bitrain.checkpoints import CLASSIFIER_FORMATS, load_classifier, save_classifier, save_mim_model
from bitrain.checkpoints.official import to_official as to_official_beit
from bitrain.data.preprocessing import from_timm_args, read_record
from bitrain.io import CheckpointError
from bitrain.models.classifier import CLASSIFIER_TARGET, apply_norm_settings, create_classifier

ROOT = Path(__file__).resolve().parents[3]
TOL = 1e-5
LABELS = ["ant", "bee", "cat", "dog", "eel", "fox"]
BEIT = "beit_base_patch16_224"
# The fine-tuning config's evaluation transform (configs/data/cls/*.yaml val_transform).
EVAL_NODE = {
    "_target_": "timm.data.create_transform",
    "_convert_": "all",
    "input_size": 32,
    "is_training": False,
    "crop_pct": 0.875,
    "interpolation": "bicubic",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
# What that node means, as the data record a checkpoint keeps.
EVAL_SPEC = read_record(EVAL_NODE, "test")


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random offsets on every parameter (tables, gammas, norms): a wrong map shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture
def beit(beit_spec):
    """Factory: ``beit(seed=0, num_classes=6, **overrides)``, a tiny perturbed BEiT classifier."""

    def make(seed: int = 0, num_classes: int = len(LABELS), **overrides) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = create_classifier(BEIT, num_classes, **{**beit_spec, **overrides})
        return _perturb(model, seed)

    return make


def vit() -> torch.nn.Module:
    torch.manual_seed(1)
    spec = dict(img_size=64, patch_size=32, embed_dim=64, depth=2, num_heads=4)
    return _perturb(create_classifier("vit_base_patch32_224", len(LABELS), **spec), 1)


def bit() -> torch.nn.Module:
    torch.manual_seed(2)
    spec = dict(img_size=64, channels=[128, 128, 128, 256], stem_chs=32)
    model = create_classifier("resnetv2_50x1_bit", len(LABELS), **spec)
    apply_norm_settings(model, group_norm_groups=8)  # HF's num_groups, not timm's 32
    return _perturb(model, 2)


def batch(model: torch.nn.Module) -> torch.Tensor:
    size = model.bitrain_spec["img_size"]
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))


def max_diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        out_a, out_b = a.eval()(x), b.eval()(x)
    assert out_a.shape == out_b.shape
    return float((out_a - out_b).abs().max())


def dst(tmp_path: Path, fmt: str, stem: str = "cls") -> Path:
    return tmp_path / (f"{stem}_{fmt}" if fmt in ("timm", "hf") else f"{stem}.{fmt}.pth")


def finetune_ckpt(model: torch.nn.Module, path: Path, ema: torch.nn.Module | None = None) -> Path:
    """A ``.ckpt`` laid out as ``bitrain.finetune`` writes it (Lightning + ImageClassification)."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        state.update({f"ema.module.{k}": v for k, v in ema.state_dict().items()})
    obj = {
        "epoch": 3,
        "global_step": 120,
        "state_dict": state,
        "hyper_parameters": {
            "model": {"_target_": CLASSIFIER_TARGET, **model.bitrain_spec, "pretrained": None},
            "optim": {"lr": 1e-3},
            "label_smoothing": 0.1,
            "eval_transform": EVAL_NODE,
        },
        "optimizer_states": [],
        "lr_schedulers": [],
        "label_names": LABELS,
        "nonfinite_steps": 0,
    }
    torch.save(obj, path)
    return path


# --- every format, both ways ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", CLASSIFIER_FORMATS)
def test_beit_round_trip_every_format(tmp_path, fmt, beit):
    source = beit()
    source.label_names = LABELS
    out = save_classifier(source, dst(tmp_path, fmt), fmt, eval_transform=EVAL_SPEC)
    back = load_classifier(out)
    assert not back.training and back.bitrain_source_format == fmt
    assert max_diff(source, back, batch(source)) <= TOL
    assert back.label_names == LABELS
    got = back.bitrain_eval_transform
    assert got.resize == EVAL_SPEC.resize and got.crop == EVAL_SPEC.crop
    assert got.interpolation == EVAL_SPEC.interpolation
    assert got.mean == pytest.approx(EVAL_SPEC.mean) and got.std == pytest.approx(EVAL_SPEC.std)
    if fmt != "hf":  # hf keeps the preprocessing as preprocessor_config.json instead
        assert got == EVAL_SPEC
        # the spec states the norm settings too, so it rebuilds the model exactly
        assert back.bitrain_spec == source.bitrain_spec  # the arguments that rebuild it


@pytest.mark.parametrize("fmt", ["bitrain", "timm", "hf"])
@pytest.mark.parametrize("make", [vit, bit], ids=["vit", "bit"])
def test_vit_and_bit_round_trip(tmp_path, make, fmt):
    source = make()
    out = save_classifier(source, dst(tmp_path, fmt), fmt, label_names=LABELS)
    back = load_classifier(out)
    assert max_diff(source, back, batch(source)) <= TOL
    assert back.label_names == LABELS
    if make is bit:  # the group count (not a timm argument) travels with the export
        assert {m.num_groups for m in back.modules() if isinstance(m, torch.nn.GroupNorm)} == {8}


def test_hf_norm_eps_survives_every_export(tmp_path, beit):
    """HF's default LayerNorm eps (1e-12) is no timm argument: exports record it."""
    source = apply_norm_settings(beit(), layer_norm_eps=1e-12)
    hf = load_classifier(save_classifier(source, tmp_path / "hf", "hf"))
    x = batch(source)
    assert max_diff(source, hf, x) <= TOL
    for fmt in ("bitrain", "timm", "official"):
        back = load_classifier(save_classifier(hf, dst(tmp_path, fmt), fmt))
        eps = {m.eps for m in back.modules() if isinstance(m, torch.nn.LayerNorm)}
        assert eps == {1e-12}, fmt
        assert max_diff(source, back, x) <= TOL, fmt


@pytest.mark.parametrize("fmt", ["bitrain", "timm", "official"])
def test_norm_settings_of_older_files_are_still_read(tmp_path, fmt, beit):
    """Files written before the norm settings joined the spec kept them in a record of their own."""
    source = apply_norm_settings(beit(), layer_norm_eps=1e-12)
    path = save_classifier(source, dst(tmp_path, fmt), fmt)
    if fmt == "timm":
        config = json.loads((path / "config.json").read_text())
        config["bitrain_norm_settings"] = {
            "layer_norm_eps": config["bitrain_spec"].pop("layer_norm_eps")
        }
        (path / "config.json").write_text(json.dumps(config))
    else:
        obj = torch.load(path, weights_only=False)
        if fmt == "bitrain":
            eps = obj["hyper_parameters"]["model"].pop("layer_norm_eps")
            obj["norm_settings"] = {"layer_norm_eps": eps}
        else:
            eps = obj["args"].bitrain_spec.pop("layer_norm_eps")
            obj["args"].bitrain_norm_settings = {"layer_norm_eps": eps}
        torch.save(obj, path)
    back = load_classifier(path)
    assert {m.eps for m in back.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-12}
    assert max_diff(source, back, batch(source)) <= TOL


def test_finetune_ckpt_and_its_ema(tmp_path, beit):
    model, ema = beit(0), beit(1)
    path = finetune_ckpt(model, tmp_path / "last.ckpt", ema=ema)
    x = batch(model)
    assert max_diff(model, load_classifier(path), x) == 0.0
    assert max_diff(ema, load_classifier(path, use_ema=True), x) == 0.0
    # an older bitrain's Hydra node of timm's create_transform is read as data
    assert load_classifier(path).bitrain_eval_transform == EVAL_SPEC


def test_timm_loads_our_timm_folder(tmp_path, beit):
    timm = pytest.importorskip("timm")
    source = beit()
    folder = save_classifier(source, tmp_path / "timm", "timm", label_names=LABELS)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == BEIT and config["num_classes"] == len(LABELS)
    assert config["label_names"] == LABELS and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert max_diff(source, theirs, batch(source)) <= TOL


def test_bare_state_dict_needs_model_name(tmp_path, beit, beit_spec):
    source = beit()
    torch.save(source.state_dict(), tmp_path / "bare.pth")
    save_file(source.state_dict(), str(tmp_path / "bare.safetensors"))
    for name in ("bare.pth", "bare.safetensors"):
        with pytest.raises(CheckpointError, match="bare state dict.*pass model_name"):
            load_classifier(tmp_path / name)
        back = load_classifier(tmp_path / name, model_name=BEIT, **beit_spec)  # classes: head
        assert back.bitrain_source_format == "timm"
        assert max_diff(source, back, batch(source)) <= TOL
    with pytest.raises(ValueError, match="without model_name"):
        load_classifier(tmp_path / "bare.pth", img_size=32)


# --- official unilm fine-tuned .pth --------------------------------------------------------------


def unilm_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of unilm's modeling_finetune.py Beit: timm's keys + index buffers."""
    return to_official_beit(model.state_dict())


OFFICIAL_VARIANTS = {
    "mean_pool_per_layer_relpos": {},
    "cls_pool_abs_pos_no_layerscale": dict(
        embed_dim=128,
        num_heads=2,  # no table: heads = embed_dim // 64
        use_rel_pos_bias=False,
        use_abs_pos_emb=True,
        init_values=0.0,
        global_pool="token",
    ),
    "shared_relpos_img48": dict(
        img_size=48, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=0.2
    ),
}


@pytest.mark.parametrize("variant", list(OFFICIAL_VARIANTS))
def test_official_without_args_inferred_from_shapes(tmp_path, variant, beit):
    source = beit(**OFFICIAL_VARIANTS[variant])
    state = unilm_state(source)
    assert any(k.endswith("relative_position_index") for k in state) or variant.startswith("cls")
    torch.save({"model": state}, tmp_path / "ft.pth")
    back = load_classifier(tmp_path / "ft.pth")
    assert back.bitrain_source_format == "official" and back.label_names is None
    assert max_diff(source, back, batch(source)) <= TOL
    spec = back.bitrain_spec
    for key in ("img_size", "embed_dim", "num_heads", "global_pool", "use_abs_pos_emb"):
        assert spec[key] == source.bitrain_spec[key], key


def test_official_with_args_as_run_class_finetuning_saves(tmp_path, beit):
    source, ema = beit(0), beit(1)
    args = argparse.Namespace(
        model="beit_base_patch16_224",
        nb_classes=len(LABELS),
        input_size=32,
        drop_path=0.1,
        rel_pos_bias=True,
        disable_rel_pos_bias=False,
        abs_pos_emb=False,
        layer_scale_init_value=0.1,
        use_mean_pooling=True,
        init_scale=0.001,
        lr=4e-3,
        data_path="/datasets01/imagenet_full_size/061417/",
    )
    obj = {
        "model": unilm_state(source),
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 99,
        "scaler": {"scale": 65536.0},
        "args": args,
        "model_ema": unilm_state(ema),
    }
    torch.save(obj, tmp_path / "checkpoint-best.pth")
    back = load_classifier(tmp_path / "checkpoint-best.pth")
    x = batch(source)
    assert max_diff(source, back, x) <= TOL
    assert back.bitrain_spec["drop_path_rate"] == 0.1 and back.bitrain_spec["init_values"] == 0.1
    assert max_diff(ema, load_classifier(tmp_path / "checkpoint-best.pth", use_ema=True), x) <= TOL


def test_official_export_is_unilm_layout(tmp_path, beit):
    source = beit()
    path = save_classifier(source, tmp_path / "ft.pth", "official", label_names=LABELS)
    obj = torch.load(path, weights_only=False)
    assert isinstance(obj["args"], argparse.Namespace)
    args = obj["args"]
    assert (args.nb_classes, args.input_size, args.use_mean_pooling) == (len(LABELS), 32, True)
    assert args.rel_pos_bias and not args.abs_pos_emb and args.layer_scale_init_value == 0.1
    assert "blocks.0.attn.relative_position_index" in obj["model"]
    assert torch.equal(obj["model"]["head.weight"], source.head.weight)
    # Without our exact records, the shapes and the unilm fields alone give the same model.
    del args.bitrain_spec, args.bitrain_eval_transform
    torch.save({"model": obj["model"], "args": args}, tmp_path / "plain.pth")
    assert max_diff(source, load_classifier(tmp_path / "plain.pth"), batch(source)) <= TOL


@pytest.mark.parametrize("fmt", CLASSIFIER_FORMATS)
def test_timm_metadata_of_a_loaded_classifier_preprocesses_as_the_checkpoint(tmp_path, fmt, beit):
    import timm.data

    source = beit()
    source.label_names = LABELS
    model = load_classifier(
        save_classifier(source, dst(tmp_path, fmt), fmt, eval_transform=EVAL_SPEC)
    )
    assert model.pretrained_cfg["label_names"] == LABELS
    if fmt == "hf":  # transformers floors the crop offset, which timm's fields cannot say
        assert model.bitrain_eval_transform.to_timm_cfg() is None
        return
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    for i, (w, h) in enumerate([(50, 40), (33, 61)]):
        img = noise_image(w, h, i)
        assert torch.allclose(transform(img), EVAL_SPEC.build()(img), atol=1e-6)


def test_a_cnn_keeps_its_resolution_in_timms_metadata():
    model = bit()
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    assert not hasattr(model, "img_size")


def test_official_export_says_its_preprocessing_in_unilm_fields(tmp_path, beit):
    spec = from_timm_args({"input_size": 64, "crop_pct": 0.875, "interpolation": "bicubic"})
    path = save_classifier(beit(img_size=64), tmp_path / "ft.pth", "official", eval_transform=spec)
    obj = torch.load(path, weights_only=False)
    args = obj["args"]
    assert args.imagenet_default_mean_and_std is True and int(64 / args.crop_pct) == 73
    del args.bitrain_eval_transform  # unilm's own fields alone say the same
    torch.save(obj, tmp_path / "plain.pth")
    assert load_classifier(tmp_path / "plain.pth").bitrain_eval_transform == spec


# --- errors --------------------------------------------------------------------------------------


def test_pretraining_checkpoints_say_fine_tune_first(tmp_path):
    from bitrain.models.beit import BeitMIM

    mim = BeitMIM(img_size=32, patch_size=8, vocab_size=64, embed_dim=48, depth=1, num_heads=3)
    paths = [
        save_mim_model(mim, tmp_path / "mim.ckpt", "bitrain"),
        save_mim_model(mim, tmp_path / "mim.pth", "official"),
        save_mim_model(mim, tmp_path / "mim_hf", "hf"),
    ]
    torch.save(mim.state_dict(), tmp_path / "mim_bare.pth")
    paths.append(tmp_path / "mim_bare.pth")
    for path in paths:
        with pytest.raises(CheckpointError, match="pretraining.*fine-tune it first"):
            load_classifier(path)


def test_unknown_and_unsupported_inputs(tmp_path, beit):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_classifier(tmp_path / "missing.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without config.json"):
        load_classifier(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "resnet"}')
    with pytest.raises(CheckpointError, match=r"names architectures \(none\)"):
        load_classifier(tmp_path / "other")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(CheckpointError, match="BertModel"):
        load_classifier(tmp_path / "bert")
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        load_classifier(tmp_path / "junk.pth")
    source = beit()
    ckpt = finetune_ckpt(source, tmp_path / "ft.ckpt")
    with pytest.raises(ValueError, match="names its own architecture"):
        load_classifier(ckpt, model_name=BEIT)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_classifier(ckpt, use_ema=True)
    folder = save_classifier(source, tmp_path / "hf", "hf")
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_classifier(folder, use_ema=True)
    with pytest.raises(CheckpointError, match="official unilm layout holds BEiT"):
        save_classifier(vit(), tmp_path / "vit.pth", "official")
    with pytest.raises(ValueError, match="unknown classifier format"):
        save_classifier(source, tmp_path / "x", "onnx")
    with pytest.raises(ValueError, match="2 label_names for a 6-class"):
        save_classifier(source, tmp_path / "x.ckpt", "bitrain", label_names=["a", "b"])


def test_headless_hf_folder_is_not_a_classifier(tmp_path, beit):
    folder = save_classifier(beit(), tmp_path / "hf", "hf")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BeitModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="head-less BeitModel.*fine-tune it first"):
        load_classifier(folder)


# --- preprocessing: eval transform <-> preprocessor_config.json ----------------------------------


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_hf_image_processor_reads_our_preprocessor_config(tmp_path, beit):
    transformers = pytest.importorskip("transformers")
    folder = save_classifier(beit(), tmp_path / "hf", "hf", eval_transform=EVAL_SPEC)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    assert config["size"] == {"shortest_edge": 36} and config["crop_size"]["height"] == 32
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    import timm.data

    theirs_timm = timm.data.create_transform(**{k: v for k, v in EVAL_NODE.items() if k[0] != "_"})
    img = noise_image(50, 40, 0)
    theirs = processor(img, return_tensors="pt")["pixel_values"][0]
    assert float((EVAL_SPEC.build()(img) - theirs).abs().max()) <= 1e-5
    assert torch.equal(EVAL_SPEC.build()(img), theirs_timm(img))


# --- scripts/convert_checkpoint.py ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    script = ROOT / "scripts" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cls", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_bitrain_hf_bitrain(tmp_path, cli, beit):
    source = beit()
    ckpt = finetune_ckpt(source, tmp_path / "last.ckpt")
    assert cli.main(["--src", str(ckpt), "--dst", str(tmp_path / "hf"), "--dst-format", "hf"]) == 0
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
    argv = ["--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "back.ckpt")]
    assert cli.main([*argv, "--dst-format", "bitrain", "--src-format", "hf"]) == 0
    back = load_classifier(tmp_path / "back.ckpt")
    assert max_diff(source, back, batch(source)) <= TOL and back.label_names == LABELS
    assert cli.main([*argv, "--dst-format", "bitrain", "--src-format", "timm"]) == 2


@pytest.mark.parametrize("fmt", ["timm", "official"])
def test_convert_bitrain_to(tmp_path, cli, fmt, beit):
    source = beit()
    ckpt = finetune_ckpt(source, tmp_path / "last.ckpt")
    out = dst(tmp_path, fmt)
    assert cli.main(["--src", str(ckpt), "--dst", str(out), "--dst-format", fmt]) == 0
    back = load_classifier(out)
    assert max_diff(source, back, batch(source)) <= TOL and back.label_names == LABELS


def test_convert_bare_state_dict_and_errors(tmp_path, cli, beit, beit_spec):
    source = beit()
    torch.save(source.state_dict(), tmp_path / "bare.pth")
    base = ["--src", str(tmp_path / "bare.pth"), "--dst", str(tmp_path / "t"), "--dst-format"]
    assert cli.main([*base, "timm"]) == 2  # no --model-name
    kwargs = json.dumps(beit_spec)
    assert cli.main([*base, "timm", "--model-name", BEIT, "--model-kwargs", kwargs]) == 0
    assert max_diff(source, load_classifier(tmp_path / "t"), batch(source)) <= TOL
    from bitrain.models.beit import BeitMIM

    mim = BeitMIM(img_size=32, patch_size=8, vocab_size=64, embed_dim=48, depth=1, num_heads=3)
    mim_path = save_mim_model(mim, tmp_path / "mim.ckpt")
    argv = ["--src", str(mim_path), "--dst", str(tmp_path / "m"), "--dst-format", "timm"]
    assert cli.main(argv) == 2  # timm is a classifier layout
    assert cli.main([*argv[:-1], "official"]) == 0  # MIM sources keep their path


# --- predict parity ------------------------------------------------------------------------------


def write_images(folder: Path) -> Path:
    folder.mkdir()
    for i, (w, h) in enumerate([(50, 40), (40, 64), (32, 32)]):
        noise_image(w, h, i).save(folder / f"img{i}.png")
    return folder


def assert_same_top5(a: list[dict], b: list[dict]) -> float:
    worst = 0.0
    assert [r["image"] for r in a] == [r["image"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert [t["label"] for t in ra["top"]] == [t["label"] for t in rb["top"]]
        for ta, tb in zip(ra["top"], rb["top"], strict=True):
            worst = max(worst, abs(ta["prob"] - tb["prob"]))
    assert worst <= 1e-4
    return worst


@pytest.mark.parametrize("fmt", ["hf", "timm"])
def test_predict_parity_after_export(tmp_path, cli, fmt, beit):
    from bitrain.evaluation.prediction import predict

    ckpt = finetune_ckpt(beit(), tmp_path / "last.ckpt")
    out = dst(tmp_path, fmt)
    assert cli.main(["--src", str(ckpt), "--dst", str(out), "--dst-format", fmt]) == 0
    images = write_images(tmp_path / "images")
    ref = predict(ckpt, images, top_k=5, device="cpu")
    got = predict(out, images, top_k=5, device="cpu")
    assert ref[0]["top"][0]["label"] in LABELS
    assert_same_top5(ref, got)


@pytest.mark.slow
def test_predict_cli_on_hf_folder_matches_ckpt(tmp_path, cli, beit):
    """``python -m bitrain.predict`` on an exported HF folder: the .ckpt's top-5 (in-process)."""
    from bitrain.evaluation.prediction import predict

    ckpt = finetune_ckpt(beit(), tmp_path / "last.ckpt")
    assert cli.main(["--src", str(ckpt), "--dst", str(tmp_path / "hf"), "--dst-format", "hf"]) == 0
    images = write_images(tmp_path / "images")
    env = {**os.environ, "BITRAIN_ROOT": str(tmp_path)}
    out = tmp_path / "hf.json"
    cmd = [
        sys.executable,
        "-m",
        "bitrain.predict",
        f"ckpt_path={tmp_path / 'hf'}",
        f"images={images}",
    ]
    proc = subprocess.run(
        [*cmd, "device=cpu", f"output={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "img0.png: " in proc.stdout
    reference = json.loads(json.dumps(predict(ckpt, images, top_k=5, device="cpu"), default=str))
    assert_same_top5(reference, json.loads(out.read_text()))


def test_timm_folder_does_not_claim_timms_published_weights(tmp_path, beit):
    """timm's save_config_for_hf copies the name's default ``tag`` / ``license``; not ours."""
    save_classifier(beit(), tmp_path / "timm", "timm", label_names=LABELS)
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())["pretrained_cfg"]
    assert "tag" not in cfg and "license" not in cfg
    assert cfg["num_classes"] == len(LABELS) and cfg["custom_load"] is False
