"""Synthetic re-ID TFDS builder (no download)."""

from .synthetic_reid_dataset_builder import Builder, SyntheticReidConfig

__all__ = ["Builder", "SyntheticReidConfig"]
