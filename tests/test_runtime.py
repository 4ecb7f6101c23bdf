"""The accelerator guard: an unused GPU or TPU stops a notebook with the fix, not a slow run."""

import os
import subprocess
import sys

import jax
import pytest

from apnet_jax import runtime


def test_the_guard_raises_exactly_when_the_machine_has_an_accelerator():
  # conftest puts JAX on the CPU, so an accelerator the OS shows goes unused.
  assert jax.default_backend() == "cpu"
  if runtime.machine_accelerator() is None:
    assert runtime.check_accelerator() == "cpu"
  else:
    with pytest.raises(runtime.AcceleratorNotUsedError):
      runtime.check_accelerator()


def _installed(versions):
  return lambda name: versions.get(name)


def test_a_plugin_left_behind_names_both_versions_and_the_fix(monkeypatch):
  monkeypatch.setattr(
    runtime, "_installed", _installed({"jaxlib": "0.10.2", "jax-cuda12-plugin": "0.7.2"})
  )
  with pytest.raises(
    runtime.AcceleratorNotUsedError, match=r"GPU.*jax-cuda12-plugin 0\.7\.2.*jaxlib 0\.10\.2"
  ) as error:
    runtime.check_accelerator(lambda: "gpu")
  assert f'pip install "jax[cuda12]=={jax.__version__}"' in str(error.value)


def test_a_missing_plugin_is_named(monkeypatch):
  monkeypatch.setattr(runtime, "_installed", _installed({"jaxlib": jax.__version__}))
  with pytest.raises(
    runtime.AcceleratorNotUsedError, match=r"GPU.*jax-cuda12-plugin.*jax\[cuda12\]"
  ):
    runtime.check_accelerator(lambda: "gpu")
  with pytest.raises(runtime.AcceleratorNotUsedError, match=r"TPU.*libtpu.*jax\[tpu\]"):
    runtime.check_accelerator(lambda: "tpu")


def test_describe_names_the_backend_and_devices():
  text = runtime.describe()
  assert f"jax {jax.__version__}" in text
  assert "backend: cpu" in text
  assert f"devices: {jax.device_count()} x" in text


@pytest.mark.gpu
def test_a_gpu_machine_passes_the_guard():
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  out = subprocess.run(
    [sys.executable, "-c", "from apnet_jax import runtime; print(runtime.check_accelerator())"],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )
  assert out.stdout.split()[-1] == "gpu"
