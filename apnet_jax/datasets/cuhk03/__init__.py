"""CUHK03 (767/700 protocol) TFDS builder."""

from .cuhk03_dataset_builder import Builder

__all__ = ["Builder"]
