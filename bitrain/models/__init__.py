"""Models: the BEiT masked-image-modeling encoder and checkpoint import/export.

``bitrain.models`` depends on torch, timm, safetensors and :mod:`bitrain.io` only.
"""

from bitrain.models.beit import BeitMIM

__all__ = ["BeitMIM"]
