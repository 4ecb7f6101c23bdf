"""Packaging: the builders are inside the package, not a top-level `datasets`."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_builders_are_part_of_the_package():
  # Run from the clone (a notebook's working directory, pytest's rootdir), the
  # package imports from the source tree: the builders must be in it, and no
  # top-level `datasets` may shadow Hugging Face's.
  import apnet_jax.datasets

  folder = pathlib.Path(apnet_jax.datasets.__file__).resolve().parent
  assert folder == ROOT / "apnet_jax" / "datasets"
  assert not (ROOT / "datasets").exists()

