"""XLA:CPU compiler options for the train step and feature extraction.

XLA:CPU (jaxlib 0.10) hands convolutions to YNNPACK by default. On a 2-core
AMD EPYC, YNNPACK's convolution *weight gradients* ran 8 to 13 times slower
than XLA's own (Eigen) convolutions of the same shapes (layer1's 3x3, 64 ->
64 channels on 64x32 maps, batch 16: 553 ms against 41 ms; the stem's 7x7:
724 ms against 80 ms), while the forward passes were close (45 against 33
ms; 58 against 63 ms). Dropping convolutions from the YNNPACK set, while
keeping its matmuls and reductions, took the ResNet-50 train step from 12.2
to 13.2 s down to 7.4 to 8.8 s (docs/benchmarks.md, "CPU tuning,
2026-12-01"). The options are passed per executable
(``jax.jit(compiler_options=...)``), so they touch only the functions that
ask for them, and only when they compile for the CPU.

A user's own choice wins: when ``XLA_FLAGS`` already sets the YNNPACK fusion
types, or when this jaxlib does not know the option, no options are given.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
# XLA:CPU's default YNNPACK set (jaxlib 0.10: individual dots, reductions and
# individual convolutions) without the convolutions.
CPU_COMPILER_OPTIONS = {
    YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


@functools.cache
def _accepted() -> bool:
  """Whether this jaxlib compiles with ``CPU_COMPILER_OPTIONS`` (older ones refuse)."""
  try:
    # A local device, so every process of a multi-process run answers alike.
    x = jax.device_put(np.zeros((), np.float32), jax.local_devices(backend="cpu")[0])
    jax.jit(lambda v: v + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(x).compile()
  except (TypeError, RuntimeError, ValueError):
    return False
  return True


def compiler_options(devices: jax.sharding.Mesh | Iterable[Any]) -> dict[str, str] | None:
  """The ``compiler_options`` for a ``jax.jit`` that runs on ``devices``.

  Args:
    devices: a mesh, or the devices the function runs on.

  Returns:
    ``CPU_COMPILER_OPTIONS`` when every device is a CPU, ``XLA_FLAGS`` does
    not set the YNNPACK fusion types itself and this jaxlib accepts the
    option; otherwise None (XLA's defaults).
  """
  if isinstance(devices, jax.sharding.Mesh):
    devices = devices.devices.flat
  devices = list(devices)
  if not devices or any(d.platform != "cpu" for d in devices):
    return None
  if YNN_FUSION_TYPE in os.environ.get("XLA_FLAGS", ""):
    return None
  if not _accepted():
    return None
  return dict(CPU_COMPILER_OPTIONS)
