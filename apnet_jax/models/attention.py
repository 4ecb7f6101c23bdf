"""The attention pyramid: split, attend, merge, stack.

After the stem and after each ResNet stage, APNet attends to finer and finer
splits of the feature map and stacks the results, finest split first:

  level L  ->  split attention at 2**(L-1), ..., 4, 2 parts (each followed by
               a BatchNorm whose bias is frozen at zero), then attention over
               the whole map.

APNet-C (``kind='channel'``, the released code) splits the channels: SAMS
(split-attend-merge-stack) with ``radix`` groups, then the SE gate. The
official code builds level 2 as SAMS(radix 2) + SE; its level 3 asks for two
SAMS of radix 3, which crashes (64 channels do not split in 3). Ours follows
the paper's 1-2-4 pyramid instead: SAMS(radix 4), SAMS(radix 2), SE.

APNet-S (``kind='spatial'``, described in the paper, not released) splits the
map horizontally into stripes (1, 2 and 4 at levels 1, 2 and 3, the paper's
Fig. 2) and attends each stripe on its own with RGA-S, the relation-aware
global spatial attention of Zhang et al. (CVPR 2020); the stripe maps are
merged along the height.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from apnet_jax import compat
from apnet_jax.models import layers

Dtype = Any

SE_HIDDEN = 8  # the official SELayer reductions (8, 32, ..., 256) all give 8.


def _dense(in_features, out_features, *, use_bias, dtype, rngs):
  """A Linear / 1x1 conv with PyTorch's default initialisation."""
  return nnx.Linear(
    in_features,
    out_features,
    use_bias=use_bias,
    kernel_init=layers.torch_default_kernel_init,
    bias_init=layers.torch_default_bias_init(in_features),
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
  )


class SEGate(nnx.Module):
  """Squeeze-and-excitation over the whole map: x * sigmoid(MLP(GAP(x))).

  The gate depends on the map only through its per-channel means, so the
  module takes those (`AttentionPyramid` applies the gate).
  """

  def __init__(self, channels: int, *, dtype: Dtype | None = None, rngs: nnx.Rngs):
    self.fc1 = _dense(channels, SE_HIDDEN, use_bias=False, dtype=dtype, rngs=rngs)
    self.fc2 = _dense(SE_HIDDEN, channels, use_bias=False, dtype=dtype, rngs=rngs)

  def weights(self, pooled: jax.Array) -> jax.Array:
    """The gate, (B, C), in [0, 1], of a map whose per-channel means are ``pooled`` (B, C)."""
    return nnx.sigmoid(layers.at_least_f32(self.fc2(nnx.relu(self.fc1(pooled)))))


class SAMS(nnx.Module):
  """Channel split-attend-merge-stack with ``radix`` groups.

  The C channels are split into ``radix`` groups of C/radix; the groups are
  summed, pooled and passed through fc1 -> BN -> ReLU -> fc2, giving one
  logit per (group, channel); a softmax over the groups weighs each group,
  and the weighted groups are concatenated back to C channels. As with the
  SE gate, the weights depend on the map only through its per-channel means;
  `AttentionPyramid` applies them.
  """

  def __init__(self, channels: int, radix: int, *, dtype: Dtype | None = None, rngs: nnx.Rngs):
    if channels % radix:
      raise ValueError(f"SAMS: {channels} channels do not split into {radix} groups.")
    self.radix = radix
    group = channels // radix
    inter = max(channels * radix // 4, 32)  # the official sizing, reduction factor 4
    self.fc1 = _dense(group, inter, use_bias=True, dtype=dtype, rngs=rngs)
    self.bn1 = layers.BatchNorm(inter, dtype=dtype)
    self.fc2 = _dense(inter, channels, use_bias=True, dtype=dtype, rngs=rngs)

  def weights(self, pooled: jax.Array) -> jax.Array:
    """Attention of each group over each channel, (B, radix, C/radix).

    Args:
      pooled: (B, C), the per-channel means of the map.
    """
    b, c = pooled.shape
    group_sum = pooled.reshape(b, self.radix, c // self.radix).sum(axis=1)
    hidden = nnx.relu(self.bn1(self.fc1(group_sum)))
    logits = layers.at_least_f32(self.fc2(hidden)).reshape(b, self.radix, c // self.radix)
    return jax.nn.softmax(logits, axis=1)


class _PointwiseBN(nnx.Module):
  """1x1 conv (no bias) -> BatchNorm [-> ReLU], the RGA building block."""

  def __init__(self, in_features, out_features, *, relu=True, dtype, rngs):
    self.conv = nnx.Linear(
      in_features,
      out_features,
      use_bias=False,
      kernel_init=layers.kaiming_fan_out,
      dtype=dtype,
      param_dtype=jnp.float32,
      rngs=rngs,
    )
    self.bn = layers.BatchNorm(out_features, dtype=dtype)
    self.relu = relu

  def __call__(self, x):
    x = self.bn(self.conv(x))
    return nnx.relu(x) if self.relu else x


class RelationSpatialAttention(nnx.Module):
  """RGA-S: relation-aware global spatial attention (Zhang et al., CVPR 2020).

  For every position, its affinities to all positions (outgoing and
  incoming, 2*H*W values) are embedded together with the position's own
  feature, and a small network maps them to a spatial gate. The affinity
  vector's length is H*W, so the module is built for one map size.
  Reductions follow the RGA paper's defaults (channel 8, spatial 8, down 8).
  """

  def __init__(
    self,
    channels: int,
    height: int,
    width: int,
    *,
    dtype: Dtype | None = None,
    rngs: nnx.Rngs,
    channel_ratio: int = 8,
    spatial_ratio: int = 8,
    down_ratio: int = 8,
  ):
    self.height, self.width = height, width
    positions = height * width
    inter_ch = max(channels // channel_ratio, 1)
    inter_sp = max(positions // spatial_ratio, 1)
    joint = 1 + inter_sp
    kw = dict(dtype=dtype, rngs=rngs)
    self.theta = _PointwiseBN(channels, inter_ch, **kw)
    self.phi = _PointwiseBN(channels, inter_ch, **kw)
    self.embed = _PointwiseBN(channels, inter_ch, **kw)
    self.relation = _PointwiseBN(2 * positions, inter_sp, **kw)
    self.fuse = _PointwiseBN(joint, max(joint // down_ratio, 1), **kw)
    self.score = _PointwiseBN(max(joint // down_ratio, 1), 1, relu=False, **kw)

  def weights(self, x: jax.Array) -> jax.Array:
    """The spatial gate, (B, H, W, 1), in [0, 1]."""
    b, h, w, _ = x.shape
    if (h, w) != (self.height, self.width):
      raise ValueError(f"RGA-S was built for {self.height}x{self.width} maps, got {h}x{w}.")
    theta = self.theta(x).reshape(b, h * w, -1)
    phi = self.phi(x).reshape(b, h * w, -1)
    affinity = jnp.einsum("bic,bjc->bij", theta, phi)  # (B, from i, to j)
    # At position p: incoming affinities a[p, :] and outgoing ones a[:, p].
    incoming = affinity.reshape(b, h, w, h * w)
    outgoing = jnp.swapaxes(affinity, 1, 2).reshape(b, h, w, h * w)
    relations = self.relation(jnp.concatenate([incoming, outgoing], axis=-1))
    own = jnp.mean(self.embed(x), axis=-1, keepdims=True)
    score = self.score(self.fuse(jnp.concatenate([own, relations], axis=-1)))
    return nnx.sigmoid(layers.at_least_f32(score))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.weights(x).astype(x.dtype)


class StripeAttention(nnx.Module):
  """RGA-S applied to each of ``stripes`` horizontal stripes on its own.

  The stripes share the module's weights and are folded into the batch, so
  one call attends all of them; their maps are merged along the height.
  """

  def __init__(
    self,
    channels: int,
    height: int,
    width: int,
    stripes: int,
    *,
    dtype: Dtype | None = None,
    rngs: nnx.Rngs,
  ):
    if height % stripes:
      raise ValueError(
        f"APNet-S: a {height}x{width} feature map does not split into {stripes} equal "
        "stripes; choose model.input_size so that every stage's height divides by "
        f"{stripes}."
      )
    self.stripes = stripes
    self.rga = RelationSpatialAttention(channels, height // stripes, width, dtype=dtype, rngs=rngs)

  def _fold(self, x):
    b, h, w, c = x.shape
    return x.reshape(b * self.stripes, h // self.stripes, w, c)

  def weights(self, x: jax.Array) -> jax.Array:
    """The merged spatial gate, (B, H, W, 1)."""
    b, h, w, _ = x.shape
    return self.rga.weights(self._fold(x)).reshape(b, h, w, 1)

  def __call__(self, x: jax.Array, *, return_weights: bool = False):
    """``x`` gated per position; with ``return_weights``, ``(out, gate)``."""
    gate = self.weights(x)
    out = x * gate.astype(x.dtype)
    return (out, gate) if return_weights else out


def split_sizes(level: int) -> tuple[int, ...]:
  """Parts per split level, finest first: level 3 -> (4, 2), level 2 -> (2,)."""
  if not 0 <= level <= 3:
    raise ValueError(f"model.level must be 0, 1, 2 or 3, got {level}.")
  return tuple(2**i for i in range(level - 1, 0, -1))


class AttentionPyramid(nnx.Module):
  """The pyramid after one stage: split attentions (+ BN), then the whole map."""

  def __init__(
    self,
    channels: int,
    level: int,
    kind: str,
    feature_hw: tuple[int, int],
    *,
    dtype: Dtype | None = None,
    rngs: nnx.Rngs,
  ):
    if kind not in ("channel", "spatial"):
      raise ValueError(f"model.kind must be 'channel' or 'spatial', got {kind!r}.")
    h, w = feature_hw
    # Parts each attention splits the map into, in call order (1 = the whole map).
    self.parts = split_sizes(level) + ((1,) if level else ())
    splits = []
    for parts in split_sizes(level):
      if kind == "channel":
        splits.append(SAMS(channels, parts, dtype=dtype, rngs=rngs))
      else:
        splits.append(StripeAttention(channels, h, w, parts, dtype=dtype, rngs=rngs))
    self.splits = compat.module_list(splits)
    # The official BN2d after each SAMS: bias frozen at zero.
    self.split_bns = compat.module_list(
      [layers.BatchNorm(channels, frozen_bias=True, dtype=dtype) for _ in splits]
    )
    if level == 0:
      self.whole = None
    elif kind == "channel":
      self.whole = SEGate(channels, dtype=dtype, rngs=rngs)
    else:
      self.whole = StripeAttention(channels, h, w, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, return_weights: bool = False):
    """The attended map; with ``return_weights``, also each attention's weights.

    The weights come in call order (see ``parts``): SAMS ``(B, radix, C/radix)``
    and SE ``(B, C)`` for APNet-C, spatial gates ``(B, H, W, 1)`` for APNet-S.
    """
    if not self.parts:
      out, weights = x, []
    elif isinstance(self.whole, SEGate):
      out, weights = self._channel_pyramid(x)
    else:
      out, weights = x, []
      for attend, bn in zip(self.splits, self.split_bns):
        out, w = attend(out, return_weights=True)
        out = bn(out)
        weights.append(w)
      out, w = self.whole(out, return_weights=True)
      weights.append(w)
    return (out, weights) if return_weights else out

  def _channel_pyramid(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """APNet-C's pyramid as one affine map per image and channel.

    SAMS and SE scale each (image, channel) of the map, and the BatchNorm
    between them shifts and scales each channel, so the attended map is
    ``(x - m) * scale + mean`` with ``m`` the per-(image, channel) mean of x
    and ``scale``, ``mean`` of shape (B, C). Every attention needs only the
    current map's per-channel means (``mean``), and each BatchNorm only its
    batch moments, which follow from ``mean`` and x's per-(image, channel)
    variance by the law of total variance. So the whole pyramid reads x for
    two reductions and writes its output once, instead of a pass over the
    map for every pooling, statistic and product (docs/benchmarks.md has
    its effect on the train step). The values are the official
    composition's, up to rounding.
    """
    b, h, w, c = x.shape
    xf = layers.at_least_f32(x)
    m = jnp.mean(xf, axis=(1, 2))
    centered = xf - m[:, None, None]
    # Per-(image, channel) variance over the map; only batch statistics need it.
    v = None
    if any(not bn.use_running_average for bn in self.split_bns):
      v = jnp.mean(jnp.square(centered), axis=(1, 2))
    scale, mean = jnp.ones_like(m), m
    weights = []
    for sams, bn in zip(self.splits, self.split_bns):
      att = sams.weights(mean)
      weights.append(att)
      a = att.reshape(b, c)  # group j holds channels [j*C/radix, (j+1)*C/radix)
      scale, mean = scale * a, mean * a
      if bn.use_running_average:
        shift, mul = bn.normalizer()
      else:
        batch_mean = jnp.mean(mean, axis=0)
        batch_var = jnp.mean(v * jnp.square(scale), axis=0) + jnp.mean(
          jnp.square(mean - batch_mean), axis=0
        )
        shift, mul = bn.normalizer(batch_mean, batch_var, b * h * w)
      scale, mean = scale * mul, (mean - shift) * mul + bn.bias[...]
    gate = self.whole.weights(mean)
    weights.append(gate)
    scale, mean = scale * gate, mean * gate
    out = centered * scale[:, None, None] + mean[:, None, None]
    return out.astype(x.dtype), weights
