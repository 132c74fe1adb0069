"""Importing a bitrain module changes nothing global: no resolver, warning filter or log handler.

The entry points register the config resolvers (:mod:`bitrain.training.resolvers`) and scope their
warning filters to the call that needs them; a library user who imports, say,
``bitrain.checkpoints`` gets none of it. Runs in a fresh interpreter, after importing the
third-party libraries bitrain uses (their own import-time filters are theirs, not ours).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

_PROBE = r"""
import importlib, json, logging, pkgutil, warnings
for lib in ("numpy", "PIL.Image", "torch", "torchvision", "lightning", "lightning.pytorch",
            "lightning.fabric", "timm", "hydra", "omegaconf", "webdataset", "einops",
            "torchmetrics", "safetensors.torch", "matplotlib", "matplotlib.pyplot"):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
from omegaconf import OmegaConf
from bitrain.training.resolvers import RESOLVERS
import bitrain
filters = list(warnings.filters)
handlers = list(logging.getLogger().handlers)
level = logging.getLogger().level
names = sorted(m.name for m in pkgutil.walk_packages(bitrain.__path__, "bitrain."))
for name in names:
    importlib.import_module(name)
print(json.dumps({
    "modules": len(names),
    "resolvers": [r for r in RESOLVERS if OmegaConf.has_resolver(r)],
    "new_filters": [str(f) for f in warnings.filters if f not in filters],
    "new_handlers": [repr(h) for h in logging.getLogger().handlers if h not in handlers],
    "root_level_changed": logging.getLogger().level != level,
}))
"""


def test_importing_every_module_installs_nothing():
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300, check=True
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["modules"] > 50  # the walk saw the packages, not just bitrain/__init__
    assert found["resolvers"] == [], f"registered by importing a module: {found['resolvers']}"
    assert found["new_filters"] == [], (
        f"warning filters installed on import: {found['new_filters']}"
    )
    assert found["new_handlers"] == [] and not found["root_level_changed"]


def test_entry_points_register_the_resolvers(tmp_path, monkeypatch):
    """``hydra_main`` registers the resolvers before Hydra composes: ``${div:...}`` resolves."""
    from omegaconf import OmegaConf

    from bitrain.training.resolvers import RESOLVERS, hydra_main, register_resolvers

    seen = []

    @hydra_main("pretrain", config_path=str(CONFIGS))
    def main(cfg):
        seen.append(int(cfg.masking.input_size))  # ${div:${model.img_size},${model.patch_size}}

    for name in RESOLVERS:
        OmegaConf.clear_resolver(name)
    monkeypatch.setattr(
        sys, "argv", ["pretrain", f"hydra.run.dir={tmp_path / 'run'}", "hydra/job_logging=none"]
    )
    try:
        main()
    finally:
        register_resolvers()  # the other tests compose configs without an entry point
    assert seen == [4]  # the demo: 32 px images, 8 px patches
