"""APNet: a ResNet whose stages pass through attention pyramids, and the re-ID head.

Head (the official ``Baseline``): global average pooling gives
``global_feat`` (the triplet loss's input); the BNNeck, a BatchNorm1d whose
bias is frozen at zero, gives ``feat`` (the evaluation feature); a linear
classifier without bias gives ``logits``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from apnet_jax import compat
from apnet_jax.models import attention, layers
from apnet_jax.models.resnet import ResNet

Dtype = Any


def _conv_out(n: int, kernel: int, stride: int, pad: int) -> int:
  return (n + 2 * pad - kernel) // stride + 1


def stage_sizes(input_size: tuple[int, int], last_stride: int) -> list[tuple[int, int]]:
  """Feature-map (height, width) after the stem and after each of the 4 stages."""
  sizes = []
  h, w = input_size
  h, w = _conv_out(h, 7, 2, 3), _conv_out(w, 7, 2, 3)  # conv1
  h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)  # max-pool
  sizes.append((h, w))
  for stride in (1, 2, 2, last_stride):
    h, w = _conv_out(h, 3, stride, 1), _conv_out(w, 3, stride, 1)
    sizes.append((h, w))
  return sizes


class APNet(nnx.Module):
  """APNet-C / APNet-S with the BNNeck re-ID head.

  Call it on NHWC float images; it returns a dict with ``global_feat``,
  ``feat`` and ``logits`` (float32), with ``stages`` (the five attended
  stage outputs) when ``return_stages`` is set, and with ``attention`` (each
  stage's pyramid weights, see `attention.AttentionPyramid`) when
  ``return_attention`` is set. ``model.train()`` and ``model.eval()`` switch
  every BatchNorm between batch and running statistics.
  """

  def __init__(
    self,
    num_classes: int,
    *,
    depth: int = 50,
    width: float = 1.0,
    last_stride: int = 1,
    stem_relu: bool = False,
    level: int = 2,
    kind: str = "channel",
    input_size: tuple[int, int] = (384, 192),
    dtype: Dtype | None = None,
    rngs: nnx.Rngs,
  ):
    if num_classes < 1:
      raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
    self.level = level
    self.kind = kind
    self.compute_dtype = dtype or jnp.float32
    self.backbone = ResNet(
      depth, width=width, last_stride=last_stride, stem_relu=stem_relu, dtype=dtype, rngs=rngs
    )
    sizes = stage_sizes(tuple(input_size), last_stride)
    self.pyramids = compat.module_list(
      [
        attention.AttentionPyramid(c, level, kind, hw, dtype=dtype, rngs=rngs)
        for c, hw in zip(self.backbone.stage_channels, sizes)
      ]
    )
    dim = self.backbone.out_channels
    # The head runs in float32 whatever the compute dtype: it is tiny, and the
    # losses and the evaluation feature want full precision.
    self.bottleneck = layers.BatchNorm(dim, frozen_bias=True)
    self.classifier = nnx.Linear(
      dim, num_classes, use_bias=False, kernel_init=layers.normal_init(0.001), rngs=rngs
    )

  @property
  def feature_dim(self) -> int:
    return self.backbone.out_channels

  def __call__(
    self,
    images: jax.Array,
    *,
    return_stages: bool = False,
    return_attention: bool = False,
    stage_offsets: Sequence[jax.Array] | None = None,
  ) -> dict[str, Any]:
    """The re-ID outputs of NHWC float images.

    Args:
      images: (B, H, W, 3) normalized images.
      return_stages: also return ``stages``, the five attended stage outputs.
      return_attention: also return ``attention``: per stage, the list of
        its pyramid's attention weights in call order.
      stage_offsets: five arrays added to the stage outputs. Pass zeros and
        differentiate with respect to them to get gradients with respect to
        the stage outputs (Grad-CAM, `apnet_jax.visualize`).

    Returns:
      ``global_feat``, ``feat``, ``logits`` and the outputs asked for.
    """
    x = images.astype(self.compute_dtype)
    stages, attention_weights = [], []
    for i, pyramid in enumerate(self.pyramids):
      x, weights = pyramid(self.backbone.stage(i, x), return_weights=True)
      if stage_offsets is not None:
        x = x + stage_offsets[i]
      stages.append(x)
      attention_weights.append(weights)
    global_feat = layers.global_avg_pool(x)
    feat = self.bottleneck(global_feat)
    out = {
      "global_feat": global_feat,
      "feat": feat,
      "logits": self.classifier(feat),
    }
    if return_stages:
      out["stages"] = stages
    if return_attention:
      out["attention"] = attention_weights
    return out


def build_model(model_config: Any, num_classes: int, *, rngs: nnx.Rngs) -> APNet:
  """Builds APNet from the ``model`` section of a config.

  Args:
    model_config: the config's ``model`` section (an ``ml_collections``
      ConfigDict or any object with the same attributes): ``depth``,
      ``width``, ``last_stride``, ``stem_relu``, ``level``, ``kind``,
      ``input_size`` and ``dtype`` ('float32' or 'bfloat16' compute).
    num_classes: number of training identities (classifier outputs).
    rngs: NNX random streams for initialisation.

  Returns:
    An ``APNet`` NNX module in training mode.
  """
  dtype = {"float32": None, "bfloat16": jnp.bfloat16}.get(str(model_config.dtype), "?")
  if dtype == "?":
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {model_config.dtype!r}.")
  return APNet(
    num_classes,
    depth=int(model_config.depth),
    width=float(model_config.width),
    last_stride=int(model_config.last_stride),
    stem_relu=bool(model_config.stem_relu),
    level=int(model_config.level),
    kind=str(model_config.kind),
    input_size=tuple(model_config.input_size),
    dtype=dtype,
    rngs=rngs,
  )
