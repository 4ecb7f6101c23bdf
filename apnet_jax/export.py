"""The feature extractor as a self-contained file, through ``jax.export``.

The exported function takes uint8 images (B, H, W, 3) of the trained input
size, any batch size B, and returns the evaluation features the evaluator
uses: the model's eval-mode feature of each image plus that of its
horizontal flip (``apnet_jax.evaluation.features``). The weights are baked
in, so loading needs neither the model code nor a checkpoint: only JAX.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.export  # a submodule that `import jax` alone loads only in newer releases
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apnet_jax.evaluation.features import make_embed_fn

# Serialized by a version of JAX that the loader must be able to read; the
# file starts with this tag so a wrong file is recognised at once.
_MAGIC = b"APNET-JAX-EXPORT-1\n"


def export_feature_extractor(
  model: nnx.Module,
  path: str | os.PathLike,
  *,
  input_size: tuple[int, int],
  eval_feature: str,
  platforms: tuple[str, ...] = ("cpu", "cuda", "tpu"),
) -> None:
  """Serializes ``model``'s feature extractor for any batch size to ``path``.

  Args:
    model: the trained APNet.
    path: the file to write (replaced only once it is complete).
    input_size: (height, width) of the input images.
    eval_feature: 'bn', 'global' or 'logits'.
    platforms: where the file may run.
  """
  graphdef, state = nnx.split(model)
  embed = make_embed_fn(graphdef, eval_feature)
  state = jax.device_get(state)

  def extractor(images):
    return embed(state, images)

  batch = jax.export.symbolic_shape("batch")[0]
  height, width = input_size
  exported = jax.export.export(jax.jit(extractor), platforms=platforms)(
    jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8)
  )
  path = os.fspath(path)
  with open(path + ".tmp", "wb") as f:
    f.write(_MAGIC + exported.serialize())
  os.replace(path + ".tmp", path)


def load(path: str | os.PathLike) -> Callable[[np.ndarray], jax.Array]:
  """The feature extractor of an exported file: uint8 (B, H, W, 3) -> (B, D)."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  if not data.startswith(_MAGIC):
    raise ValueError(f"{path} is not a feature extractor written by apnet_jax.export")
  try:
    exported = jax.export.deserialize(bytearray(data[len(_MAGIC) :]))
  except Exception as e:  # the flatbuffer reader raises assorted errors
    raise ValueError(f"{path}: the exported function cannot be read ({e})") from e
  (shape,) = [a.shape for a in exported.in_avals]

  def extract(images):
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8 or images.shape[1:] != shape[1:]:
      raise ValueError(
        f"{path} takes uint8 images of shape (B, {shape[1]}, {shape[2]}, 3), "
        f"got {images.dtype} {tuple(images.shape)}"
      )
    return exported.call(images)

  return extract
