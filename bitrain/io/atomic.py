"""Atomic writes: a crash or a full disk never leaves a half-written file under the final name.

:func:`atomic_save` (``torch.save``) and :func:`atomic_write_bytes` write through a temporary file
in the same directory, ``fsync`` and ``os.replace``; a full disk is reported as such (directory,
free space, the previous file kept), and the file gets the umask's mode, as ``open`` would give it.
:func:`plain_tree` turns config trees into the plain containers such files hold.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "atomic_write_bytes", "plain_tree"]


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
