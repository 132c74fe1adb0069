"""Safe file I/O: atomic writes, weights-only loading, and a restricted loader for pickled modules.

Every file bitrain reads may come from somewhere else (a downloaded checkpoint, a colleague's run,
OpenAI's ``encoder.pkl``), so nothing is unpickled with ``weights_only=False``:

* :func:`load_torch_file` is ``torch.load(weights_only=True)``; official BEiT ``.pth`` files that
  carry an ``argparse.Namespace`` under ``args`` are admitted by allow-listing that one class.
* :func:`load_pickled_module` reads a *pickled ``nn.Module``* (DALL-E's ``encoder.pkl``) through the
  same weights-only unpickler, with the module classes the file names mapped to an inert record
  type. Nothing from the file is imported or executed: the result is a tree of plain dicts and
  tensors that the caller copies into its own native module.
* :func:`atomic_save` writes through a temporary file in the same directory and ``os.replace``,
  so a crash or a full disk never leaves a half-written file under the final name; a full disk
  is reported as such (directory, free space), and the file gets the umask's mode, as ``open``.
"""

from __future__ import annotations

import argparse
import errno
import io
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "PickledModule",
    "atomic_save",
    "atomic_write_bytes",
    "load_pickled_module",
    "load_torch_file",
    "flatten_module_state",
    "plain_tree",
]


class CheckpointError(RuntimeError):
    """A weights file is missing, corrupt, unsafe, or not the format that was expected."""


def plain_tree(value: Any) -> Any:
    """Plain dicts / lists of a (possibly OmegaConf) tree, for ``weights_only`` files and JSON.

    Unlike :func:`bitrain.tasks.common.plain` (an OmegaConf node -> containers, for
    hyper-parameters), it also walks plain mappings holding config nodes, turns tuples into lists
    and keys into strings.
    """
    if isinstance(value, Mapping):
        return {str(k): plain_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "ListConfig":
        return [plain_tree(v) for v in value]
    return value


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + ``os.replace``)."""
    return _atomic(path, lambda f: f.write(data))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically; the old file stays until the new is whole."""
    return _atomic(path, lambda f: torch.save(obj, f))


def _umask() -> int:
    """The process's umask (Linux: read from /proc, else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(err: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT ``OSError`` behind ``err``, if any.

    torch's zip writer turns a failed ``write`` into ``RuntimeError: ... unexpected pos``; the
    ``OSError`` is kept only as its context.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        err = err.__cause__ or err.__context__
    return None


def _atomic(path: str | os.PathLike, write: Callable[[io.BufferedWriter], Any]) -> Path:
    """Write through a temp file in the same directory, fsync, ``os.replace``.

    The file gets the mode ``open()`` would give it (0o666 less the umask), not ``mkstemp``'s
    0o600, so colleagues who share the run directory can read checkpoints and exports.

    Raises:
        OSError: ENOSPC/EDQUOT with a message naming the directory and its free space; the
            previous file under ``path`` (if any) is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        full = _disk_full(err)
        if full is None:
            raise
        free = shutil.disk_usage(path.parent).free
        kept = (
            f"the previous {path.name} is kept as it was"
            if path.exists()
            else f"nothing was written as {path.name}"
        )
        raise OSError(
            full.errno,
            f"no space left on {path.parent} while writing {path.name} ({free / 2**20:.1f} MiB "
            f"free there): {kept}. Free some space, or point paths.log_dir (or the output path) "
            "to a larger disk",
        ) from err
    return path


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
        mmap: map the tensors' storage instead of reading it (``torch.load(mmap=True)``): reading
            only the records of a multi-GB checkpoint costs next to nothing. Files in torch's old
            (non-zip) format cannot be mapped and are read.

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
