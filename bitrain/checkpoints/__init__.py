"""Every checkpoint format in and out: bitrain, official unilm BEiT, Hugging Face, timm.

The public API (stable: scripts and users import from here)::

    sniff(path) -> Sniffed(format, kind, ...)      # one read: format and kind of any checkpoint
    load_mim_model(path) / save_mim_model(model, path, format)        # BEiT MIM (BeitMIM)
    load_classifier(path) / save_classifier(model, path, format)      # timm classifiers
    load_encoder_state(path) -> (state_dict, format)                  # weights for fine-tuning
    build_classifier(model_name, num_classes, pretrained=...)         # the fine-tuning model node
    convert(src, dst, dst_format, force=False)                        # verified, never destructive

One key table per foreign format, read backwards for export: :mod:`.official` (unilm ``.pth``),
:mod:`.hf` (Hugging Face BEiT, MIM and classifier from one table; ViT; BiT; folders and configs),
:mod:`.huggingface` Hugging Face folders in and out,
:mod:`.classifier` the timm hub folder layout, :mod:`.normalization` what any file records about its
pixels. Dependencies run one way (``checkpoints`` -> ``models``, ``data.preprocessing``, ``io``).
Every file is data: read weights-only, and no content of a file picks code to run
(docs/checkpoints.md).
"""

from bitrain.checkpoints.classifier import CLASSIFIER_FORMATS, load_classifier, save_classifier
from bitrain.checkpoints.conversion import ALL_FORMATS, ConversionError, Converted, convert
from bitrain.checkpoints.mim import (
    FORMATS,
    build_mim_model,
    load_mim_model,
    load_mim_state,
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
    "build_mim_model",
    "convert",
    "load_classifier",
    "load_encoder_state",
    "load_mim_model",
    "load_mim_state",
    "load_pretrained",
    "save_classifier",
    "save_mim_model",
    "sniff",
]
