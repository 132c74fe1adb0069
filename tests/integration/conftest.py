"""Helpers for integration tests: compose a config into tmp_path and run it like the entry point."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def compose_cfg():
    def _compose(name, overrides, out_dir):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(name, overrides=[*overrides, f"paths.output_dir={out_dir}"])

    return _compose


@pytest.fixture(scope="session")
def demo_tokenizer_file(tmp_path_factory):
    """A random dVAE with the demo's shapes (32 px, 4x4 grid, 512 codes), saved as bitrain does."""
    import torch

    from bitrain.tokenizers.dvae import DiscreteVAE, save_dvae

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "demo_dvae.pt"
    save_dvae(DiscreteVAE(vocab_size=512, input_size=32, num_downsamples=3), path)
    return path
