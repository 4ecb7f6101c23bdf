"""MSMT17 TFDS builder."""

from .msmt17_dataset_builder import Builder

__all__ = ["Builder"]
