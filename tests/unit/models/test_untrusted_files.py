"""Files from strangers: no content of a checkpoint picks code to run, and no command destroys work.

Each planted record below would, on bitrain before the preprocessing became data, have been given
to ``hydra.utils.instantiate`` by ``predict``, ``evaluate`` or ``convert_checkpoint.py`` and copied
a file; now each is refused with a clear message and nothing is written.
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
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

from bitrain.checkpoints import load_classifier, load_pretrained, save_classifier
from bitrain.data.preprocessing import from_timm_args
from bitrain.evaluation.prediction import check_output, predict
from bitrain.evaluation.validation import evaluate
from bitrain.io import CheckpointError
from bitrain.models.classifier import create_classifier

ROOT = Path(__file__).resolve().parents[3]
SPEC = from_timm_args({"input_size": 32, "crop_pct": 0.875, "interpolation": "bicubic"})


@pytest.fixture(scope="module")
def cli():
    script = ROOT / "scripts" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint_untrusted", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def classifier(beit_spec):
    torch.manual_seed(0)
    model = create_classifier("beit_base_patch16_224", 3, **beit_spec).eval()
    model.label_names = ["a", "b", "c"]
    return model


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, size in enumerate([(40, 30), (30, 50)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(folder / f"{i}.png")
    return folder


def _planted(tmp_path: Path) -> tuple[dict, Path, Path]:
    """A record that copies ``secret`` to ``stolen`` when instantiated; both paths."""
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    stolen = tmp_path / "stolen.txt"
    return {"_target_": "shutil.copyfile", "src": str(secret), "dst": str(stolen)}, secret, stolen


def _plant(kind: str, model: torch.nn.Module, tmp_path: Path, record: dict) -> Path:
    """A checkpoint of ``kind`` whose evaluation-preprocessing record is ``record``."""
    if kind == "bitrain":
        path = save_classifier(model, tmp_path / "cls.ckpt", "bitrain", eval_transform=SPEC)
        obj = torch.load(path, weights_only=True)
        obj["hyper_parameters"]["eval_transform"] = record
        torch.save(obj, path)
    elif kind == "timm":
        path = save_classifier(model, tmp_path / "timm_folder", "timm", eval_transform=SPEC)
        config = json.loads((path / "config.json").read_text())
        config["bitrain_eval_transform"] = record
        (path / "config.json").write_text(json.dumps(config))
    else:
        path = save_classifier(model, tmp_path / "cls.pth", "official", eval_transform=SPEC)
        obj = torch.load(path, weights_only=False)  # the test's own file
        obj["args"].bitrain_eval_transform = record
        torch.save(obj, path)
    return path


@pytest.mark.parametrize("kind", ["bitrain", "timm", "official"])
def test_planted_records_run_nothing_in_predict_evaluate_or_convert(
    kind, classifier, tmp_path, photos, cli
):
    record, _, stolen = _planted(tmp_path)
    path = _plant(kind, classifier, tmp_path, record)

    with pytest.raises(CheckpointError, match="names code to run"):
        predict(path, photos)
    cfg = OmegaConf.create(
        {"ckpt_path": str(path), "paths": {"output_dir": str(tmp_path / "eval")}, "data": {}}
    )
    with pytest.raises(CheckpointError, match="shutil.copyfile"):
        evaluate(cfg)
    dst = tmp_path / "converted"
    assert cli.main(["--src", str(path), "--dst", str(dst), "--dst-format", "hf"]) == 2
    assert not stolen.exists()
    assert not dst.exists()
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_hf_processor_config_is_read_as_data(classifier, tmp_path, photos):
    record, _, stolen = _planted(tmp_path)
    folder = save_classifier(classifier, tmp_path / "hf", "hf", eval_transform=SPEC)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, **record}))
    results = predict(folder, photos)  # the planted keys mean nothing to an image processor
    assert all("top" in r for r in results)
    assert not stolen.exists()


def test_hf_config_json_with_targets_runs_nothing(classifier, tmp_path, photos):
    record, _, stolen = _planted(tmp_path)
    folder = save_classifier(classifier, tmp_path / "hf", "hf", eval_transform=SPEC)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **record, "extra": record}))
    predict(folder, photos)
    assert not stolen.exists()


class _Evil:
    """Pickles as the call ``os.system(command)``: unpickling it would run the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A ``.ckpt`` whose unpickling would run ``touch MARKER``; ``(file, marker)``.

    The pickle names only ``os.system`` and its argument (``_Evil`` itself is not in the file).
    """
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    torch.save({"state_dict": _Evil(f"touch {marker}")}, evil)
    assert b"_Evil" not in evil.read_bytes() and b"system" in evil.read_bytes()
    return evil, marker


@pytest.mark.slow  # python -m bitrain.predict in a subprocess
def test_refused_pickle_prints_one_line_and_never_suggests_weights_only_false(tmp_path, photos):
    evil, marker = _evil_checkpoint(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "bitrain.predict", f"ckpt_path={evil}", f"images={photos}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert not marker.exists()
    err = proc.stderr.strip()
    assert "weights_only=False" not in err + proc.stdout
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("predict: refused to load checkpoint")


# --- convert_checkpoint.py never destroys its source or an earlier file -------------------------


def test_convert_refuses_its_own_source_and_an_existing_destination(classifier, tmp_path, cli):
    src = save_classifier(classifier, tmp_path / "cls.ckpt", "bitrain", eval_transform=SPEC)
    before = src.read_bytes()
    assert cli.main(["--src", str(src), "--dst", str(src), "--dst-format", "official"]) == 2
    assert src.read_bytes() == before
    hf = save_classifier(classifier, tmp_path / "hf", "hf")
    inside = hf / "model.safetensors"
    assert cli.main(["--src", str(inside), "--dst", str(hf), "--dst-format", "hf"]) == 2
    existing = tmp_path / "old.pth"
    existing.write_bytes(b"earlier work")
    assert cli.main(["--src", str(src), "--dst", str(existing), "--dst-format", "official"]) == 2
    assert existing.read_bytes() == b"earlier work"
    # --force replaces it, once the conversion is verified
    args = ["--src", str(src), "--dst", str(existing), "--dst-format", "official", "--force"]
    assert cli.main(args) == 0
    assert load_classifier(existing).bitrain_source_format == "official"
    assert not list(tmp_path.glob(".*converting*")) and not list(tmp_path.glob(".*replaced*"))


def test_convert_onto_its_source_with_force_keeps_a_loadable_file(classifier, tmp_path, cli):
    src = save_classifier(classifier, tmp_path / "cls.pth", "official", eval_transform=SPEC)
    x = torch.randn(1, 3, 32, 32)
    want = classifier(x)
    args = ["--src", str(src), "--dst", str(src), "--dst-format", "bitrain", "--force"]
    assert cli.main(args) == 0
    back = load_classifier(src)
    assert back.bitrain_source_format == "bitrain"
    torch.testing.assert_close(back(x), want, atol=1e-5, rtol=0)


def test_a_failed_conversion_leaves_the_destination_as_it_was(
    classifier, tmp_path, cli, monkeypatch
):
    src = save_classifier(classifier, tmp_path / "cls.ckpt", "bitrain", eval_transform=SPEC)
    dst = save_classifier(classifier, tmp_path / "hf", "hf")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    import bitrain.checkpoints.conversion

    monkeypatch.setattr(bitrain.checkpoints.conversion, "LOGIT_TOL", -1.0)  # every check fails
    args = ["--src", str(src), "--dst", str(dst), "--dst-format", "hf", "--force"]
    assert cli.main(args) == 1
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert not list(tmp_path.glob(".*converting*"))


# --- damaged weights and weights that do not fit ----------------------------------------------


def test_hf_query_weight_of_the_wrong_shape_names_the_file_and_key(classifier, tmp_path):
    folder = save_classifier(classifier, tmp_path / "hf", "hf")
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("attention.query.weight"))
    state[key] = state[key][:-1]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError) as err:
        load_classifier(folder)
    message = str(err.value)
    assert str(weights) in message and "query.weight" in message and "layer 0" in message


def test_pretrained_that_fits_nothing_is_refused_even_when_not_strict(tmp_path, beit_spec):
    other = create_classifier("resnetv2_50x1_bit", 3, channels=[128, 128, 128, 128], stem_chs=32)
    path = tmp_path / "resnet.pth"
    torch.save(other.state_dict(), path)
    model = create_classifier("beit_base_patch16_224", 3, **beit_spec)
    with pytest.raises(CheckpointError, match="none of its"):
        load_pretrained(model, path, strict=False)


def test_pretrained_partial_fit_counts_what_loaded(tmp_path, beit_spec, caplog):
    source = create_classifier("beit_base_patch16_224", 3, **beit_spec)
    state = {k: v for k, v in source.state_dict().items() if k.startswith("blocks.0.")}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    model = create_classifier("beit_base_patch16_224", 3, **beit_spec)
    with caplog.at_level("INFO"):
        load_pretrained(model, path, strict=False)
    loaded = sum(1 for k in state if not k.endswith("relative_position_index"))
    assert f"initialised {loaded} of the model's" in caplog.text


# --- predict checks its arguments before any inference --------------------------------------------


def test_predict_output_under_a_file_and_top_k_zero_are_refused_first(classifier, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_output(blocker / "sub" / "preds.json")
    with pytest.raises(ValueError, match="directory"):
        check_output(tmp_path)
    path = save_classifier(classifier, tmp_path / "cls.ckpt", "bitrain")
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="top_k"):
            predict(path, tmp_path, top_k=bad)


@pytest.mark.slow  # python -m bitrain.predict in a subprocess
def test_predict_cli_checks_output_before_inference(classifier, tmp_path, photos):
    path = save_classifier(classifier, tmp_path / "cls.ckpt", "bitrain", eval_transform=SPEC)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "bitrain.predict", f"ckpt_path={path}", f"images={photos}",
         f"output={blocker}/preds.json", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "is a file" in proc.stderr and "0.png" not in proc.stdout  # nothing was predicted


def test_official_args_namespace_is_plain_data(classifier, tmp_path):
    # the official layout keeps an argparse.Namespace: its values are read, never called
    path = save_classifier(classifier, tmp_path / "cls.pth", "official", eval_transform=SPEC)
    obj = torch.load(path, weights_only=False)
    assert isinstance(obj["args"], argparse.Namespace)
    assert load_classifier(path).bitrain_eval_transform == SPEC


@pytest.mark.parametrize(
    "change",
    [
        {"model_name": "hf-hub:someone/model"},
        {"model_name": "not_a_model"},
        {"checkpoint_path": "/etc/passwd"},
        {"img_size": "${oc.env:HOME}"},
        {"act_layer": {"_target_": "os.getcwd"}},
    ],
    ids=["hf_hub", "unknown", "checkpoint_path", "interpolation", "node"],
)
def test_model_arguments_from_a_file_choose_no_code_and_no_file(classifier, tmp_path, change):
    folder = save_classifier(classifier, tmp_path / "timm_folder", "timm")
    config = json.loads((folder / "config.json").read_text())
    config["bitrain_spec"] = {**config["bitrain_spec"], **change}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=str(folder)):
        load_classifier(folder)


@pytest.mark.slow
def test_training_commands_refuse_a_malicious_pretrained_file_in_one_line(tmp_path):
    evil, marker = _evil_checkpoint(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "bitrain.finetune", f"model.pretrained={evil}",
         f"hydra.run.dir={tmp_path / 'run'}", "logger=csv"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert not marker.exists()
    assert "Traceback" not in proc.stderr and "weights_only=False" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("finetune: refused to load checkpoint")
