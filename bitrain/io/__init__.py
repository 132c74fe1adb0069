"""Safe file I/O: what bitrain reads may come from strangers, what it writes must survive a crash.

* :mod:`.untrusted`: :func:`load_torch_file` (``torch.load(weights_only=True)``),
  :func:`load_pickled_module` (a pickled ``nn.Module`` such as DALL-E's ``encoder.pkl`` through the
  weights-only unpickler, its classes mapped to an inert record type), :class:`CheckpointError`.
* :mod:`.atomic`: :func:`atomic_save` / :func:`atomic_write_bytes` (temp file + fsync +
  ``os.replace``; a full disk reported as such), :func:`plain_tree`.
"""

from bitrain.io.atomic import atomic_save, atomic_write_bytes, plain_tree
from bitrain.io.untrusted import (
    CheckpointError,
    PickledModule,
    flatten_module_state,
    load_pickled_module,
    load_torch_file,
)

__all__ = [
    "CheckpointError",
    "PickledModule",
    "atomic_save",
    "atomic_write_bytes",
    "flatten_module_state",
    "load_pickled_module",
    "load_torch_file",
    "plain_tree",
]
