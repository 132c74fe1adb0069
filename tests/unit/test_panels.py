"""bitrain.callbacks.panels: masked-patch blanking, MIM and tokenizer panels as PNG files."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from bitrain.callbacks.panels import MIMPanels, TokenizerPanels, blank_masked, save_histogram
from bitrain.tasks.mim import MaskedImageModeling
from bitrain.tasks.tokenizer import DVAETraining
from bitrain.tokenizers.dvae import DiscreteVAE, save_dvae

MODEL = {
    "_target_": "bitrain.models.beit.BeitMIM",
    "img_size": 32,
    "patch_size": 4,
    "vocab_size": 64,
    "embed_dim": 48,
    "depth": 2,
    "num_heads": 3,
    "drop_path_rate": 0.1,
}
DVAE = {
    "_target_": "bitrain.tokenizers.dvae.DiscreteVAE",
    "vocab_size": 64,
    "input_size": 32,
    "hidden_dim": 16,
    "codebook_dim": 16,
}


@pytest.fixture(scope="module")
def tok_cfg(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "dvae.pt"
    torch.manual_seed(0)
    save_dvae(DiscreteVAE(vocab_size=64, input_size=32, hidden_dim=16, codebook_dim=16), path)
    return {"_target_": "bitrain.tokenizers.dvae.DVAETokenizer", "weights_path": str(path)}


def _batch(b=3, n_masked=20):
    mask = torch.zeros(b, 64, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(64)[:n_masked]] = True
    return {
        "images": torch.randn(b, 3, 32, 32),
        "tokenizer_images": torch.rand(b, 3, 32, 32),
        "mask": mask.view(b, 8, 8),
    }


def test_blank_masked_greys_exactly_the_masked_patches():
    images = torch.rand(2, 3, 8, 8)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[0, 0, 1] = True  # top-right 4x4 patch of image 0
    out = blank_masked(images, mask)
    fill = torch.tensor([0.25, 0.45, 0.85]).view(3, 1, 1)
    assert torch.allclose(out[0, :, :4, 4:], fill.expand(3, 4, 4))
    assert torch.equal(out[0, :, 4:, :], images[0, :, 4:, :])
    assert torch.equal(out[1], images[1])
    with pytest.raises(ValueError, match="multiple"):
        blank_masked(torch.rand(1, 3, 9, 9), torch.zeros(1, 2, 2, dtype=torch.bool))


def _trainer(step):
    return SimpleNamespace(global_step=step, loggers=[], is_global_zero=True)


def test_mim_panel_has_reconstructions_and_restores_train_mode(tmp_path, tok_cfg):
    task = MaskedImageModeling(MODEL, tok_cfg, {"lr": 1e-3})
    task.train()
    cb = MIMPanels(dirpath=str(tmp_path), every_n_steps=5, num_images=2)
    cb.on_train_batch_end(_trainer(4), task, None, _batch(), 0)  # not a multiple of 5
    assert cb.written == []
    cb.on_train_batch_end(_trainer(5), task, None, _batch(), 0)
    cb.on_train_batch_end(_trainer(5), task, None, _batch(), 1)  # same step (accumulation): once
    assert [p.name for p in cb.written] == ["mim_step_0000005.png"]
    image = Image.open(cb.written[0])
    # Four columns (token view, masked, reconstruction, prediction) are wider than two rows high.
    assert image.width > image.height
    assert task.training and task.model.training
    assert not any(p.requires_grad is False for p in task.model.parameters())


def test_mim_panel_of_uint8_views_equals_the_panel_of_the_same_views_as_floats(tmp_path, tok_cfg):
    """The loader hands uint8 views: the panel normalises them as the task does."""
    norm = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    task = MaskedImageModeling(MODEL, tok_cfg, {"lr": 1e-3}, normalization=norm)
    g = torch.Generator().manual_seed(0)
    as_uint8 = {
        **_batch(2),
        "images": torch.randint(0, 256, (2, 3, 32, 32), generator=g).to(torch.uint8),
        "tokenizer_images": torch.randint(0, 256, (2, 3, 32, 32), generator=g).to(torch.uint8),
    }
    mean, std = torch.tensor(norm["mean"]).view(3, 1, 1), torch.tensor(norm["std"]).view(3, 1, 1)
    as_float = {
        **as_uint8,
        "images": (as_uint8["images"].float() / 255 - mean) / std,
        "tokenizer_images": as_uint8["tokenizer_images"].float() / 255,
    }
    written = []
    for name, batch in (("u8", as_uint8), ("f32", as_float)):
        cb = MIMPanels(dirpath=str(tmp_path / name), every_n_steps=1, num_images=2)
        cb.on_train_batch_end(_trainer(1), task, None, batch, 0)
        assert len(cb.written) == 1, name
        written.append(np.asarray(Image.open(cb.written[0])))
    np.testing.assert_array_equal(written[0], written[1])


def test_tokenizer_panels_write_pairs_and_histogram(tmp_path):
    task = DVAETraining(DVAE, {"lr": 1e-3}, weights_path=str(tmp_path / "t.pt"))
    task._epoch_counts[:10] = 5
    cb = TokenizerPanels(dirpath=str(tmp_path), every_n_steps=1, num_images=3)
    cb.on_train_batch_end(_trainer(3), task, None, {"images": torch.rand(4, 3, 32, 32)}, 0)
    assert sorted(p.name for p in cb.written) == [
        "codebook_step_0000003.png",
        "dvae_step_0000003.png",
    ]


def test_a_failing_panel_warns_and_training_goes_on(tmp_path, caplog):
    task = SimpleNamespace(training=True, eval=lambda: None, train=lambda mode: None)
    cb = MIMPanels(dirpath=str(tmp_path), every_n_steps=1)
    cb.on_train_batch_end(_trainer(1), task, None, {"images": torch.rand(1, 3, 8, 8)}, 0)
    assert cb.written == [] and "failed" in caplog.text


def test_histogram(tmp_path):
    path = save_histogram(torch.tensor([5, 0, 3, 1]), tmp_path / "h.png")
    assert Image.open(path).size[0] > 100


def test_mim_panel_with_dall_e_decoder_has_reconstructions(tmp_path):
    """DALL-E tokenizer: reconstructions only when decoder_path is given."""
    from bitrain.tokenizers.dall_e_decoder import DallEDecoder, save_decoder
    from bitrain.tokenizers.dall_e_encoder import DallEEncoder, save_encoder

    torch.manual_seed(0)
    hp = {"group_count": 4, "n_hid": 16, "n_blk_per_group": 1, "vocab_size": 64}
    enc = save_encoder(DallEEncoder(input_channels=3, **hp), tmp_path / "enc.safetensors")
    dec = save_decoder(DallEDecoder(n_init=16, **hp), tmp_path / "dec.safetensors")
    tok = {"_target_": "bitrain.tokenizers.dall_e.DallETokenizer", "weights_path": str(enc),
           "input_size": 64, **hp}  # fmt: skip
    for decoder_path, columns in ((None, 2), (str(dec), 4)):
        task = MaskedImageModeling(MODEL, {**tok, "decoder_path": decoder_path}, {"lr": 1e-3})
        cb = MIMPanels(dirpath=str(tmp_path / str(columns)), every_n_steps=1, num_images=2)
        batch = {**_batch(2), "tokenizer_images": torch.rand(2, 3, 64, 64)}
        cb.on_train_batch_end(_trainer(1), task, None, batch, 0)
        assert len(cb.written) == 1, columns
        image = Image.open(cb.written[0])
        ratio = image.width / image.height
        assert (ratio > 1.4) == (columns == 4), (columns, image.size)
