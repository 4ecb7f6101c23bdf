"""Small building blocks with PyTorch semantics.

The official APNet is a PyTorch model, and parity with it decides how these
layers behave: explicit paddings instead of ``'SAME'``, PyTorch's BatchNorm
(momentum 0.1, eps 1e-5, running variance updated with the *unbiased* batch
variance), and PyTorch's default initialisers where the official code relies
on them.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apnet_jax import compat

Dtype = Any


def host_initializer(draw: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]):
  """A Flax initialiser ``(key, shape, dtype)`` whose values numpy draws on the host.

  ``draw(rng, shape)`` gets a numpy generator seeded with the words of the JAX
  key, so the values are a pure function of the key, as with ``jax.random``.
  Why not ``jax.random``: run eagerly, it compiles one XLA program per
  parameter shape, and that compiling is most of the time it takes to build
  a ResNet-50 on a CPU (docs/benchmarks.md); numpy and ``device_put``
  compile nothing. Under a trace (``nnx.eval_shape``, a jitted constructor,
  ``vmap``) the same draw runs as a host callback, so a jitted build gives
  the same values as an eager one.
  """

  def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
    shape = tuple(int(d) for d in shape)

    def values(words):
      rng = np.random.default_rng([int(w) for w in np.asarray(words).ravel()])
      return np.asarray(draw(rng, shape), dtype)

    # A typed key (jax.random.key, nnx.Rngs) or a raw uint32 one (PRNGKey).
    is_typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    words = jax.random.key_data(key) if is_typed else key
    if isinstance(words, jax.core.Tracer):
      return jax.pure_callback(
        values, jax.ShapeDtypeStruct(shape, dtype), words, vmap_method="sequential"
      )
    return jax.device_put(values(words))

  return init


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
  """(fan_in, fan_out) of a Linear (in, out) or HWIO convolution kernel."""
  receptive_field = math.prod(shape[:-2])
  return shape[-2] * receptive_field, shape[-1] * receptive_field


def normal_init(stddev: float):
  """N(0, stddev^2), e.g. the official classifier's ``normal_(std=0.001)``."""
  return host_initializer(lambda rng, shape: stddev * rng.standard_normal(shape))


# Kaiming normal, fan_out: torchvision's ResNet init for convolutions.
kaiming_fan_out = host_initializer(
  lambda rng, shape: math.sqrt(2.0 / _fans(shape)[1]) * rng.standard_normal(shape)
)

# PyTorch's default init for Conv2d/Linear weights is kaiming_uniform(a=sqrt(5)),
# i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the official code keeps it for the
# attention layers.
torch_default_kernel_init = host_initializer(
  lambda rng, shape: rng.uniform(-1.0, 1.0, shape) / math.sqrt(_fans(shape)[0])
)


def torch_default_bias_init(fan_in: int):
  """PyTorch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return host_initializer(lambda rng, shape: rng.uniform(-bound, bound, shape))


def _filled(num_features: int, value: float) -> jax.Array:
  # From numpy by device_put: eagerly, jnp.full and even jnp.asarray compile a
  # program per length.
  return jax.device_put(np.full((num_features,), value, np.float32))


class FrozenBias(nnx.Variable):
  """A bias the optimiser never touches (``requires_grad_(False)`` in PyTorch).

  The official BNNeck and the BatchNorm after each SAMS keep their bias at
  zero this way. It stays in the state so that official checkpoints load
  and save key for key, and it counts as a parameter as it does there.
  """


class BatchNorm(nnx.Module):
  """BatchNorm over the last axis, matching ``torch.nn.BatchNorm{1,2}d``.

  Normalises with the biased batch variance in training mode but updates the
  running variance with the unbiased one, as PyTorch does (Flax's own
  BatchNorm uses the biased one for both). Statistics and the affine
  transform run in float32 whatever the compute dtype. ``frozen_bias=True``
  makes the bias a ``FrozenBias`` (zero, never trained), as in the official
  BNNeck and the BatchNorm after each SAMS.

  Under ``jax.jit`` with the batch sharded over a mesh, the reductions span
  the global batch, so the statistics are those of the whole batch.
  """

  def __init__(
    self,
    num_features: int,
    *,
    frozen_bias: bool = False,
    momentum: float = 0.1,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    use_running_average: bool = False,
  ):
    self.num_features = num_features
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.use_running_average = use_running_average
    self.scale = nnx.Param(_filled(num_features, 1.0))
    bias_type = FrozenBias if frozen_bias else nnx.Param
    self.bias = bias_type(_filled(num_features, 0.0))
    self.mean = nnx.BatchStat(_filled(num_features, 0.0))
    self.var = nnx.BatchStat(_filled(num_features, 1.0))

  def normalizer(
    self, batch_mean: jax.Array | None = None, batch_var: jax.Array | None = None, count: int = 0
  ) -> tuple[jax.Array, jax.Array]:
    """``(mean, mul)`` such that this layer maps x to ``(x - mean) * mul + bias``.

    In training mode it takes the batch's per-channel mean and biased
    variance over ``count`` values each, and updates the running statistics
    from them; with running averages it uses those and needs no arguments.
    Callers that know the batch moments without reducing over the input
    (`attention.AttentionPyramid`) use this instead of calling the layer.
    """
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      if batch_mean is None or batch_var is None:
        raise ValueError("BatchNorm in training mode needs the batch's mean and variance.")
      if count <= 1:
        # One value per channel has no variance: every output would be the
        # bias. PyTorch refuses this too.
        raise ValueError(
          f"BatchNorm in training mode needs more than one value per channel, "
          f"got {count}: train with batches of at least 2 images, or call "
          "model.eval() first."
        )
      mean, var = batch_mean, batch_var
      unbiased = var * (count / (count - 1))
      m = self.momentum
      # compat.set_value, not `[...] =`: under a trace, flax's indexed
      # assignment asks each tracer for its `sharding`, and JAX answers with an
      # error message that scans the whole jaxpr: tracing time quadratic in the
      # size of the model.
      compat.set_value(self.mean, (1.0 - m) * self.mean[...] + m * mean)
      compat.set_value(self.var, (1.0 - m) * self.var[...] + m * unbiased)
    return mean, self.scale[...] * jax.lax.rsqrt(var + self.epsilon)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    xf = at_least_f32(x)
    if self.use_running_average:
      mean, mul = self.normalizer()
    else:
      axes = tuple(range(x.ndim - 1))
      batch_mean = jnp.mean(xf, axis=axes)
      batch_var = jnp.mean(jnp.square(xf - batch_mean), axis=axes)
      mean, mul = self.normalizer(batch_mean, batch_var, x.size // x.shape[-1])
    return ((xf - mean) * mul + self.bias[...]).astype(dtype)


# The convolution every layer calls. Plain lax, so that every transformation
# works (forward mode too); a caller that compiles for one platform may trace
# the model with a faster equivalent in its place (`convolution`).
_CONVOLUTION: contextvars.ContextVar[Callable[..., jax.Array]] = contextvars.ContextVar(
  "convolution", default=jax.lax.conv_general_dilated
)


@contextlib.contextmanager
def convolution(conv_general_dilated: Callable[..., jax.Array]) -> Iterator[None]:
  """Within this context, every layer convolves with ``conv_general_dilated``.

  It takes effect where the model is traced (or run eagerly) inside the
  context, e.g. in the body of a jitted step: the jitted function keeps the
  choice. The replacement must compute what ``jax.lax.conv_general_dilated``
  computes, with its signature (`apnet_jax.platform.cpu.conv_general_dilated`).
  """
  token = _CONVOLUTION.set(conv_general_dilated)
  try:
    yield
  finally:
    _CONVOLUTION.reset(token)


def _convolve(lhs, rhs, *args, **kwargs):
  return _CONVOLUTION.get()(lhs, rhs, *args, **kwargs)


def conv(
  in_features: int,
  out_features: int,
  kernel_size: int,
  *,
  stride: int = 1,
  padding: int = 0,
  use_bias: bool = False,
  kernel_init=kaiming_fan_out,
  dtype: Dtype | None = None,
  rngs: nnx.Rngs,
) -> nnx.Conv:
  """A 2-D convolution with PyTorch's explicit, symmetric padding."""
  return nnx.Conv(
    in_features,
    out_features,
    kernel_size=(kernel_size, kernel_size),
    strides=(stride, stride),
    padding=((padding, padding), (padding, padding)),
    use_bias=use_bias,
    kernel_init=kernel_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    conv_general_dilated=_convolve,
    rngs=rngs,
  )


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """``nn.MaxPool2d(3, stride=2, padding=1)``: pads with -inf, not zeros."""
  # A Python -inf lets JAX recognise the max monoid (differentiable under jit).
  return jax.lax.reduce_window(
    x,
    -jnp.inf,
    jax.lax.max,
    window_dimensions=(1, 3, 3, 1),
    window_strides=(1, 2, 2, 1),
    padding=((0, 0), (1, 1), (1, 1), (0, 0)),
  )


def at_least_f32(x: jax.Array) -> jax.Array:
  """bfloat16/float16 -> float32; float32 and float64 stay as they are."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def global_avg_pool(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, C), accumulated in at least float32."""
  return jnp.mean(at_least_f32(x), axis=(1, 2))
