"""Parameter counts, a parameter table and FLOPs of a model."""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apnet_jax.models.apnet import build_model
from apnet_jax.models.layers import FrozenBias


def _size(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def count_parameters(model: nnx.Module) -> dict[str, int]:
  """Trainable, frozen (zero biases) and 'official' (both, as PyTorch counts them)."""
  trainable = _size(nnx.state(model, nnx.Param))
  frozen = _size(nnx.state(model, FrozenBias))
  return {
    "trainable": trainable,
    "frozen": frozen,
    "official": trainable + frozen,
    "batch_stats": _size(nnx.state(model, nnx.BatchStat)),
  }


def _group(path: tuple) -> str:
  """A readable row name: 'backbone.layer3', 'pyramid 2', 'head'."""
  if path[0] == "backbone":
    return "backbone.stem" if str(path[1]).startswith(("conv1", "bn1")) else f"backbone.{path[1]}"
  if path[0] == "pyramids":
    return f"pyramid after stage {path[1]}"
  return "head"


def _flow_order(name: str) -> tuple[int, int]:
  """Data-flow order: stem, pyramid 0, layer1, pyramid 1, ..., head."""
  if name == "backbone.stem":
    return (0, 0)
  if name.startswith("backbone.layer"):
    return (int(name[-1]), 0)
  if name.startswith("pyramid"):
    return (int(name.split()[-1]), 1)
  return (99, 0)


def parameter_table(model: nnx.Module) -> str:
  """Parameters per block (stem, stages, pyramids, head) as a text table."""
  rows: dict[str, int] = collections.OrderedDict()
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, FrozenBias))):
    name = _group(path)
    rows[name] = rows.get(name, 0) + int(np.prod(value.shape))
  rows = dict(sorted(rows.items(), key=lambda kv: _flow_order(kv[0])))
  counts = count_parameters(model)
  width = max(len(r) for r in rows) + 2
  lines = [f"{'block':<{width}}{'parameters':>14}", "-" * (width + 14)]
  lines += [f"{name:<{width}}{n:>14,}" for name, n in rows.items()]
  lines.append("-" * (width + 14))
  lines.append(f"{'total (trainable)':<{width}}{counts['trainable']:>14,}")
  lines.append(f"{'frozen zero biases':<{width}}{counts['frozen']:>14,}")
  lines.append(f"{'official count':<{width}}{counts['official']:>14,}")
  return "\n".join(lines)


def forward_flops(model: nnx.Module, images: Any) -> float:
  """FLOPs of one eval-mode forward pass on ``images`` (XLA's cost analysis)."""
  graphdef, state = nnx.split(model)

  def forward(state, images):
    return nnx.merge(graphdef, state)(images)["feat"]

  images = jax.ShapeDtypeStruct(images.shape, images.dtype)
  compiled = jax.jit(forward).lower(state, images).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returns one dict per device
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def describe(model_config: Any, num_classes: int, *, batch_size: int = 2) -> str:
  """Parameter table, output shapes and FLOPs of the model a config builds.

  The model is built abstractly (no weights are materialised) except for
  the FLOP count, which compiles one eval forward pass.
  """
  model = nnx.eval_shape(lambda: build_model(model_config, num_classes, rngs=nnx.Rngs(0)))
  height, width = model_config.input_size
  images = jax.ShapeDtypeStruct((batch_size, height, width, 3), jnp.float32)
  model.eval()
  out = nnx.eval_shape(lambda m, x: m(x, return_stages=True), model, images)
  lines = [
    f"APNet-{'C' if model_config.kind == 'channel' else 'S'} level {model_config.level}, "
    f"ResNet-{model_config.depth} x{model_config.width}, input {height}x{width}, "
    f"{num_classes} classes, compute {model_config.dtype}",
    "",
    parameter_table(model),
    "",
    f"outputs for a batch of {batch_size}:",
  ]
  for i, stage in enumerate(out["stages"]):
    lines.append(f"  stage {i} (after attention)  {tuple(stage.shape)}  {stage.dtype}")
  for name in ("global_feat", "feat", "logits"):
    lines.append(f"  {name:<27}{tuple(out[name].shape)}  {out[name].dtype}")
  concrete = build_model(model_config, num_classes, rngs=nnx.Rngs(0))
  concrete.eval()
  flops = forward_flops(concrete, jnp.zeros((1, height, width, 3), jnp.float32))
  lines += ["", f"forward FLOPs per image (XLA cost analysis): {flops / 1e9:.2f} G"]
  return "\n".join(lines)
