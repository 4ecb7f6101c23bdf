"""Where arrays live: the device mesh, and host batches placed on it.

Training and evaluation share one 1-D mesh with axis ``'data'`` over every
device of every process. A global batch is one array sharded along its first
axis; the train state and the model are replicated. Process ``i`` loads the
``i``-th contiguous block of each global batch (`apnet_jax.data.pipeline`),
and `make_mesh` orders the devices so that block sits on its devices.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  """The training mesh: all devices on one ``'data'`` axis, grouped by process.

  ``jax.make_mesh`` orders devices for the interconnect; regrouping them (a
  stable sort, so nothing moves on one host) makes process ``i`` hold the
  ``i``-th contiguous block of every global batch, the slice that
  ``pipeline.train_loader`` and ``pipeline.eval_batches`` load for it.
  """
  mesh = jax.make_mesh((jax.device_count(),), (DATA_AXIS,))
  devices = sorted(mesh.devices.flat, key=lambda device: device.process_index)
  return Mesh(np.array(devices), (DATA_AXIS,), axis_types=mesh.axis_types)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of batch arrays: first axis split over the mesh's ``'data'`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of the train state: a full copy on every device."""
  return NamedSharding(mesh, P())


def check_mesh(mesh: Mesh) -> None:
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(
      f"the mesh needs a {DATA_AXIS!r} axis, got axes {mesh.axis_names}; build it with "
      "sharding.make_mesh()."
    )


@functools.lru_cache(maxsize=8)  # called every step; a failing check is not cached
def _check_process_rows(sharding: NamedSharding) -> None:
  # The pipelines load block i of each batch on process i; its devices must hold that block.
  shards = sharding.mesh.shape[DATA_AXIS]
  rows = sorted(
    {index[0].start for index in sharding.addressable_devices_indices_map((shards,)).values()}
  )
  first = jax.process_index() * len(rows)
  if rows != list(range(first, first + len(rows))):
    raise ValueError(
      f"shard_batch: process {jax.process_index()} loads block {jax.process_index()} of each "
      f"batch, but its devices hold the mesh's shards {rows} of {shards}; build the mesh "
      "with sharding.make_mesh(), which groups the devices by process."
    )


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Host numpy batch -> global device arrays sharded along ``'data'``.

  Every entry whose first axis is the batch is placed; strings and other
  non-numeric entries are dropped. Single process: ``batch`` is the global
  batch (``jax.device_put``). Multi-process: ``batch`` is this process's
  contiguous slice of the global batch, as ``train_loader`` yields it, and
  the global array is assembled with ``jax.make_array_from_process_local_data``.

  Args:
    batch: dict of numpy (or array-like) entries with a common first axis.
    mesh: the training mesh.

  Returns:
    A dict of sharded ``jax.Array``.
  """
  check_mesh(mesh)
  sharding = data_sharding(mesh)
  # Each process holds the rows of its own devices (the whole batch when single-process).
  local_shards = len(mesh.local_devices)
  if jax.process_count() > 1:
    _check_process_rows(sharding)
  out = {}
  for key, value in batch.items():
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
      continue
    if array.ndim == 0 or array.shape[0] % local_shards:
      raise ValueError(
        f"shard_batch: batch[{key!r}] has shape {array.shape}; its first axis must be "
        f"divisible by the {local_shards} devices this process feeds."
      )
    if jax.process_count() == 1:
      out[key] = jax.device_put(array, sharding)
    else:
      out[key] = jax.make_array_from_process_local_data(sharding, array)
  return out
