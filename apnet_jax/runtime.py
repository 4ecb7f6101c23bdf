"""What JAX computes on, and a guard against an accelerator it cannot see.

On a notebook runtime with a GPU, JAX uses it only through a CUDA plugin
(``jax-cuda12-plugin``) of exactly the installed jaxlib's version. An install
that upgrades jax/jaxlib leaves Colab's plugin behind; JAX then only warns
and computes on the CPU, a hundred times slower, without failing. The same
holds for a TPU runtime and ``libtpu``. `check_accelerator` turns that into
an error that says why and what to run.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
from collections.abc import Callable

import jax

__all__ = ["AcceleratorNotUsedError", "check_accelerator", "describe", "machine_accelerator"]


class AcceleratorNotUsedError(RuntimeError):
  """The machine has a GPU or TPU, but JAX computes on the CPU."""


def machine_accelerator() -> str | None:
  """'gpu' or 'tpu' when the machine has one (whatever JAX sees), else None.

  Read from the operating system, not from JAX: NVIDIA's driver creates
  ``/dev/nvidia<N>`` for each GPU; a TPU VM has ``/dev/accel<N>`` (older
  generations) or VFIO devices (newer ones) and names its accelerator type in
  ``TPU_ACCELERATOR_TYPE``.
  """
  if glob.glob("/dev/nvidia[0-9]*"):
    return "gpu"
  if (
    glob.glob("/dev/accel[0-9]*")
    or glob.glob("/dev/vfio/[0-9]*")
    or os.environ.get("TPU_ACCELERATOR_TYPE")
  ):
    return "tpu"
  return None


def _installed(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


def describe() -> str:
  """One line per fact: versions, backend, devices."""
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return "\n".join(
    [
      f"jax {jax.__version__}, jaxlib {_installed('jaxlib')}",
      f"backend: {jax.default_backend()}",
      f"devices: {len(devices)} x {', '.join(kinds)} ({jax.process_count()} process(es))",
    ]
  )


def check_accelerator(accelerator: Callable[[], str | None] = machine_accelerator) -> str:
  """Returns JAX's backend; raises when the machine's GPU or TPU goes unused.

  Args:
    accelerator: what the machine has ('gpu', 'tpu' or None); the default
      asks the operating system.

  Raises:
    AcceleratorNotUsedError: the machine has a GPU or TPU but JAX's backend
      is the CPU. The message names the installed versions and the command
      that installs the matching plugin.
  """
  backend = jax.default_backend()
  present = accelerator()
  if present is None or backend != "cpu":
    return backend
  version, jaxlib = jax.__version__, _installed("jaxlib")
  if present == "gpu":
    name, extra = "jax-cuda12-plugin", "cuda12"
  else:
    name, extra = "libtpu", "tpu"
  plugin = _installed(name)
  if plugin is None:
    why = f"{name} is not installed"
  elif present == "gpu" and plugin != jaxlib:
    why = (
      f"{name} {plugin} does not match jaxlib {jaxlib} (an install that replaced the "
      "runtime's jax or jaxlib leaves its plugin behind)"
    )
  else:
    why = f"{name} {plugin} is installed but did not load (JAX's warning above says why)"
  raise AcceleratorNotUsedError(
    f"This machine has a {present.upper()}, but JAX {version} computes on the CPU: {why}. "
    f'Run `pip install "jax[{extra}]=={version}"`, then restart the runtime (Colab: '
    "Runtime > Restart session)."
  )
