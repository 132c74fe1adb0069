"""Reading files that may come from anyone: weights-only loading and a restricted unpickler.

Every file bitrain reads may come from somewhere else (a downloaded checkpoint, a colleague's run,
OpenAI's ``encoder.pkl``), so nothing is unpickled with ``weights_only=False``:

* :func:`load_torch_file` is ``torch.load(weights_only=True)``; official BEiT ``.pth`` files that
  carry an ``argparse.Namespace`` under ``args`` are admitted by allow-listing that one class.
* :func:`load_pickled_module` reads a *pickled ``nn.Module``* (DALL-E's ``encoder.pkl``) through the
  same weights-only unpickler, with the module classes the file names mapped to an inert record
  type. Nothing from the file is imported or executed: the result is a tree of plain dicts and
  tensors that the caller copies into its own native module.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "PickledModule",
    "load_pickled_module",
    "load_torch_file",
    "flatten_module_state",
]


class CheckpointError(RuntimeError):
    """A weights file is missing, corrupt, unsafe, or not the format that was expected."""


def _require_file(path: str | os.PathLike, what: str, hint: str | None) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"{what} not found: expected a file at '{path}'"
        if path.is_dir():
            msg = f"{what}: '{path}' is a directory, expected a file"
        raise FileNotFoundError(msg + (f". {hint}" if hint else ""))
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"{what} '{path}' is empty (0 bytes): the file is truncated or was never written."
        )
    return path


def load_torch_file(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    allow_namespace: bool = False,
    what: str = "checkpoint",
    hint: str | None = None,
    mmap: bool = False,
) -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors.

    Args:
        path: a file written by ``torch.save``.
        map_location: where tensors go.
        allow_namespace: also admit ``argparse.Namespace`` (official BEiT checkpoints keep their
            command line under ``args``). Its attributes are plain values, so this runs no code.
        what: what the file is, for error messages.
        hint: appended to the "not found" message (e.g. where to get the file).
        mmap: map the tensors' storage instead of reading it (``torch.load`` with
            ``weights_only=True`` and ``mmap=True``): reading only the records of a multi-GB
            checkpoint costs next to nothing. Files in torch's old (non-zip) format cannot be
            mapped and are read.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupt, or needs classes that are not allowed.
    """
    path = _require_file(path, what, hint)
    allowed = [argparse.Namespace] if allow_namespace else []
    with torch.serialization.safe_globals(allowed):
        if mmap and zipfile.is_zipfile(path):
            return _guarded_load(path, what, "tensors and plain containers", map_location, True)
        return _guarded_load(path, what, "tensors and plain containers", map_location)


class PickledModule:
    """Inert stand-in for an ``nn.Module`` class named in a pickle.

    The weights-only unpickler creates it with ``__new__`` and hands it the module's ``__dict__``
    (``_parameters``, ``_buffers``, ``_modules`` and plain attributes); nothing of the original
    class runs. ``class_path`` records which class the file named.
    """

    class_path: str = ""

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state)

    def __repr__(self) -> str:
        return f"PickledModule({self.class_path})"


def _stub_for(class_path: str) -> type[PickledModule]:
    return type("PickledModule", (PickledModule,), {"class_path": class_path})


def load_pickled_module(
    path: str | os.PathLike,
    module_classes: Iterable[str],
    *,
    what: str = "pickled module",
    hint: str | None = None,
    allow_state_dict: bool = False,
) -> PickledModule | dict[str, Any]:
    """Read a pickled ``nn.Module`` without importing or running anything from the file.

    Args:
        path: a file written by ``torch.save(module)``.
        module_classes: fully qualified class names the file may contain (e.g.
            ``"dall_e.encoder.Encoder"``, ``"torch.nn.modules.container.Sequential"``). Each is
            mapped to an inert :class:`PickledModule`; any other global is refused.
        what: what the file is, for error messages.
        hint: appended to the "not found" message (e.g. where to get the file).
        allow_state_dict: also accept a file that holds a plain mapping (a state dict written by
            ``torch.save(module.state_dict())``) and return it as a ``dict``, so one read serves
            callers that accept either format.

    Returns:
        The root :class:`PickledModule` (walk it with :func:`flatten_module_state`), or the
        mapping when ``allow_state_dict`` is set and the file holds one.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupt, names any other global, or holds
            something other than a pickled module (or mapping, if allowed).
    """
    path = _require_file(path, what, hint)
    stubs = [(_stub_for(name), name) for name in module_classes]
    with torch.serialization.safe_globals(stubs):
        root = _guarded_load(path, what, "the module classes such a file may contain")
    if isinstance(root, PickledModule):
        if not isinstance(getattr(root, "state", None), dict):
            raise CheckpointError(
                f"{what} '{path}' names {root.class_path} but carries no module state; "
                "the file is damaged or was not written by torch.save(module)"
            )
        return root
    if allow_state_dict and isinstance(root, Mapping):
        return dict(root)
    raise CheckpointError(
        f"{what} '{path}' holds a {type(root).__name__}, not a pickled module; "
        "if it is a state dict, load it as one"
    )


def flatten_module_state(root: PickledModule, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a :class:`PickledModule` tree to a ``state_dict``-style ``{dotted.name: tensor}``.

    Raises:
        CheckpointError: a node's ``_parameters``/``_buffers``/``_modules`` is not a mapping, or a
            parameter or buffer is not a tensor (a damaged or hand-crafted file).
    """
    out: dict[str, torch.Tensor] = {}
    state = getattr(root, "state", None)
    if not isinstance(state, dict):
        raise CheckpointError(f"pickled module '{prefix or '<root>'}' carries no module state")
    for group in ("_parameters", "_buffers", "_modules"):
        if not isinstance(state.get(group) or {}, Mapping):
            raise CheckpointError(
                f"pickled module '{prefix or '<root>'}': {group} is a "
                f"{type(state[group]).__name__}, expected a mapping (damaged or crafted file)"
            )
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    f"pickled module entry '{prefix}{name}' is a {type(value).__name__}, "
                    "expected a tensor (damaged or crafted file)"
                )
            out[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, PickledModule):
            out.update(flatten_module_state(child, prefix=f"{prefix}{name}."))
    return out


def _guarded_load(
    path: Path,
    what: str,
    allowed: str,
    map_location: str | torch.device = "cpu",
    mmap: bool = False,
) -> Any:
    """``torch.load(weights_only=True)`` under the caller's allow-list.

    Every failure becomes a :class:`CheckpointError` that says whether the file was refused (it
    names a global outside the allow-list) or unreadable (truncated, corrupt, not a torch file).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        reason = _reason(err)
        if _REFUSED.search(reason):
            raise CheckpointError(
                f"refused to load {what} '{path}': it references something other than "
                f"{allowed}, and bitrain never runs code from a weights file, so nothing from "
                f"it was run ({reason})"
            ) from None  # torch's own text would advise weights_only=False: never shown
        raise CheckpointError(
            f"could not read {what} '{path}': it is not a file written by torch.save, or it "
            f"is corrupt ({reason})"
        ) from None
    except Exception as err:  # noqa: BLE001 - anything a damaged or hostile file raises
        raise CheckpointError(
            f"could not read {what} '{path}': the file is truncated, corrupt or not a torch "
            f"file ({type(err).__name__}: {_reason(err)})"
        ) from None


# Messages of torch's weights-only unpickler that mean "this file asks for something not allowed".
_REFUSED = re.compile(r"GLOBAL|global|reduce for|Can only|allowlist|blocked")
_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file", "(1)", "(2)")


def _reason(err: BaseException) -> str:
    """The informative line of an error: torch's weights-only errors wrap it in boilerplate."""
    # torch's advice to re-run with weights_only=False would run the file's code: never repeated
    lines = [
        line.strip()
        for line in str(err).strip().splitlines()
        if line.strip() and "weights_only" not in line
    ]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            if rest or i + 1 < len(lines):
                return (rest or lines[i + 1])[:400]
    lines = [line for line in lines if not line.startswith(_BOILERPLATE)] or lines
    return lines[0][:400] if lines else type(err).__name__
