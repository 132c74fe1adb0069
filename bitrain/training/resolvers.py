"""bitrain's OmegaConf resolvers, registered by the entry points (never by importing a module).

``${div:a,b}`` (a // b: grid size from image and patch size), ``${latest_checkpoint:TASK}`` (the
newest ``outputs/TASK/<run>/checkpoints/last.ckpt``), ``${required:KEY=WHAT}`` (fails naming the
key when it is not overridden) and ``${run_dir:NAME}`` (the run directory's name:
:func:`bitrain.training.rundir.run_dir_name`). :func:`hydra_main` is ``hydra.main`` for bitrain's
entry points: it registers them before Hydra composes the config; code that composes a config
itself (the doctor, tests) calls :func:`register_resolvers` first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import OmegaConf

from bitrain.training.resume import latest_checkpoint
from bitrain.training.rundir import run_dir_name

__all__ = ["RESOLVERS", "hydra_main", "register_resolvers"]


def _required(what: str) -> str:
    raise ValueError(f"missing a value this config needs: give {what}")


RESOLVERS: dict[str, Callable[..., Any]] = {
    "div": lambda a, b: int(a) // int(b),
    "latest_checkpoint": lambda task, *, _root_: latest_checkpoint(task, _root_.paths.log_dir),
    "required": _required,
    "run_dir": lambda name=None: run_dir_name(name),
}


def register_resolvers() -> None:
    """Register :data:`RESOLVERS` with OmegaConf (idempotent)."""
    for name, resolver in RESOLVERS.items():
        OmegaConf.register_new_resolver(name, resolver, replace=True)


def hydra_main(config_name: str, config_path: str = "../configs") -> Callable:
    """``@hydra.main(version_base="1.3", ...)`` that registers :data:`RESOLVERS` first.

    ``config_path`` is relative to the decorated function's file (Hydra's rule), which for the
    entry points in ``bitrain/`` is the repository's ``configs/``.
    """

    def decorate(task_function: Callable) -> Callable:
        composed = hydra.main(version_base="1.3", config_path=config_path, config_name=config_name)(
            task_function
        )

        @functools.wraps(task_function)
        def main(*args: Any, **kwargs: Any) -> Any:
            register_resolvers()
            return composed(*args, **kwargs)

        return main

    return decorate
