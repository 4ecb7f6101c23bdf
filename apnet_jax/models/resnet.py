"""ResNet backbone in the torchvision parameter layout.

Attribute names follow torchvision (``conv1``, ``bn1``, ``layer1[0].conv2``,
``downsample_conv``/``downsample_bn`` for ``downsample.0``/``downsample.1``),
so PyTorch checkpoints map onto it key by key. The Bottleneck is v1.5 (the
stride sits on the 3x3 convolution). As in the official APNet code the stem
has no ReLU after ``bn1`` unless ``stem_relu`` is set, and the last stage's
stride is ``last_stride`` (1 for re-ID).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from apnet_jax import compat
from apnet_jax.models import layers

Dtype = Any

# depth -> (block type, blocks per stage)
RESNET_SPECS = {
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
}


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions (ResNet-18/34)."""

  expansion = 1

  def __init__(self, in_ch: int, planes: int, stride: int, *, dtype: Dtype, rngs: nnx.Rngs):
    out_ch = planes * self.expansion
    self.conv1 = layers.conv(in_ch, planes, 3, stride=stride, padding=1, dtype=dtype, rngs=rngs)
    self.bn1 = layers.BatchNorm(planes, dtype=dtype)
    self.conv2 = layers.conv(planes, planes, 3, padding=1, dtype=dtype, rngs=rngs)
    self.bn2 = layers.BatchNorm(planes, dtype=dtype)
    self.downsample_conv, self.downsample_bn = _downsample(in_ch, out_ch, stride, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = nnx.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return nnx.relu(out + _shortcut(self, x))


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (strided) -> 1x1 bottleneck, torchvision's v1.5."""

  expansion = 4

  def __init__(self, in_ch: int, planes: int, stride: int, *, dtype: Dtype, rngs: nnx.Rngs):
    out_ch = planes * self.expansion
    self.conv1 = layers.conv(in_ch, planes, 1, dtype=dtype, rngs=rngs)
    self.bn1 = layers.BatchNorm(planes, dtype=dtype)
    self.conv2 = layers.conv(planes, planes, 3, stride=stride, padding=1, dtype=dtype, rngs=rngs)
    self.bn2 = layers.BatchNorm(planes, dtype=dtype)
    self.conv3 = layers.conv(planes, out_ch, 1, dtype=dtype, rngs=rngs)
    self.bn3 = layers.BatchNorm(out_ch, dtype=dtype)
    self.downsample_conv, self.downsample_bn = _downsample(in_ch, out_ch, stride, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = nnx.relu(self.bn1(self.conv1(x)))
    out = nnx.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return nnx.relu(out + _shortcut(self, x))


def _downsample(in_ch, out_ch, stride, dtype, rngs):
  if stride == 1 and in_ch == out_ch:
    return None, None
  return (
    layers.conv(in_ch, out_ch, 1, stride=stride, dtype=dtype, rngs=rngs),
    layers.BatchNorm(out_ch, dtype=dtype),
  )


def _shortcut(block, x):
  if block.downsample_conv is None:
    return x
  return block.downsample_bn(block.downsample_conv(x))


class ResNet(nnx.Module):
  """The backbone, run stage by stage so that attention can sit in between.

  ``stages`` are the official ``base_1`` .. ``base_5``: the stem (conv1, bn1,
  [ReLU], max-pool) and ``layer1`` .. ``layer4``.
  """

  def __init__(
    self,
    depth: int = 50,
    *,
    width: float = 1.0,
    last_stride: int = 1,
    stem_relu: bool = False,
    dtype: Dtype | None = None,
    rngs: nnx.Rngs,
  ):
    if depth not in RESNET_SPECS:
      raise ValueError(f"model.depth must be one of {sorted(RESNET_SPECS)}, got {depth}.")
    if width <= 0 or int(64 * width) < 1:
      raise ValueError(f"model.width must be positive and give at least 1 channel, got {width}.")
    kind, blocks = RESNET_SPECS[depth]
    block_cls = Bottleneck if kind == "bottleneck" else BasicBlock
    base = int(64 * width)
    self.stem_relu = stem_relu
    self.conv1 = layers.conv(3, base, 7, stride=2, padding=3, dtype=dtype, rngs=rngs)
    self.bn1 = layers.BatchNorm(base, dtype=dtype)

    in_ch = base
    stage_channels = [base]
    strides = (1, 2, 2, last_stride)
    for i, (n, stride) in enumerate(zip(blocks, strides)):
      planes = base * 2**i
      stage = []
      for j in range(n):
        stage.append(block_cls(in_ch, planes, stride if j == 0 else 1, dtype=dtype, rngs=rngs))
        in_ch = planes * block_cls.expansion
      setattr(self, f"layer{i + 1}", compat.module_list(stage))
      stage_channels.append(in_ch)
    self.stage_channels = tuple(stage_channels)

  @property
  def out_channels(self) -> int:
    return self.stage_channels[-1]

  def stage(self, index: int, x: jax.Array) -> jax.Array:
    """Runs stage ``index`` (0 = stem, 1..4 = layer1..4)."""
    if index == 0:
      x = self.bn1(self.conv1(x))
      if self.stem_relu:
        x = nnx.relu(x)
      return layers.max_pool_3x3_s2(x)
    for block in getattr(self, f"layer{index}"):
      x = block(x)
    return x

  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(5):
      x = self.stage(i, x)
    return x
