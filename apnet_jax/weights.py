"""PyTorch weights in and out: torchvision ResNets and official APNet checkpoints.

Two layouts are recognised:

- **torchvision** ImageNet checkpoints (``conv1.weight``,
  ``layer1.0.conv1.weight``, ...; ``fc.*`` ignored) fill the backbone;
- **official APNet** checkpoints (github.com/Gutianpei/APNet ``Baseline``)
  fill the whole model: ``base.*`` and its aliases ``base_1.*`` ..
  ``base_5.*`` (the same tensors regrouped by stage), ``att{s}.*`` (SE),
  ``att_s{s}.*``/``att_ss{s}.*`` (SAMS), ``BN{s}``/``BN_{s}.bottleneck2.*``,
  ``bottleneck.*`` and ``classifier.weight``; possibly nested under
  ``model`` or ``state_dict`` and prefixed ``module.`` by DataParallel.

Level 3 does not exist in the official code (it crashes); we name its finer
split ``att_ss{s}``/``BN_{s}`` as that code would have. APNet-S has no
official checkpoint: its attention keys follow our own attribute names under
``att{s}``/``att_s{s}``/``att_ss{s}``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from apnet_jax import compat, torch_io
from apnet_jax.models import attention, layers
from apnet_jax.models.apnet import APNet

# Our BatchNorm variables -> PyTorch buffer/parameter names.
_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


@dataclasses.dataclass
class LoadReport:
  """What ``load_torch_weights`` did.

  Attributes:
    layout: 'official' or 'torchvision'.
    loaded: PyTorch keys copied into the model.
    missing: keys the model has but the source does not (left as they were).
    unexpected: keys of the source that the model does not use.
  """

  layout: str
  loaded: list[str]
  missing: list[str]
  unexpected: list[str]


@dataclasses.dataclass
class _Entry:
  variable: nnx.Variable
  kind: str  # 'conv', 'linear', 'conv1x1' or 'vector'


def _split_names(level: int, stage: int) -> list[tuple[str, str]]:
  """(attention, BatchNorm) official names of the split levels, finest first."""
  names = [
    (f"att_s{stage}", f"BN{stage}.bottleneck2"),
    (f"att_ss{stage}", f"BN_{stage}.bottleneck2"),
  ]
  return names[: len(attention.split_sizes(level))][::-1]


def _module_name(path: tuple, model: APNet) -> str:
  """The official name of the module at ``path`` in our model."""
  head, rest = path[0], list(path[1:])
  if head == "backbone":
    name = ["base"]
    for part in rest:
      if part == "downsample_conv":
        name += ["downsample", "0"]
      elif part == "downsample_bn":
        name += ["downsample", "1"]
      else:
        name.append(str(part))
    return ".".join(name)
  if head == "pyramids":
    stage = rest[0] + 1
    group, tail = rest[1], [str(p) for p in rest[2:]]
    if group == "whole":
      if model.kind == "channel":  # SE: nn.Sequential(Linear, ReLU, Linear, Sigmoid)
        tail = [{"fc1": "fc.0", "fc2": "fc.2"}.get(t, t) for t in tail]
      return ".".join([f"att{stage}"] + tail)
    att_name, bn_name = _split_names(model.level, stage)[int(tail[0])]
    return ".".join([att_name if group == "splits" else bn_name] + tail[1:])
  return ".".join(str(p) for p in path)


def _entries(model: APNet) -> dict[str, _Entry]:
  """Every official key of ``model`` with the variable behind it."""
  modules = dict(compat.iter_modules(model))
  out = {}
  for path, module in modules.items():
    if isinstance(module, layers.BatchNorm):
      prefix = _module_name(path, model)
      for ours, theirs in _BN_NAMES.items():
        out[f"{prefix}.{theirs}"] = _Entry(getattr(module, ours), "vector")
    elif isinstance(module, (nnx.Conv, nnx.Linear)):
      prefix = _module_name(path, model)
      parent = modules.get(path[:-1])
      if isinstance(module, nnx.Conv):
        kind = "conv"
      elif isinstance(parent, (attention.SAMS, attention._PointwiseBN)):
        kind = "conv1x1"  # 1x1 Conv2d in PyTorch, a Linear here
      else:
        kind = "linear"
      out[f"{prefix}.weight"] = _Entry(module.kernel, kind)
      if getattr(module, "bias", None) is not None:
        out[f"{prefix}.bias"] = _Entry(module.bias, "vector")
  return out


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":  # HWIO -> OIHW
    return value.transpose(3, 2, 0, 1)
  if kind == "linear":  # (in, out) -> (out, in)
    return value.T
  if kind == "conv1x1":
    return value.T[:, :, None, None]
  return value


def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  if kind == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if kind == "linear":
    return (shape[1], shape[0])
  if kind == "conv1x1":
    return (shape[1], shape[0], 1, 1)
  return tuple(shape)


def _from_torch(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return value.transpose(2, 3, 1, 0)
  if kind == "linear":
    return value.T
  if kind == "conv1x1":
    return value.reshape(value.shape[:2]).T if value.ndim == 4 else value.T
  return value


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The state dict in a file or mapping: unnested, ``module.`` prefixes removed."""
  obj = source if isinstance(source, Mapping) else torch_io.read_checkpoint(source)
  for key in ("state_dict", "model"):
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{source}: holds a {type(obj).__name__}, not a state dict")
  out = {}
  for key, value in obj.items():
    key = key[len("module.") :] if key.startswith("module.") else key
    out[key] = np.asarray(value)
  return out


_ALIAS = re.compile(r"^base_([1-5])\.(\d+)\.(.*)$")


def _canonical(key: str) -> str | None:
  """``base_1.0.weight`` -> ``base.conv1.weight``; ``base_3.0.2.x`` -> ``base.layer2.2.x``."""
  m = _ALIAS.match(key)
  if not m:
    return None
  stage, index, rest = int(m.group(1)), m.group(2), m.group(3)
  if stage == 1:
    module = {"0": "conv1", "1": "bn1"}.get(index)
    return f"base.{module}.{rest}" if module else None
  if index != "0":  # base_{2..5} each wrap exactly one layer
    return None
  return f"base.layer{stage - 1}.{rest}"


def _resolve_aliases(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Folds ``base_k.*`` aliases into ``base.*``, checking that they agree."""
  out = {k: v for k, v in state.items() if _canonical(k) is None}
  disagree = []
  for key, value in state.items():
    canon = _canonical(key)
    if canon is None:
      continue
    if canon in out:
      # equal_nan: a damaged tensor is reported as such (`_check_finite`), not as a mismatch.
      if out[canon].shape != value.shape or not np.array_equal(out[canon], value, equal_nan=True):
        disagree.append(f"{key} (alias of {canon})")
    else:
      out[canon] = value
  if disagree:
    raise ValueError("aliases disagree with their canonical keys: " + ", ".join(disagree))
  return out


def _check_finite(state: dict[str, np.ndarray]) -> None:
  """Refuses tensors holding NaN or infinity: a damaged file or a diverged training."""
  bad = [
    key
    for key, value in state.items()
    if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all()
  ]
  if bad:
    raise ValueError(
      f"NaN or infinite values in {len(bad)} tensor(s) ({', '.join(bad[:5])}"
      f"{', ...' if len(bad) > 5 else ''}): the file is damaged or its training "
      "diverged; use another checkpoint."
    )


def detect_layout(keys) -> str:
  """'official' or 'torchvision', from the keys of a state dict."""
  keys = set(keys)
  if any(k.startswith(("base.", "base_1.")) for k in keys):
    return "official"
  if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
    return "torchvision"
  sample = ", ".join(sorted(keys)[:5])
  raise ValueError(
    "not a torchvision ResNet nor an official APNet state dict (expected 'conv1.weight' "
    f"and 'layer1.0.conv1.weight', or 'base.*' keys); first keys: {sample}"
  )


def load_torch_weights(model: APNet, source: str | os.PathLike | Mapping[str, Any]) -> LoadReport:
  """Loads PyTorch weights into ``model`` in place.

  Args:
    model: an ``APNet``.
    source: a ``.pth``/``.pt`` (read without PyTorch), ``.safetensors`` or
      ``.npz`` path, or a mapping from names to arrays.

  ``model`` may be abstract (``nnx.eval_shape``): loaded variables become
  concrete, so a source that covers every key needs no random init first.

  Returns:
    A ``LoadReport`` with the layout and the loaded, missing and unexpected
    keys (``num_batches_tracked`` counters are neither).

  Raises:
    ValueError: naming every key whose shape does not fit, whose
      ``base_k`` alias disagrees with its canonical key, or that holds NaN or
      infinite values; nothing is loaded then.
  """
  name = "state dict" if isinstance(source, Mapping) else os.fspath(source)
  state = read_state_dict(source)
  try:
    layout = detect_layout(state)
    if layout == "official":
      state = _resolve_aliases(state)
    _check_finite(state)
  except ValueError as e:
    raise ValueError(f"{name}: {e}") from e
  entries = _entries(model)
  if layout != "official":  # torchvision: the backbone only, without the 'base.' prefix
    state = {f"base.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    entries = {k: e for k, e in entries.items() if k.startswith("base.")}

  def shown(key):
    return key[len("base.") :] if layout == "torchvision" else key

  mismatched, updates = [], []
  for key, entry in entries.items():
    if key not in state:
      continue
    want = _torch_shape(entry.variable.shape, entry.kind)
    got = state[key].shape
    if entry.kind == "conv1x1" and len(got) == 2:  # also accept a plain Linear
      got = got + (1, 1)
    if tuple(got) != tuple(want):
      mismatched.append(f"{shown(key)}: expected {tuple(want)}, got {tuple(state[key].shape)}")
    else:
      updates.append((entry.variable, _from_torch(state[key], entry.kind)))
  if mismatched:
    raise ValueError(f"{name}: shapes do not fit the model: " + "; ".join(mismatched))
  for variable, value in updates:
    # Converted by numpy, placed by device_put: jnp.asarray would compile a
    # program per tensor shape.
    compat.set_value(variable, jax.device_put(np.asarray(value, np.dtype(variable.dtype))))

  counters = {k for k in state if k.endswith("num_batches_tracked")}
  loaded = [shown(k) for k in entries if k in state]
  missing = [shown(k) for k in entries if k not in state]
  unexpected = [shown(k) for k in state if k not in entries and k not in counters]
  return LoadReport(layout, loaded, missing, unexpected)


def torch_state_dict(model: APNet) -> dict[str, np.ndarray]:
  """The model's weights in the official APNet layout, aliases included."""
  out = {}
  for key, entry in _entries(model).items():
    out[key] = np.asarray(_to_torch(np.asarray(entry.variable[...]), entry.kind), np.float32)
    if key.endswith(".running_var"):
      out[key[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
  # The official model registers the backbone twice (base.* and base_1..5.*);
  # its state dict, and so the official loader, expects both.
  for key in list(out):
    if key.startswith("base."):
      out[_alias(key)] = out[key]
  return out


def _alias(key: str) -> str:
  rest = key[len("base.") :]
  for module, index in (("conv1.", "0."), ("bn1.", "1.")):
    if rest.startswith(module):
      return "base_1." + index + rest[len(module) :]
  m = re.match(r"layer(\d)\.(.*)$", rest)
  return f"base_{int(m.group(1)) + 1}.0.{m.group(2)}"


def save_torch_weights(model: APNet, path: str | os.PathLike) -> None:
  """Writes ``model`` as an official APNet state dict (zip ``.pth``).

  The official code (``Baseline.load_state_dict``) and ``torch.load`` read
  it; so does ``load_torch_weights``. ``num_batches_tracked`` is written as
  0: PyTorch only uses it when BatchNorm momentum is None, which APNet never
  sets.
  """
  torch_io.write_pth(torch_state_dict(model), path)
