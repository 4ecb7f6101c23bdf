"""DukeMTMC-reID TFDS builder."""

from .dukemtmc_reid_dataset_builder import Builder

__all__ = ["Builder"]
