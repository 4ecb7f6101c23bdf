"""CPU tuning: XLA:CPU compiler options, a CPU kernel for 1x1 convolutions, Orbax saves.

Two things make the train step and feature extraction fast on XLA:CPU, and
neither changes what they compute (docs/benchmarks.md, "CPU tuning"):

* `compiler_options`: XLA:CPU hands convolutions to YNNPACK by default,
  whose convolution weight gradients are several times slower than XLA's
  own; the options keep YNNPACK for matmuls and reductions only. They are
  passed per executable (``jax.jit(compiler_options=...)``), so they touch
  only the functions that ask for them. A user's own ``XLA_FLAGS`` setting,
  or a jaxlib that does not know the option (one without YNNPACK), gets none.
* `convolution_for`: 1x1 convolutions as the matmuls over channels that they
  are, with a custom VJP that lays out the kernel gradient as XLA:CPU likes
  it. The model convolves with plain ``lax.conv_general_dilated`` unless a
  caller that compiles for the CPU puts this in its place
  (`apnet_jax.models.layers.convolution`). A custom VJP admits reverse-mode
  differentiation only, which is why it stays out of the model elsewhere.

A third, `save_replicas_whole`, makes Orbax write a replicated array whole
from one CPU device instead of in one piece per device; checkpointing
installs it when it makes a checkpoint manager.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

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


def _all_cpu(devices: jax.sharding.Mesh | Iterable[Any]) -> bool:
  if isinstance(devices, jax.sharding.Mesh):
    devices = devices.devices.flat
  devices = list(devices)
  return bool(devices) and all(d.platform == "cpu" for d in devices)


def compiler_options(devices: jax.sharding.Mesh | Iterable[Any]) -> dict[str, str] | None:
  """The ``compiler_options`` for a ``jax.jit`` that runs on ``devices``.

  Args:
    devices: a mesh, or the devices the function runs on.

  Returns:
    ``CPU_COMPILER_OPTIONS`` when every device is a CPU, ``XLA_FLAGS`` does
    not set the YNNPACK fusion types itself and this jaxlib accepts the
    option; otherwise None (XLA's defaults).
  """
  if not _all_cpu(devices):
    return None
  if YNN_FUSION_TYPE in os.environ.get("XLA_FLAGS", ""):
    return None
  if not _accepted():
    return None
  return dict(CPU_COMPILER_OPTIONS)


def convolution_for(devices: jax.sharding.Mesh | Iterable[Any]) -> Callable[..., jax.Array]:
  """The convolution for a function compiled for ``devices``.

  `conv_general_dilated` (1x1 kernels as matmuls) when every device is a
  CPU, ``jax.lax.conv_general_dilated`` otherwise.
  """
  return conv_general_dilated if _all_cpu(devices) else jax.lax.conv_general_dilated


def save_replicas_whole(devices: Iterable[Any]) -> None:
  """When every device is a CPU, lets Orbax write each replicated array whole from one.

  Orbax's default replica-parallel save cuts every replicated array into one
  piece per device so that the devices share the device-to-host transfer.
  CPU devices all sit in host memory, so there is nothing to share, and each
  piece costs an eager slice per array and device at every save (Orbax makes
  the same choice on GPU). Other platforms, and a ``jax.Array`` handler the
  user registered, are left as they are.

  Args:
    devices: the devices the checkpointed arrays live on (``jax.devices()``).
  """
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  if (
    type(handler) is ocp.type_handlers.ArrayHandler  # pylint: disable=unidiomatic-typecheck
    and getattr(handler, "_use_replica_parallel", False)
    and _all_cpu(devices)
  ):
    whole = copy.copy(handler)  # the same settings and metadata store otherwise
    whole._use_replica_parallel = False  # pylint: disable=protected-access
    ocp.type_handlers.register_type_handler(jax.Array, whole, override=True)


_NHWC_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise_matmul(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
  """``x @ kernel`` over the channel axis of an NHWC map, with a chosen gradient.

  The kernel's gradient contracts the pixels of ``x`` and ``dy``, and
  XLA:CPU feeds its dot one of the two transposed in memory. Autodiff's form
  gets ``dy`` transposed, and the BatchNorm-backward fusion that produces
  ``dy`` is then computed a second time in that layout. Where ``x`` has
  fewer channels than ``dy``, the gradient is stated so that XLA transposes
  ``x`` instead.
  """
  return jnp.einsum("bhwc,cd->bhwd", x, kernel, precision=precision)


def _pointwise_matmul_fwd(x, kernel, precision):
  return _pointwise_matmul(x, kernel, precision), (x, kernel)


def _pointwise_matmul_bwd(precision, residuals, dy):
  x, kernel = residuals
  dx = jnp.einsum("bhwd,cd->bhwc", dy, kernel, precision=precision)
  # The pixels may be sharded over an explicit mesh axis; the kernel's
  # gradient is then summed over it and replicated, as autodiff's is.
  mesh = jax.typeof(x).sharding.mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.P()) if mesh.explicit_axes else None
  if x.shape[-1] < dy.shape[-1]:
    dkernel = jnp.einsum("bhwc,bhwd->cd", x, dy, precision=precision, out_sharding=replicated)
  else:  # autodiff's own form
    dkernel = jnp.einsum("bhwd,bhwc->dc", dy, x, precision=precision, out_sharding=replicated).T
  return dx, dkernel


_pointwise_matmul.defvjp(_pointwise_matmul_fwd, _pointwise_matmul_bwd)


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  **kwargs,
):
  """``jax.lax.conv_general_dilated`` with 1x1 kernels as matmuls (for XLA:CPU).

  XLA:CPU runs the gradients of a 1x1 convolution as convolutions several
  times slower than the forward pass of the same FLOPs; as a matmul, both
  gradients are matmuls too. Only the plain case the networks use is
  rewritten (NHWC/HWIO, 1x1 kernel, explicit padding, no dilation, one
  group); larger kernels stay convolutions (docs/benchmarks.md, "CPU
  tuning", says why).
  Differentiable in reverse mode only (``jax.grad``, ``jax.vjp``).
  """
  plain = (
    not isinstance(padding, str)
    and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    and feature_group_count == 1
    and not kwargs.get("out_sharding")
    and not kwargs.get("preferred_element_type")
    and lhs.ndim == 4
    and rhs.shape[:2] == (1, 1)
    and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_DIMENSIONS)
  )
  if not plain:
    return jax.lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
      **kwargs,
    )
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  strides = tuple(int(s) for s in window_strides)
  x = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))[:, :: strides[0], :: strides[1]]
  return _pointwise_matmul(x, rhs[0, 0], precision)
