"""reid_folder TFDS builder: a re-ID dataset of one's own images."""

from .reid_folder_dataset_builder import Builder, UnmatchedQueryWarning

__all__ = ["Builder", "UnmatchedQueryWarning"]
