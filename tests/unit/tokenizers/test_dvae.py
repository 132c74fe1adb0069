"""bitrain.tokenizers.dvae: the trainable dVAE, its weights file and the DVAETokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from bitrain.io import CheckpointError, atomic_save, load_torch_file
from bitrain.tokenizers.dvae import (
    DiscreteVAE,
    DVAETokenizer,
    codebook_stats,
    gumbel_noise,
    save_dvae,
)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_default_is_the_demo_shape():
    model = DiscreteVAE()
    assert model.vocab_size == 512 and model.input_size == 32 and model.grid_size == (8, 8)
    logits = model.encode_logits(_images(2, 32))
    assert logits.shape == (2, 512, 8, 8)


def test_shapes_and_ranges(dvae_tiny_kwargs):
    model = DiscreteVAE(**dvae_tiny_kwargs)
    x = _images(3, 16)
    recon, logits = model(x, temperature=0.5)
    assert recon.shape == x.shape and logits.shape == (3, 32, 4, 4)
    assert 0 <= recon.min() and recon.max() <= 1
    ids = logits.argmax(1)
    pixels = model.decode_ids(ids)
    assert pixels.shape == x.shape and 0 <= pixels.min() and pixels.max() <= 1


def test_three_downsamples_give_beit_grid():
    model = DiscreteVAE(vocab_size=16, input_size=112, num_downsamples=3, hidden_dim=8)
    assert model.grid_size == (14, 14)


def test_gradients_flow_through_the_gumbel_relaxation(dvae_tiny_kwargs):
    torch.manual_seed(0)
    model = DiscreteVAE(**dvae_tiny_kwargs)
    out = model.loss(_images(2, 16), temperature=1.0, kl_weight=0.0)  # reconstruction only
    out["loss"].backward()
    # The encoder only receives gradient through the soft one-hot: it must be non-zero.
    enc_grad = model.encoder[0].weight.grad
    assert enc_grad is not None and enc_grad.abs().sum() > 0
    assert model.codebook.weight.grad.abs().sum() > 0
    assert out["ids"].shape == (2, 4, 4) and not out["ids"].requires_grad


def test_straight_through_decodes_hard_codes(dvae_tiny_kwargs):
    torch.manual_seed(0)
    model = DiscreteVAE(**dvae_tiny_kwargs, straight_through=True)
    out = model.loss(_images(2, 16), temperature=1.0, kl_weight=0.0)
    out["loss"].backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0


def test_gumbel_noise_is_standard_gumbel():
    g = gumbel_noise(torch.empty(200_000))
    assert torch.isfinite(g).all()
    # Gumbel(0, 1): mean = Euler-Mascheroni constant, variance = pi^2 / 6.
    assert g.mean().item() == pytest.approx(0.5772, abs=0.02)
    assert g.var().item() == pytest.approx(math.pi**2 / 6, rel=0.03)


def test_kl_to_uniform_bounds(dvae_tiny_kwargs):
    model = DiscreteVAE(**dvae_tiny_kwargs)
    uniform = torch.zeros(2, 32, 4, 4)
    assert model.kl_to_uniform(uniform).item() == pytest.approx(0.0, abs=1e-6)
    peaked = torch.full((2, 32, 4, 4), -1e4)
    peaked[:, 3] = 1e4
    assert model.kl_to_uniform(peaked).item() == pytest.approx(math.log(32), rel=1e-5)


def test_l1_reconstruction_option(dvae_tiny_kwargs):
    model = DiscreteVAE(**{**dvae_tiny_kwargs, "recon_loss": "l1"})
    a, b = torch.zeros(1, 3, 16, 16), torch.full((1, 3, 16, 16), 0.5)
    assert model.reconstruction_loss(a, b).item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_size": 30}, "divisible"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"recon_loss": "bce"}, "recon_loss"),
        ({"hidden_dim": 0}, "hidden_dim"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiscreteVAE(**kwargs)


def test_wrong_image_size_is_a_clear_error(dvae_tiny_kwargs):
    model = DiscreteVAE(**dvae_tiny_kwargs)
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        model.encode_logits(_images(1, 32))


def test_codebook_stats():
    stats = codebook_stats(torch.tensor([5, 5, 0, 0]))
    assert stats["codebook_usage"] == 0.5 and stats["codes_used"] == 2
    assert stats["perplexity"] == pytest.approx(2.0)
    assert codebook_stats(torch.zeros(4))["codebook_usage"] == 0.0


def test_overfits_a_tiny_batch(dvae_tiny_kwargs):
    torch.manual_seed(0)
    model = DiscreteVAE(**dvae_tiny_kwargs)
    # Four structured images (flat colour + a bright square): learnable through a 4x4 code grid.
    x = torch.rand(4, 3, 1, 1, generator=torch.Generator().manual_seed(3)).expand(4, 3, 16, 16)
    x = x.clone()
    for i in range(4):
        x[i, :, 4 * i : 4 * i + 6, 2:8] = 1.0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        out = model.loss(x, temperature=0.5, kl_weight=1e-3)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["recon_loss"].item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses[::10]


# --- the weights file and the tokenizer --------------------------------------------------------


def test_saved_file_is_plain_and_loads_weights_only(dvae_file, dvae_tiny_kwargs):
    blob = torch.load(dvae_file, weights_only=True)
    assert blob["format"] == "bitrain-dvae" and blob["version"] == 1
    assert {k: blob["config"][k] for k in dvae_tiny_kwargs} == dvae_tiny_kwargs
    assert blob["stats"]["perplexity"] == 10.0
    assert all(isinstance(v, torch.Tensor) for v in blob["state_dict"].values())


def test_fresh_tokenizer_gives_identical_ids(tmp_path, dvae_tiny_kwargs):
    torch.manual_seed(1)
    model = DiscreteVAE(**dvae_tiny_kwargs).eval()
    x = _images(4, 16, seed=2)
    expected = model.encode_logits(x).argmax(1)
    path = save_dvae(model, tmp_path / "sub" / "tok.pt", stats={"codebook_usage": 0.25})
    tok = DVAETokenizer(path)
    assert tok.vocab_size == 32 and tok.input_size == 16 and tok.grid_size == (4, 4)
    assert torch.equal(tok.encode(tok.preprocess(x)), expected)
    assert torch.allclose(tok.decode(expected), model.decode_ids(expected))
    assert tok.stats == {"codebook_usage": 0.25}
    assert not any(p.requires_grad for p in tok.parameters()) and not tok.training


def test_ids_from_inference_mode_are_usable_targets(dvae_tokenizer):
    with torch.inference_mode():
        ids = dvae_tokenizer.encode(_images(2, 16))
    assert not ids.is_inference()


def test_missing_file_says_how_to_train_one(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        DVAETokenizer(tmp_path / "nope.pt")
    msg = str(err.value)
    assert "nope.pt" in msg and "bitrain.train_tokenizer" in msg and "docs/tokenizers.md" in msg


def test_not_our_format_is_a_checkpoint_error(tmp_path):
    path = atomic_save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a bitrain dVAE tokenizer file"):
        DVAETokenizer(path)
    path = atomic_save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="not a bitrain dVAE tokenizer file"):
        DVAETokenizer(path)


def test_wrong_version_and_misfit_weights(tmp_path, dvae_file):
    blob = load_torch_file(dvae_file)
    atomic_save({**blob, "version": 99}, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        DVAETokenizer(tmp_path / "v99.pt")
    atomic_save({**blob, "config": {**blob["config"], "hidden_dim": 8}}, tmp_path / "misfit.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        DVAETokenizer(tmp_path / "misfit.pt")


def test_config_mismatch_names_both_values(dvae_file):
    with pytest.raises(ValueError, match="vocab_size=512 in the config but 32 in the file"):
        DVAETokenizer(dvae_file, vocab_size=512, input_size=16)
    tok = DVAETokenizer(dvae_file, vocab_size=32, input_size=16)
    assert tok.vocab_size == 32
