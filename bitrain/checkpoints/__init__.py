"""Every checkpoint format in and out: bitrain, official unilm BEiT, Hugging Face, timm.

The public API (stable: scripts and users import from here)::

    sniff(path) -> Sniffed(format, kind, ...)      # one read: format and kind of any checkpoint
    load_mim_model(path) / save_mim_model(model, path, format)        # BEiT MIM (BeitMIM)
    load_classifier(path) / save_classifier(model, path, format)      # timm classifiers
    load_encoder_state(path) -> (state_dict, format)                  # weights for fine-tuning
    build_classifier(model_name, num_classes, pretrained=...)         # the fine-tuning model node
    recorded_normalization(path) -> (mean, std) | None                # what a file says of pixels
    convert(src, dst, dst_format, force=False)                        # verified, never destructive

:mod:`.formats` reads and writes every format for both kinds, with one key table per foreign
format, read backwards for export: :mod:`.official` (unilm ``.pth``) and :mod:`.hf` (Hugging Face
BEiT, ViT and BiT). Dependencies run one way (``checkpoints`` -> ``models``, ``data.preprocessing``,
``io``). Every file is data: read weights-only, and no content of a file picks code to run
(docs/checkpoints.md).
"""

from bitrain.checkpoints.conversion import ALL_FORMATS, ConversionError, Converted, convert
from bitrain.checkpoints.formats import (
    CLASSIFIER_FORMATS,
    FORMATS,
    load_classifier,
    load_mim_model,
    normalization_record,
    recorded_normalization,
    save_classifier,
    save_mim_model,
)
from bitrain.checkpoints.pretrained import (
    adapt_state_dict,
    build_classifier,
    load_encoder_state,
    load_pretrained,
)
from bitrain.checkpoints.sniff import Sniffed, sniff
from bitrain.io import CheckpointError

__all__ = [
    "ALL_FORMATS",
    "CLASSIFIER_FORMATS",
    "FORMATS",
    "CheckpointError",
    "ConversionError",
    "Converted",
    "Sniffed",
    "adapt_state_dict",
    "build_classifier",
    "convert",
    "load_classifier",
    "load_encoder_state",
    "load_mim_model",
    "load_pretrained",
    "normalization_record",
    "recorded_normalization",
    "save_classifier",
    "save_mim_model",
    "sniff",
]
