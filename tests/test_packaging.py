"""Packaging: the builders are inside the package, and the dependency ranges' floors
are the versions CI tests them at."""

import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_builders_are_part_of_the_package():
  # Run from the clone (a notebook's working directory, pytest's rootdir), the
  # package imports from the source tree: the builders must be in it, and no
  # top-level `datasets` may shadow Hugging Face's.
  import apnet_jax.datasets

  folder = pathlib.Path(apnet_jax.datasets.__file__).resolve().parent
  assert folder == ROOT / "apnet_jax" / "datasets"
  assert not (ROOT / "datasets").exists()


def _floors(requirements):
  """{name: floor} of requirements written ``name>=floor[,<top]``; other forms fail."""
  floors = {}
  for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9.]+)(,<[0-9.]+)?", requirement)
    assert match, f"{requirement!r}: write ranges as name>=floor[,<top] so CI can pin the floor"
    floors[match.group(1).lower()] = match.group(2)
  return floors


def _pins(path):
  pins = {}
  for line in path.read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      name, version = line.split("==")
      pins[name.lower()] = version
  return pins


def _same_version(a, b):
  pad = lambda v: tuple(int(x) for x in v.split(".")) + (0,) * (3 - v.count(".") - 1)  # noqa: E731
  return pad(a) == pad(b)


def test_ci_tests_every_range_at_its_floor():
  floors = _floors(PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"])
  pins = _pins(ROOT / ".ci" / "floor.txt")
  pins.pop("jaxlib")  # jax pins its own jaxlib; listed so that pip cannot move it
  assert sorted(pins) == sorted(floors)
  for name, floor in floors.items():
    assert _same_version(pins[name], floor), (name, pins[name], floor)
