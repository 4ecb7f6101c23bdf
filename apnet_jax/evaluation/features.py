"""Feature extraction for evaluation: image + horizontal flip, summed.

As the official code does, the evaluation feature of an image is the model's
eval-mode feature of the image plus that of its horizontal flip; the
evaluator L2-normalizes it. Batches have one fixed shape (the last one is
padded and masked) so extraction compiles once, and are sharded over the
mesh's ``data`` axis. With several JAX processes each one decodes only its
share of every batch; the step gathers the features (and pids, camids, mask)
of the whole batch onto every process.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apnet_jax import progress, sharding
from apnet_jax.data import augment, pipeline
from apnet_jax.models import layers
from apnet_jax.platform import cpu

EVAL_FEATURES = {"bn": "feat", "global": "global_feat", "logits": "logits"}


def make_embed_fn(
  graphdef: nnx.GraphDef, eval_feature: str, *, conv_general_dilated=jax.lax.conv_general_dilated
):
  """A jittable fn(state, uint8 images) -> summed features of image and flip.

  ``conv_general_dilated``: the convolution the model is traced with (see
  `apnet_jax.models.layers.convolution`); a platform's own from
  `apnet_jax.platform`, or plain lax for a function that runs anywhere.
  """
  if eval_feature not in EVAL_FEATURES:
    raise ValueError(
      f"model.eval_feature must be one of {sorted(EVAL_FEATURES)}, got {eval_feature!r}"
    )
  key = EVAL_FEATURES[eval_feature]

  def embed(state, images):
    model = nnx.merge(graphdef, state)
    model.eval()
    x = augment.normalize(images)
    with layers.convolution(conv_general_dilated):
      both = model(jnp.concatenate([x, x[:, :, ::-1]], axis=0))[key]
    n = images.shape[0]
    return (both[:n] + both[n:]).astype(jnp.float32)

  return embed


def extract_features(
  model: nnx.Module,
  source: Any,
  *,
  eval_feature: str,
  input_size: tuple[int, int],
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
  num_workers: int = 0,
  desc: str = "features",
) -> dict[str, np.ndarray]:
  """Features, pids and camids of every record of ``source``, in order.

  Args:
    model: an APNet (its mode is not changed; extraction runs in eval mode).
    source: a random-access record source (see `apnet_jax.data.sources`).
    eval_feature: 'bn', 'global' or 'logits'.
    input_size: (height, width) the images are resized to.
    batch_size: images per forward pass (all processes together); a multiple
      of the mesh size.
    mesh: a 1-D mesh with axis 'data'; ``sharding.make_mesh()`` when None.
    num_workers: Grain worker processes for decoding.
    desc: what the progress bar calls the images (e.g. 'query', 'gallery'). The
      bar counts images, not batches, and is drawn by process 0 only.

  Returns:
    ``{'features': (N, D) float32, 'pid': (N,), 'camid': (N,)}``, the same
    on every process.
  """
  if mesh is None:
    mesh = sharding.make_mesh()
  if batch_size % mesh.size:
    raise ValueError(f"eval.batch_size={batch_size} must be a multiple of the {mesh.size} devices")
  graphdef, state = nnx.split(model)
  replicated = sharding.replicated_sharding(mesh)
  if jax.process_count() > 1:
    # JAX moves no array across hosts: one on this process's devices alone (a
    # restored checkpoint) joins the global mesh from host memory.
    state = jax.tree.map(
      lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x, state
    )
  state = jax.device_put(state, replicated)
  embed = make_embed_fn(graphdef, eval_feature, conv_general_dilated=cpu.convolution_for(mesh))
  # Replicated outputs: the whole batch's rows reach every process.
  embed_and_gather = jax.jit(
    lambda state, batch: (
      embed(state, batch["image"]),
      batch["pid"],
      batch["camid"],
      batch["mask"],
    ),
    in_shardings=(replicated, sharding.data_sharding(mesh)),
    out_shardings=replicated,
    compiler_options=cpu.compiler_options(mesh),
  )
  height, width = input_size
  features, pids, camids = [], [], []
  with progress.bar(len(source), desc, "img") as bar:
    for batch in pipeline.eval_batches(
      source, batch_size=batch_size, height=height, width=width, num_workers=num_workers
    ):
      local = {key: batch[key] for key in ("image", "pid", "camid", "mask")}
      # device_get waits for the batch, so the bar follows the device, not the dispatch.
      out, pid, camid, mask = jax.device_get(
        embed_and_gather(state, sharding.shard_batch(local, mesh))
      )
      features.append(out[mask])
      pids.append(pid[mask])
      camids.append(camid[mask])
      bar.update(int(mask.sum()))
  return {
    "features": np.concatenate(features),
    "pid": np.concatenate(pids),
    "camid": np.concatenate(camids),
  }
