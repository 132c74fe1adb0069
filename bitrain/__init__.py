"""bitrain: BEiT-style masked image modeling and fine-tuning on Hydra + Lightning + timm."""

__version__ = "0.1.0"
