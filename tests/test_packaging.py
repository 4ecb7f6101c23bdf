"""Packaging: every package folder is installed, and `datasets/` is not `datasets`."""

import pathlib

try:
  import tomllib
except ImportError:  # Python 3.10
  import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
  config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  listed = set(config["packages"])
  mapping = config["package-dir"]
  found = set()
  for package, folder in mapping.items():
    for init in (ROOT / folder).rglob("__init__.py"):
      relative = init.parent.relative_to(ROOT / folder)
      if "dummy_data" in relative.parts:
        continue
      found.add(".".join([package, *relative.parts]))
  assert found == listed


def test_builders_install_as_apnet_jax_datasets():
  import apnet_jax.datasets

  assert pathlib.Path(apnet_jax.datasets.__file__).resolve().parent == ROOT / "datasets"
