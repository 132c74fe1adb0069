"""DallETokenizer: parity with OpenAI's dall_e package, file formats, refusal of unsafe files."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from bitrain.io import CheckpointError
from bitrain.tokenizers.dall_e import (
    DallEEncoder,
    DallETokenizer,
    convert,
    dall_e_key_to_native,
    main,
    native_key_to_dall_e,
)


def _images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _structured(size: int = 32) -> torch.Tensor:
    """Constant colours, gradients, a checkerboard and stripes: pixels in [0, 1], [8, 3, H, W]."""
    ramp = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
    checker = ((torch.arange(size)[:, None] // 4 + torch.arange(size)[None] // 4) % 2).float()
    stripes = (torch.arange(size)[None].expand(size, size) // 2 % 2).float()
    planes = [
        torch.zeros(3, size, size),
        torch.ones(3, size, size),
        torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, size, size),
        torch.stack([xx, yy, 1 - xx]),
        torch.stack([yy, yy, yy]),
        checker.expand(3, size, size),
        stripes.expand(3, size, size),
        torch.stack([checker, stripes, xx]),
    ]
    return torch.stack(planes).contiguous()


@pytest.fixture
def reference(dall_e_reference, dall_e_tiny_kwargs):
    """The reference dall_e.Encoder with the same weights as the ``dall_e_encoder_pkl`` fixture."""
    return dall_e_reference(0, **dall_e_tiny_kwargs).eval()


# --- architecture ---------------------------------------------------------------------------


@pytest.mark.parametrize(("blocks", "gain"), [(1, 1 / 16), (2, 1 / 64)])
def test_native_encoder_shapes_and_post_gain(blocks, gain):
    enc = DallEEncoder(n_hid=16, n_blk_per_group=blocks, vocab_size=64)
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, 64, 4, 4)  # three 2x pools
    gains = {m.post_gain for n, m in enc.named_modules() if n.endswith(f"block_{blocks}")}
    assert gains == {gain}


def test_key_mapping_covers_dall_e_names(reference):
    ours = DallEEncoder(n_hid=16, n_blk_per_group=1, vocab_size=64).state_dict()
    theirs = reference.state_dict()
    assert {dall_e_key_to_native(k) for k in theirs} == set(ours)
    assert {native_key_to_dall_e(k) for k in ours} == set(theirs)
    assert dall_e_key_to_native("blocks.group_1.block_1.res_path.conv_1.w") == (
        "blocks.group_1.block_1.res_path.conv_1.weight"
    )


def test_architecture_is_read_from_the_pickle(dall_e_tokenizer):
    assert dall_e_tokenizer.encoder.hparams == {
        "group_count": 4,
        "n_hid": 16,
        "n_blk_per_group": 1,
        "input_channels": 3,
        "vocab_size": 64,
    }
    assert dall_e_tokenizer.grid_size == (4, 4)


# --- parity with the reference package ----------------------------------------------------------


@pytest.mark.parametrize("images", [_images(), _structured()], ids=["random", "structured"])
def test_parity_with_dall_e(reference, dall_e_tokenizer, images):
    x = dall_e_tokenizer.preprocess(images)
    with torch.no_grad():
        want = reference(x)
    torch.testing.assert_close(dall_e_tokenizer.logits(x), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(dall_e_tokenizer.encode(x), want.argmax(1))


def test_preprocess_is_dall_e_map_pixels(dall_e_tokenizer):
    from dall_e.utils import map_pixels

    images = _images(2)
    torch.testing.assert_close(dall_e_tokenizer.preprocess(images), map_pixels(images))
    ends = dall_e_tokenizer.preprocess(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(ends, torch.tensor([0.1, 0.9]))
    with pytest.raises(TypeError, match="divide uint8"):
        dall_e_tokenizer.preprocess(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.slow
def test_full_size_parity(make_dall_e_encoder_pkl, dall_e_reference, tmp_path):
    """The real architecture (n_hid 256, 8192 codes, 112 px -> 14x14)."""
    path = make_dall_e_encoder_pkl(tmp_path / "encoder.pkl", seed=3)
    tok = DallETokenizer(path)
    x = tok.preprocess(torch.cat([_images(1, 112), _structured(112)[3:4]]))
    with torch.no_grad():
        want = dall_e_reference(3).eval()(x)
    ids = tok.encode(x)
    assert ids.shape == (2, 14, 14)
    assert torch.equal(ids, want.argmax(1))


# --- formats ------------------------------------------------------------------------------------


def test_safetensors_round_trip_detected_by_content(dall_e_tokenizer, dall_e_tiny_kwargs, tmp_path):
    dst = convert(dall_e_tokenizer.weights_path, tmp_path / "encoder.safetensors")
    renamed = tmp_path / "weights.bin"  # no telling suffix: the content decides
    renamed.write_bytes(dst.read_bytes())
    x = dall_e_tokenizer.preprocess(_images())
    for path in (dst, renamed):
        tok = DallETokenizer(path, input_size=32, **dall_e_tiny_kwargs)
        assert torch.equal(tok.encode(x), dall_e_tokenizer.encode(x))
        for (k, a), b in zip(tok.state_dict().items(), dall_e_tokenizer.state_dict().values()):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("naming", ["native", "dall_e"])
def test_torch_state_dict_in_either_naming(dall_e_tokenizer, dall_e_tiny_kwargs, tmp_path, naming):
    path = tmp_path / "encoder.pth"
    if naming == "native":
        dall_e_tokenizer.save_state_dict(path)
    else:
        state = dall_e_tokenizer.encoder.state_dict()
        torch.save({native_key_to_dall_e(k): v.contiguous() for k, v in state.items()}, path)
    tok = DallETokenizer(path, input_size=32, **dall_e_tiny_kwargs)
    x = dall_e_tokenizer.preprocess(_images())
    assert torch.equal(tok.encode(x), dall_e_tokenizer.encode(x))


def test_loads_without_the_dall_e_package(dall_e_encoder_pkl, dall_e_tokenizer):
    """encoder.pkl is read by bitrain's own code: the dall_e package is never imported."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.modules["dall_e"] = None  # any import of dall_e now raises ImportError
        import torch
        from bitrain.tokenizers.dall_e import DallETokenizer
        tok = DallETokenizer({str(dall_e_encoder_pkl)!r}, input_size=32, n_hid=16,
                             n_blk_per_group=1, vocab_size=64)
        x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        print(json.dumps(tok.encode(tok.preprocess(x)).tolist()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    want = dall_e_tokenizer.encode(dall_e_tokenizer.preprocess(_images(4)))
    assert torch.equal(got, want)


def test_cli_convert(dall_e_encoder_pkl, tmp_path):
    dst = tmp_path / "out" / "encoder.safetensors"
    assert main(["convert", str(dall_e_encoder_pkl), str(dst)]) == 0
    assert DallETokenizer(dst, input_size=32, n_hid=16, n_blk_per_group=1, vocab_size=64)
    assert main(["convert", str(tmp_path / "nope.pkl"), str(dst)]) == 1


# --- errors -------------------------------------------------------------------------------------


def test_missing_file_says_where_to_get_it(tmp_path):
    path = tmp_path / "tokenizers" / "dall_e" / "encoder.pkl"
    with pytest.raises(FileNotFoundError) as err:
        DallETokenizer(path)
    for needle in (str(path), "docs/tokenizers.md", "cdn.openai.com/dall-e/encoder.pkl"):
        assert needle in str(err.value)


def test_config_mismatch_names_both_values(dall_e_encoder_pkl):
    with pytest.raises(ValueError, match="vocab_size=8192 in the config but 64 in the file"):
        DallETokenizer(dall_e_encoder_pkl, input_size=32, n_hid=16, n_blk_per_group=1)


def test_incomplete_state_dict_lists_the_problems(dall_e_tokenizer, dall_e_tiny_kwargs, tmp_path):
    state = dict(dall_e_tokenizer.encoder.state_dict())
    del state["blocks.group_2.block_1.res_path.conv_3.bias"]
    state["blocks.group_2.block_1.extra.weight"] = torch.zeros(1)
    state["blocks.group_3.block_1.res_path.conv_1.weight"] = torch.zeros(1, 1, 3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        DallETokenizer(tmp_path / "bad.pt", input_size=32, **dall_e_tiny_kwargs)
    msg = str(err.value)
    assert "missing 'blocks.group_2.block_1.res_path.conv_3.bias'" in msg
    assert "unexpected 'blocks.group_2.block_1.extra.weight'" in msg
    assert "'blocks.group_3.block_1.res_path.conv_1.weight' is (1, 1, 3, 3)" in msg


def test_wrong_input_shape_and_precision_are_clear(dall_e_tokenizer, dall_e_encoder_pkl):
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        dall_e_tokenizer.encode(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="precision"):
        DallETokenizer(dall_e_encoder_pkl, input_size=32, precision="fp8")
    with pytest.raises(ValueError, match="divisible by 8"):
        DallETokenizer(dall_e_encoder_pkl, input_size=36)


def test_encode_under_inference_mode_gives_usable_targets(dall_e_tokenizer):
    x = dall_e_tokenizer.preprocess(_images(2))
    with torch.inference_mode():
        ids = dall_e_tokenizer.encode(x)
    assert not ids.is_inference()
    logits = torch.randn(ids.numel(), 64, requires_grad=True)
    F.cross_entropy(logits, ids.flatten()).backward()  # inference tensors would refuse this
    assert logits.grad is not None


def test_bfloat16_autocast_keeps_float32_logits(dall_e_encoder_pkl, dall_e_tiny_kwargs):
    tok = DallETokenizer(
        dall_e_encoder_pkl, input_size=32, precision="bfloat16", **dall_e_tiny_kwargs
    )
    x = tok.preprocess(_images(2))
    assert tok.logits(x).dtype == torch.float32
    assert tok.encode(x).dtype == torch.int64


# --- unsafe files: refused, and nothing runs -----------------------------------------------------


class _Payload:
    """Pickles as ``func(arg)``: what a malicious file would run on a plain ``pickle.load``."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def _payloads(marker):
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "exec": _Payload(builtins.exec, touch),
        "eval": _Payload(builtins.eval, touch),
    }


def test_payload_is_live_under_plain_pickle(tmp_path):
    """Control: the payloads used below really would create the marker if unpickled naively."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(_payloads(marker)["exec"]))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "exec", "eval"])
@pytest.mark.parametrize("where", ["bare", "inside_encoder"])
def test_malicious_pickle_is_refused_and_runs_nothing(
    kind, where, tmp_path, dall_e_reference, dall_e_tiny_kwargs
):
    marker = tmp_path / "PWNED"
    payload = _payloads(marker)[kind]
    if where == "bare":
        obj = payload
    else:  # a genuine-looking encoder.pkl that carries the payload as an attribute
        obj = dall_e_reference(0, **dall_e_tiny_kwargs)
        obj.innocent_attribute = payload
    torch.save(obj, tmp_path / "encoder.pkl")
    with pytest.raises(CheckpointError, match="refused"):
        DallETokenizer(tmp_path / "encoder.pkl", input_size=32, **dall_e_tiny_kwargs)
    assert not marker.exists()


class _UnknownModule(torch.nn.Module):
    pass


def test_unknown_module_classes_are_refused(tmp_path, dall_e_reference, dall_e_tiny_kwargs):
    enc = dall_e_reference(0, **dall_e_tiny_kwargs)
    enc.blocks.output.relu = torch.nn.GELU()
    torch.save(enc, tmp_path / "gelu.pkl")
    with pytest.raises(CheckpointError, match="GELU"):
        DallETokenizer(tmp_path / "gelu.pkl", input_size=32, **dall_e_tiny_kwargs)
    torch.save(_UnknownModule(), tmp_path / "unknown.pkl")
    with pytest.raises(CheckpointError, match="_UnknownModule"):
        DallETokenizer(tmp_path / "unknown.pkl", input_size=32, **dall_e_tiny_kwargs)


def test_allowed_class_misused_as_a_call_is_refused(tmp_path, dall_e_tiny_kwargs):
    from dall_e.encoder import Encoder

    torch.save(_Payload(Encoder, "not a module"), tmp_path / "call.pkl")
    with pytest.raises(CheckpointError):
        DallETokenizer(tmp_path / "call.pkl", input_size=32, **dall_e_tiny_kwargs)


def test_other_files_are_refused_clearly(tmp_path, dall_e_encoder_pkl, dall_e_tiny_kwargs):
    torch.save(torch.nn.Sequential(torch.nn.ReLU()), tmp_path / "seq.pkl")
    with pytest.raises(CheckpointError, match="not a dall_e.encoder.Encoder"):
        DallETokenizer(tmp_path / "seq.pkl", input_size=32, **dall_e_tiny_kwargs)
    data = dall_e_encoder_pkl.read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        DallETokenizer(tmp_path / "cut.pkl", input_size=32, **dall_e_tiny_kwargs)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a DALL-E encoder"):
        DallETokenizer(tmp_path / "other.pt", input_size=32, **dall_e_tiny_kwargs)


def test_config_keys_are_the_signature(dall_e_encoder_pkl, dall_e_tiny_kwargs):
    import inspect
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    yaml = Path(__file__).resolve().parents[3] / "configs" / "tokenizer" / "dall_e.yaml"
    cfg = OmegaConf.load(yaml)
    params = set(inspect.signature(DallETokenizer).parameters)
    assert set(cfg) - {"_target_"} == params
    assert cfg.input_size == 112 and cfg.vocab_size == 8192
    raw = OmegaConf.to_container(cfg)  # unresolved
    assert raw["weights_path"] == "${paths.tokenizers_dir}/dall_e/encoder.pkl"
    cfg.weights_path, cfg.input_size = str(dall_e_encoder_pkl), 32
    cfg.update(dall_e_tiny_kwargs)
    tok = instantiate(cfg)
    assert isinstance(tok, DallETokenizer) and tok.grid_size == (4, 4)


def test_attributes_must_agree_with_tensors(tmp_path, dall_e_reference, dall_e_tiny_kwargs):
    """A crafted n_hid=10**9 must not make us build a huge model: shapes are the authority."""
    enc = dall_e_reference(0, **dall_e_tiny_kwargs)
    enc.n_hid = 10**9
    torch.save(enc, tmp_path / "encoder.pkl")
    with pytest.raises(CheckpointError, match=r"inconsistent.*n_hid \(1000000000 vs 16\)"):
        DallETokenizer(tmp_path / "encoder.pkl", input_size=32, **dall_e_tiny_kwargs)
