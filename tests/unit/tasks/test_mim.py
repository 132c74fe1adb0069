"""MaskedImageModeling: start-up checks, the tokenizer stays out of checkpoints, one step."""

import pytest
import torch

from bitrain.io import CheckpointError
from bitrain.tasks.mim import MaskedImageModeling
from bitrain.tokenizers.dvae import DiscreteVAE, save_dvae

MODEL = {
    "_target_": "bitrain.models.beit.BeitMIM",
    "img_size": 32,
    "patch_size": 4,
    "vocab_size": 64,
    "embed_dim": 48,
    "depth": 2,
    "num_heads": 3,
    "drop_path_rate": 0.0,
}
OPTIM = {"lr": 1e-3, "warmup_steps": 0}


@pytest.fixture(scope="module")
def tok_cfg(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "dvae.pt"
    torch.manual_seed(0)
    save_dvae(DiscreteVAE(vocab_size=64, input_size=32, hidden_dim=16, codebook_dim=16), path)
    return {"_target_": "bitrain.tokenizers.dvae.DVAETokenizer", "weights_path": str(path)}


def _batch(b=2, n_masked=20):
    mask = torch.zeros(b, 64, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(64)[:n_masked]] = True
    return {
        "images": torch.randn(b, 3, 32, 32),
        "tokenizer_images": torch.rand(b, 3, 32, 32),
        "mask": mask.view(b, 8, 8),
    }


def test_step_gives_finite_loss_and_gradients(tok_cfg):
    task = MaskedImageModeling(MODEL, tok_cfg, OPTIM)
    out = task.shared_step(_batch())
    assert out["loss"].isfinite() and 0 <= out["mim_acc"] <= 1
    out["loss"].backward()
    assert task.model.lm_head.weight.grad is not None
    assert all(p.grad is None for p in task.tokenizer.parameters())
    # Chance level at init: close to log(vocab).
    assert abs(out["loss"].item() - torch.log(torch.tensor(64.0)).item()) < 1.0


def test_tokenizer_is_frozen_and_not_in_state_dict(tok_cfg):
    task = MaskedImageModeling(MODEL, tok_cfg, OPTIM)
    assert all(k.startswith("model.") for k in task.state_dict())
    assert not any(p.requires_grad for p in task.tokenizer.parameters())
    task.train()
    assert not task.tokenizer.training
    hp = task.hparams
    assert isinstance(hp["model"], dict) and hp["model"]["_target_"].endswith("BeitMIM")


def test_vocab_mismatch_is_refused_naming_the_keys(tok_cfg):
    with pytest.raises(ValueError, match="vocab_size"):
        MaskedImageModeling({**MODEL, "vocab_size": 128}, tok_cfg, OPTIM)


def test_grid_mismatch_is_refused_naming_the_keys(tok_cfg):
    with pytest.raises(ValueError, match="patch grid"):
        MaskedImageModeling({**MODEL, "patch_size": 8}, tok_cfg, OPTIM)


def test_unequal_mask_counts_are_refused(tok_cfg):
    task = MaskedImageModeling(MODEL, tok_cfg, OPTIM)
    batch = _batch()
    batch["mask"].view(2, -1)[0, :] = True  # image 0: all 64 masked, image 1: 20
    with pytest.raises(ValueError):
        task.shared_step(batch)


def test_static_mask_step_equals_the_boolean_step(tok_cfg):
    """The GPU path (gather by a fixed count, no host sync) gives the same loss as the CPU path."""
    task = MaskedImageModeling(MODEL, tok_cfg, OPTIM).eval()
    batch = _batch(n_masked=20)
    plain_out = task.shared_step(batch)
    task.static_mask = True
    static_out = task.shared_step(batch)
    assert task._num_masked == 20
    torch.testing.assert_close(static_out["loss"], plain_out["loss"])
    torch.testing.assert_close(static_out["mim_acc"], plain_out["mim_acc"])
    assert torch.equal(static_out["targets"], plain_out["targets"])


def test_bf16_clipping_keeps_the_fused_optimizer(tok_cfg):
    """bf16-mixed + clipping: the task clips itself, AdamW stays fused (not under fp16)."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision

    from bitrain.tasks.optim import _amp_clipping

    task = MaskedImageModeling(MODEL, tok_cfg, OPTIM)
    bf16 = MixedPrecision("bf16-mixed", "cpu")
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    assert not _amp_clipping(SimpleNamespace(gradient_clip_val=3.0, precision_plugin=bf16))
    assert _amp_clipping(SimpleNamespace(gradient_clip_val=3.0, precision_plugin=fp16))
    task._trainer = SimpleNamespace(precision_plugin=bf16)
    opt = torch.optim.AdamW(task.model.parameters(), fused=True)
    for p in task.model.parameters():
        p.grad = torch.full_like(p, 10.0)
    task.configure_gradient_clipping(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in task.model.parameters()]))
    assert norm == pytest.approx(1.0, rel=1e-3)
    task._trainer = None


def test_the_patch_view_normalization_is_kept_in_the_hyperparameters(tok_cfg):
    norm = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert (
        MaskedImageModeling(MODEL, tok_cfg, OPTIM, normalization=norm).hparams["normalization"]
        == norm
    )
    bad = {"mean": [0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    with pytest.raises(CheckpointError, match="mean"):
        MaskedImageModeling(MODEL, tok_cfg, OPTIM, normalization=bad)


def test_unknown_nonfinite_check_is_refused_naming_the_key(tok_cfg):
    with pytest.raises(ValueError, match=r"task.nonfinite_check must be one of .*'never'"):
        MaskedImageModeling(MODEL, tok_cfg, OPTIM, nonfinite_check="never")


NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _uint8_batch(b=2):
    """A batch as the loader hands it (uint8 views) and the same batch as floats made by hand."""
    g = torch.Generator().manual_seed(0)
    batch = _batch(b)
    batch["images"] = torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8)
    batch["tokenizer_images"] = torch.randint(0, 256, (b, 3, 32, 32), generator=g).to(torch.uint8)
    mean, std = torch.tensor(NORM["mean"]).view(3, 1, 1), torch.tensor(NORM["std"]).view(3, 1, 1)
    floats = {
        **batch,
        "images": (batch["images"].float() / 255 - mean) / std,
        "tokenizer_images": batch["tokenizer_images"].float() / 255,
    }
    return batch, floats


def test_uint8_views_are_normalised_on_the_device_as_the_float_path(tok_cfg):
    """uint8 views (TwoViewTransform's default) give the loss of the same views as floats."""
    torch.manual_seed(0)
    task = MaskedImageModeling(MODEL, tok_cfg, OPTIM, normalization=NORM)
    as_uint8, as_float = _uint8_batch()
    images, token_view = task.model_inputs(as_uint8["images"], as_uint8["tokenizer_images"])
    assert images.dtype == torch.float32 and token_view.dtype == torch.float32
    torch.testing.assert_close(images, as_float["images"], atol=1e-5, rtol=0)
    torch.testing.assert_close(token_view, as_float["tokenizer_images"], atol=1e-6, rtol=0)
    out_u8, out_f = task.shared_step(as_uint8), task.shared_step(as_float)
    assert torch.equal(out_u8["targets"], out_f["targets"])
    torch.testing.assert_close(out_u8["loss"], out_f["loss"], atol=1e-5, rtol=0)
    # Float views are used as they are (synthetic data, callers that normalise themselves).
    same = task.model_inputs(as_float["images"], as_float["tokenizer_images"])
    assert same[0] is as_float["images"] and same[1] is as_float["tokenizer_images"]


def test_uint8_images_without_normalization_are_refused(tok_cfg):
    task = MaskedImageModeling(MODEL, tok_cfg, OPTIM)  # normalization: None
    as_uint8, as_float = _uint8_batch()
    with pytest.raises(ValueError, match="task.normalization is not set"):
        task.shared_step(as_uint8)
    assert task.shared_step(as_float)["loss"].isfinite()  # float views need none


@pytest.mark.parametrize("key", ["images", "tokenizer_images"])
def test_views_of_another_dtype_are_refused(tok_cfg, key):
    task = MaskedImageModeling(MODEL, tok_cfg, OPTIM, normalization=NORM)
    batch = _batch()
    batch[key] = torch.zeros(batch[key].shape, dtype=torch.int64)
    with pytest.raises(TypeError, match=f"'{key}' must be uint8"):
        task.shared_step(batch)


def test_uint8_images_take_the_modules_float_dtype(tok_cfg):
    """As Lightning casts a float batch for a module in another precision (e.g. bf16-true)."""
    task = MaskedImageModeling(MODEL, tok_cfg, OPTIM, normalization=NORM).to(torch.float64)
    as_uint8, as_float = _uint8_batch()
    images, token_view = task.model_inputs(as_uint8["images"], as_uint8["tokenizer_images"])
    assert images.dtype == torch.float64 and token_view.dtype == torch.float32
    torch.testing.assert_close(images, as_float["images"].double(), atol=1e-5, rtol=0)
