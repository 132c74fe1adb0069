"""Folders laid out like the reference model cards predict and evaluate as transformers does.

For microsoft/beit-base-patch16-224, google/vit-base-patch32-224-in21k and google/bit-50 (their
published ``preprocessor_config.json``, random tiny weights at the cards' 224 px), and for a timm
folder, ``bitrain.evaluation.prediction.predict`` and ``bitrain.evaluation.validation.evaluate``
must give the top-5 and
probabilities of the reference library's own processor + model on real photos of several shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from bitrain.evaluation.prediction import predict
from bitrain.evaluation.validation import evaluate

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LABELS = ["astronaut", "cat", "chelsea", "coffee", "rocket"]  # sorted, as ImageFolderSource labels
PROB_TOL = 1e-3

# The cards' preprocessor_config.json (Hugging Face hub), as published.
_CARDS_FILE = Path(__file__).resolve().parents[1] / "data" / "model_card_processors.json"
CARD_PROCESSORS = {
    k: v for k, v in json.loads(_CARDS_FILE.read_text()).items() if not k.startswith("_")
}
# Tiny models of each card's family at the card's resolution and patch size.
CARD_MODELS = {
    "beit": ("BeitConfig", "BeitForImageClassification", {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "image_size": 224, "patch_size": 16,
        "use_relative_position_bias": True, "use_mean_pooling": True,
    }),
    "vit": ("ViTConfig", "ViTForImageClassification", {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "image_size": 224, "patch_size": 32,
    }),
    "bit": ("BitConfig", "BitForImageClassification", {
        "embedding_size": 32, "hidden_sizes": [128, 128, 128, 256], "depths": [3, 4, 6, 3],
        "num_groups": 8,
    }),
}  # fmt: skip


def _photo_arrays() -> list[np.ndarray]:
    import skimage.data

    return [
        skimage.data.astronaut(),  # 512 x 512
        skimage.data.coffee(),  # 400 x 600
        np.ascontiguousarray(np.rot90(skimage.data.chelsea())),  # 451 x 300, portrait
        skimage.data.rocket(),  # 427 x 640
        skimage.data.chelsea()[:, 40:],  # 300 x 411
    ]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """val/<label>/<label>.png: one real photo per class (PNG: the same pixels for everyone)."""
    root = tmp_path_factory.mktemp("photos")
    for label, pixels in zip(LABELS, _photo_arrays()):
        for split in ("train", "val"):
            (root / split / label).mkdir(parents=True)
            Image.fromarray(pixels).save(root / split / label / f"{label}.png")
    return root


def _hf_folder(card: str, tmp_path: Path) -> Path:
    config_cls, model_cls, kwargs = CARD_MODELS[card]
    config = getattr(transformers, config_cls)(
        **kwargs,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a head that spreads the probabilities (HF inits it near zero)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    folder = tmp_path / f"{card}_card"
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(CARD_PROCESSORS[card]))
    return folder


def _reference(folder: Path, files: list[Path]) -> torch.Tensor:
    """Probabilities of transformers' own processor (PIL backend) + model."""
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    images = [Image.open(f).convert("RGB") for f in files]
    with torch.no_grad():
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        return model(pixel_values=pixels).logits.float().softmax(-1)


def _evaluate(ckpt: Path, root: Path, out: Path, preprocessing: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=[
                f"ckpt_path={ckpt}", "data=cls/image_folder", f"data.root={root}",
                f"data.num_classes={len(LABELS)}", "data.num_workers=0", "data.batch_size=2",
                "data.persistent_workers=false", "data.pin_memory=false", "data.drop_last=false",
                "device=cpu", f"paths.output_dir={out}", f"preprocessing={preprocessing}",
            ],
        )  # fmt: skip
    return evaluate(cfg)


@pytest.mark.parametrize("card", sorted(CARD_PROCESSORS))
def test_model_card_folder_predicts_and_evaluates_as_transformers(card, tmp_path, photo_folder):
    folder = _hf_folder(card, tmp_path)
    files = sorted((photo_folder / "val").rglob("*.png"))
    want = _reference(folder, files)
    got = {r["image"]: r for r in predict(folder, photo_folder / "val", top_k=5)}
    for i, f in enumerate(files):
        top = got[str(f)]["top"]
        ref = want[i].topk(5)
        assert [t["index"] for t in top] == ref.indices.tolist(), f.name
        probs = torch.tensor([t["prob"] for t in top])
        assert float((probs - ref.values).abs().max()) <= PROB_TOL, f.name

    # evaluate: the folder's own preprocessing by default, the same loss as transformers'
    metrics = _evaluate(folder, photo_folder, tmp_path / "eval", "checkpoint")
    labels = torch.tensor([LABELS.index(f.parent.name) for f in files])
    ref_loss = float(torch.nn.functional.nll_loss(want.log(), labels))
    ref_top1 = float((want.argmax(-1) == labels).float().mean())
    assert metrics["images"] == len(files)
    assert abs(metrics["loss"] - ref_loss) <= PROB_TOL
    assert metrics["top1"] == pytest.approx(ref_top1)
    if card != "bit":  # the data config's ImageNet crop (crop_pct 0.875) is another preprocessing
        other = _evaluate(folder, photo_folder, tmp_path / "eval_cfg", "config")
        assert abs(other["loss"] - ref_loss) > PROB_TOL


def test_timm_folder_predicts_as_timm(tmp_path, photo_folder):
    import timm
    import timm.data

    from bitrain.checkpoints import save_classifier
    from bitrain.models.classifier import create_classifier

    torch.manual_seed(0)
    spec = dict(img_size=224, patch_size=32, embed_dim=64, depth=2, num_heads=4)
    model = create_classifier("vit_base_patch32_224", len(LABELS), **spec).eval()
    model.label_names = LABELS
    folder = save_classifier(model, tmp_path / "timm", "timm")
    config = json.loads((folder / "config.json").read_text())
    for key in [k for k in config if k.startswith("bitrain_")]:  # as timm itself writes it
        del config[key]
    config["pretrained_cfg"].update(crop_pct=0.9, interpolation="bicubic", mean=[0.5] * 3)
    (folder / "config.json").write_text(json.dumps(config))
    ref_model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    transform = timm.data.create_transform(
        **timm.data.resolve_data_config({}, model=ref_model), is_training=False
    )
    files = sorted((photo_folder / "val").rglob("*.png"))
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
        want = ref_model(batch).softmax(-1)
    got = {r["image"]: r for r in predict(folder, photo_folder / "val", top_k=5)}
    for i, f in enumerate(files):
        ref = want[i].topk(5)
        assert [t["index"] for t in got[str(f)]["top"]] == ref.indices.tolist()
        probs = torch.tensor([t["prob"] for t in got[str(f)]["top"]])
        assert float((probs - ref.values).abs().max()) <= PROB_TOL
