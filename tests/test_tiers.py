"""The README's test tiers select what they say: `pytest -m "not slow"` leaves out
the slow tests, and only a -m expression that names `gpu` runs the GPU tests."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = ("tests/test_runtime.py", "tests/test_parity.py")  # a gpu test, and slow and fast ones
GPU_TEST = "tests/test_runtime.py::test_a_gpu_machine_passes_the_guard"


def _collected(*args):
  out = subprocess.run(
    [sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0", *args, *FILES],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stdout + out.stderr
  return {line for line in out.stdout.splitlines() if "::" in line}


@pytest.mark.slow  # starts pytest four times
def test_the_tiers_select_what_the_readme_says():
  everything, fast = _collected(), _collected("-m", "not slow")
  slow, gpu = _collected("-m", "slow"), _collected("-m", "gpu")
  assert gpu == {GPU_TEST}
  assert GPU_TEST not in everything | fast | slow  # a machine without one never runs it
  assert slow and fast and not slow & fast
  assert slow | fast == everything
