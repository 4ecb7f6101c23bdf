"""The project's one style: ruff's lint rules and formatter, as pyproject.toml sets them."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def ruff(*args):
  return subprocess.run(
    [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, check=False
  )


def test_ruff_finds_nothing_to_lint():
  result = ruff("check", "--no-cache", "--output-format", "concise", ".")
  assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_is_formatted_as_ruff_formats_it():
  result = ruff("format", "--no-cache", "--check", ".")
  assert result.returncode == 0, "run `ruff format .`:\n" + result.stdout + result.stderr
