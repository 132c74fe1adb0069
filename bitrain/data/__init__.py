"""Data for bitrain: sources (decode to RGB PIL), transforms (views), masks, Lightning data modules.

``bitrain.data`` imports torch, torchvision, PIL, numpy, webdataset and lightning only: sizes come
from the config (interpolation), never from a model or a tokenizer. See docs/data.md.
"""

from bitrain.data.datamodule import ImageDataModule, PretrainDataModule, collate_drop_none
from bitrain.data.masking import BlockwiseMaskGenerator
from bitrain.data.sources import (
    DemoSource,
    ImageFolderSource,
    SyntheticSource,
    WebDatasetSource,
)
from bitrain.data.transforms import SingleViewTransform, TwoViewTransform

__all__ = [
    "BlockwiseMaskGenerator",
    "DemoSource",
    "ImageDataModule",
    "ImageFolderSource",
    "PretrainDataModule",
    "SingleViewTransform",
    "SyntheticSource",
    "TwoViewTransform",
    "WebDatasetSource",
    "collate_drop_none",
]
