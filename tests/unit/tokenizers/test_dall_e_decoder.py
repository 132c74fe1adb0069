"""DALL-E decoder: parity with OpenAI's dall_e package, safe loading, DallETokenizer.decode."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
import torch.nn.functional as F

from bitrain.io import CheckpointError
from bitrain.tokenizers.dall_e import DallETokenizer
from bitrain.tokenizers.dall_e_decoder import (
    DALL_E_DECODER_PICKLE_CLASSES,
    DallEDecoder,
    load_dall_e_decoder,
    save_decoder,
    unmap_pixels,
)
from bitrain.tokenizers.dall_e_encoder import dall_e_key_to_native, native_key_to_dall_e

# A tiny DALL-E decoder matching the tiny encoder of tests/conftest.py (64 codes, 4 groups:
# a 4x4 grid decodes to 32 px): widths 128, 64, 32, 16.
DECODER_TINY = {"n_init": 16, "n_hid": 16, "n_blk_per_group": 1, "vocab_size": 64}


def build_reference_decoder(seed: int = 0, **kwargs):
    """A random ``dall_e.decoder.Decoder``, every parameter re-drawn so none is trivial.

    Weights N(0, 1/fan_in) (DALL-E's own scale), biases N(0, 0.1) (DALL-E's zeros would hide a
    bias mix-up). attrs validators are disabled so tiny sizes are allowed. The global RNG is
    left untouched.
    """
    import attr
    from dall_e.decoder import Decoder

    kwargs = {"use_mixed_precision": False, **DECODER_TINY, **kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with attr.validators.disabled():
            decoder = Decoder(**kwargs)
        with torch.no_grad():
            for name, p in decoder.named_parameters():
                std = 0.1 if name.endswith(".b") else p[0].numel() ** -0.5
                p.normal_(std=std)
    return decoder.eval()


def make_decoder_pkl(path, seed: int = 0, **kwargs):
    """Write a random DALL-E ``decoder.pkl`` exactly as OpenAI's: ``torch.save(module)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_reference_decoder(seed, **kwargs), path)
    return path


@pytest.fixture(scope="module")
def decoder_pkl(tmp_path_factory):
    return make_decoder_pkl(tmp_path_factory.mktemp("dall_e_dec") / "decoder.pkl")


@pytest.fixture(scope="module")
def reference():
    return build_reference_decoder(0)


@pytest.fixture
def tokenizer(dall_e_encoder_pkl, decoder_pkl, dall_e_tiny_kwargs):
    return DallETokenizer(
        dall_e_encoder_pkl, input_size=32, decoder_path=decoder_pkl, **dall_e_tiny_kwargs
    )


def _ids(n: int = 4, grid: int = 4, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, grid, grid), generator=torch.Generator().manual_seed(seed))


def _reference_pixels(reference, ids: torch.Tensor) -> torch.Tensor:
    """DALL-E's notebook: one-hot ids -> decoder -> sigmoid of the first 3 -> unmap_pixels."""
    from dall_e.utils import unmap_pixels as ref_unmap

    z = F.one_hot(ids, num_classes=reference.vocab_size).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        return ref_unmap(torch.sigmoid(reference(z).float()[:, :3]))


# --- architecture and the pickle's classes ---------------------------------------------------


def test_pickle_names_exactly_the_admitted_classes(tmp_path):
    """The admitted list is what a real pickled Decoder names (Identity: n_blk_per_group=2)."""
    path = make_decoder_pkl(tmp_path / "decoder.pkl", n_blk_per_group=2)
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    strings, named = [], set()
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            named.add(f"{strings[-2]}.{strings[-1]}")
        elif op.name == "GLOBAL":
            named.add(arg.replace(" ", "."))
    modules = {n for n in named if n.startswith(("dall_e.", "torch.nn."))}
    assert modules == set(DALL_E_DECODER_PICKLE_CLASSES)


def test_architecture_and_key_mapping(reference, decoder_pkl):
    ours = load_dall_e_decoder(decoder_pkl)
    assert ours.hparams == {"group_count": 4, "output_channels": 3, **DECODER_TINY}
    assert ours.upsample == 8
    theirs = reference.state_dict()
    assert {dall_e_key_to_native(k) for k in theirs} == set(ours.state_dict())
    assert {native_key_to_dall_e(k) for k in ours.state_dict()} == set(theirs)
    widths = [
        getattr(ours.blocks, f"group_{g}").block_1.res_path.conv_4.out_channels
        for g in (1, 2, 3, 4)
    ]
    assert widths == [128, 64, 32, 16]
    assert ours(torch.zeros(2, 64, 4, 4)).shape == (2, 6, 32, 32)


# --- parity with the reference package ----------------------------------------------------------


@pytest.mark.parametrize("blocks", [1, 2])
def test_logits_parity_with_dall_e(tmp_path, blocks):
    reference = build_reference_decoder(1, n_blk_per_group=blocks)
    torch.save(reference, tmp_path / "decoder.pkl")
    ours = load_dall_e_decoder(tmp_path / "decoder.pkl", n_blk_per_group=blocks)
    ids = _ids(6, seed=blocks)
    z = F.one_hot(ids, num_classes=64).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        want = reference(z)
        from_one_hot, from_ids = ours(z), ours.forward_ids(ids)
    assert want.shape == (6, 6, 32, 32)
    assert want.std() > 0.1  # non-trivial statistics
    assert (from_one_hot - want).abs().max() <= 1e-5
    assert (from_ids - want).abs().max() <= 1e-5


def test_tokenizer_decode_parity(tokenizer, reference):
    ids = _ids(5, seed=3)
    want = _reference_pixels(reference, ids)
    got = tokenizer.decode(ids)
    assert got.dtype == torch.float32 and got.shape == (5, 3, 32, 32)
    assert (got - want).abs().max() <= 1e-5
    inside = ((got > 0) & (got < 1)).float().mean()
    assert inside > 0.5  # most pixels are not clamped: the comparison is not trivially 0 == 0


def test_unmap_pixels_matches_dall_e():
    from dall_e.utils import map_pixels as ref_map
    from dall_e.utils import unmap_pixels as ref_unmap

    x = torch.linspace(-0.5, 1.5, 101).view(1, 1, 1, -1)
    torch.testing.assert_close(unmap_pixels(x), ref_unmap(x))
    y = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(unmap_pixels(ref_map(y)), y)


# --- DallETokenizer with and without a decoder ------------------------------------------------


def test_tokenizer_with_decoder_round_trip_shape_and_range(tokenizer):
    assert tokenizer.can_decode is True
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = tokenizer.encode(tokenizer.preprocess(images))
    out = tokenizer.decode(ids)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    assert not out.requires_grad
    assert torch.equal(out, tokenizer.decode(ids))  # deterministic


def test_decoder_is_frozen_and_in_eval(tokenizer):
    assert tokenizer.decoder is not None
    assert any(n.startswith("decoder.") for n, _ in tokenizer.named_parameters())
    assert not any(p.requires_grad for p in tokenizer.parameters())
    tokenizer.train()
    assert not any(m.training for m in tokenizer.decoder.modules())
    with torch.enable_grad():
        assert not tokenizer.decode(_ids(1)).requires_grad


def test_tokenizer_without_decoder_cannot_decode(dall_e_tokenizer):
    assert dall_e_tokenizer.can_decode is False
    assert dall_e_tokenizer.decoder is None and dall_e_tokenizer.decoder_path is None
    with pytest.raises(NotImplementedError) as err:
        dall_e_tokenizer.decode(_ids(1))
    for needle in ("tokenizer.decoder_path=", "decoder.pkl", "cdn.openai.com/dall-e/decoder.pkl"):
        assert needle in str(err.value)


def test_decode_rejects_bad_ids(tokenizer):
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tokenizer.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(ValueError, match="integer token ids"):
        tokenizer.decode(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="integer token ids"):
        tokenizer.decode(torch.zeros(1, 16, dtype=torch.long))


def test_decoder_must_match_the_encoder(dall_e_encoder_pkl, dall_e_tiny_kwargs, tmp_path):
    path = make_decoder_pkl(tmp_path / "decoder.pkl", vocab_size=32)
    with pytest.raises(ValueError, match="vocab_size=64 in the config but 32 in the file"):
        DallETokenizer(dall_e_encoder_pkl, input_size=32, decoder_path=path, **dall_e_tiny_kwargs)


def test_missing_decoder_says_where_to_get_it(dall_e_encoder_pkl, dall_e_tiny_kwargs, tmp_path):
    path = tmp_path / "tokenizers" / "dall_e" / "decoder.pkl"
    with pytest.raises(FileNotFoundError) as err:
        DallETokenizer(dall_e_encoder_pkl, input_size=32, decoder_path=path, **dall_e_tiny_kwargs)
    for needle in (str(path), "cdn.openai.com/dall-e/decoder.pkl", "docs/tokenizers.md"):
        assert needle in str(err.value)


# --- formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "native.pt", "dall_e.pt"])
def test_state_dict_formats(decoder_pkl, tmp_path, fmt):
    ours = load_dall_e_decoder(decoder_pkl)
    if fmt == "safetensors":
        path = save_decoder(ours, tmp_path / "decoder.safetensors")
    elif fmt == "native.pt":
        path = save_decoder(ours, tmp_path / "decoder.pt")
    else:
        path = tmp_path / "decoder.pth"
        torch.save({native_key_to_dall_e(k): v for k, v in ours.state_dict().items()}, path)
    again = load_dall_e_decoder(path, vocab_size=64, group_count=4)
    ids = _ids(2)
    assert torch.equal(again.decode(ids), ours.decode(ids))


def test_encoder_given_as_decoder_is_refused_clearly(dall_e_encoder_pkl, tmp_path):
    with pytest.raises(CheckpointError, match="decoder_path wants decoder.pkl"):
        load_dall_e_decoder(dall_e_encoder_pkl)
    tok = DallETokenizer(dall_e_encoder_pkl, input_size=32, n_hid=16, n_blk_per_group=1,
                         vocab_size=64)  # fmt: skip
    tok.save_state_dict(tmp_path / "encoder.pt")
    with pytest.raises(CheckpointError, match="not 1x1"):
        load_dall_e_decoder(tmp_path / "encoder.pt")


def test_incomplete_or_inconsistent_files(decoder_pkl, tmp_path):
    state = dict(load_dall_e_decoder(decoder_pkl).state_dict())
    del state["blocks.group_2.block_1.res_path.conv_3.bias"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing 'blocks.group_2.block_1.res_path.conv_3"):
        load_dall_e_decoder(tmp_path / "bad.pt")
    crafted = build_reference_decoder(0)
    crafted.n_hid = 10**9
    torch.save(crafted, tmp_path / "crafted.pkl")
    with pytest.raises(CheckpointError, match=r"inconsistent.*n_hid \(1000000000 vs 16\)"):
        load_dall_e_decoder(tmp_path / "crafted.pkl")
    bilinear = build_reference_decoder(0)
    bilinear.blocks.group_1.upsample.mode = "bilinear"
    torch.save(bilinear, tmp_path / "bilinear.pkl")
    with pytest.raises(CheckpointError, match="mode='bilinear'"):
        load_dall_e_decoder(tmp_path / "bilinear.pkl")


# --- unsafe files: refused, and nothing runs -----------------------------------------------------


class _Payload:
    """Pickles as ``func(arg)``: what a malicious file would run on a plain ``pickle.load``."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def test_payload_is_live_under_plain_pickle(tmp_path):
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(_Payload(os.system, f"touch {marker}")))
    assert marker.exists()


@pytest.mark.parametrize("where", ["bare", "inside_decoder"])
def test_foreign_global_is_refused_and_runs_nothing(tmp_path, where):
    marker = tmp_path / "PWNED"
    payload = _Payload(os.system, f"touch {marker}")
    if where == "bare":
        obj = payload
    else:  # a genuine-looking decoder.pkl carrying the payload as an attribute
        obj = build_reference_decoder(0)
        obj.innocent_attribute = payload
    torch.save(obj, tmp_path / "decoder.pkl")
    with pytest.raises(CheckpointError, match="refused"):
        load_dall_e_decoder(tmp_path / "decoder.pkl")
    assert not marker.exists()


def test_unknown_module_class_is_refused(tmp_path):
    dec = build_reference_decoder(0)
    dec.blocks.output.relu = torch.nn.GELU()
    torch.save(dec, tmp_path / "gelu.pkl")
    with pytest.raises(CheckpointError, match="GELU"):
        load_dall_e_decoder(tmp_path / "gelu.pkl")


def test_loads_without_the_dall_e_package(decoder_pkl, tokenizer):
    """decoder.pkl is read by bitrain's own code: the dall_e package is never imported."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.modules["dall_e"] = None  # any import of dall_e now raises ImportError
        import torch
        from bitrain.tokenizers.dall_e_decoder import load_dall_e_decoder
        dec = load_dall_e_decoder({str(decoder_pkl)!r}, vocab_size=64)
        ids = torch.randint(0, 64, (2, 4, 4), generator=torch.Generator().manual_seed(0))
        print(json.dumps(dec.decode(ids).tolist()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert torch.equal(got, tokenizer.decode(_ids(2)))


def test_native_decoder_validates_its_arguments():
    with pytest.raises(ValueError, match="n_hid divisible by 4"):
        DallEDecoder(n_hid=18)
    with pytest.raises(ValueError, match="group_count must be a positive int"):
        DallEDecoder(group_count=0)
    with pytest.raises(ValueError, match="forward_ids"):
        DallEDecoder(**DECODER_TINY)(torch.zeros(1, 4, 4, dtype=torch.long))
