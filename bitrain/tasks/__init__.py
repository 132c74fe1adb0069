"""LightningModules: the training tasks that join models, tokenizers and data."""
