"""Market-1501 TFDS builder."""

from .market1501_dataset_builder import Builder

__all__ = ["Builder"]
