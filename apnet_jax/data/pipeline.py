"""Grain input pipelines: P x K training batches and ordered eval batches.

Both pipelines read a random-access *source* (``len()`` and
``__getitem__(int)``, optionally ``__getitems__``) whose records are dicts:

* ``image``: the encoded JPEG/PNG bytes of the original file,
* ``pid`` (int), ``camid`` (int, 0-based),
* ``label`` (int, contiguous train label; -1 outside train),
* ``filename`` (str or bytes).

In production that is ``tfds.data_source(..., decoders={'image':
tfds.decode.SkipDecoding()})``; a list of dicts works too.

Decoding and resizing run on the host (Grain worker processes when
``num_workers > 0``) and produce uint8 (B, H, W, 3) batches; the random train
augmentation and the normalization run on the accelerator
(:mod:`apnet_jax.data.augment`), so only uint8 crosses the bus.

Why batches are built from a step index: Grain's ``DataLoader`` with worker
processes interleaves *records* from its workers and would tear P x K batches
apart. Here element ``s`` of a ``grain.MapDataset`` is the whole batch of step
``s`` (indices from :class:`~apnet_jax.data.sampler.RandomIdentitySampler`,
a pure function of (seed, s)), decoded in one piece; ``mp_prefetch`` then
hands whole batches round-robin to the workers and puts them back in step
order. The iterator state is just the position, so a restored iterator
continues with exactly the batches it would have produced.

Multi-host: every JAX process computes the same global plan and loads only its
contiguous slice ``[i * B / n, (i + 1) * B / n)`` of each global batch, in
process order, which is the layout ``jax.make_array_from_process_local_data``
expects for a batch sharded along its first axis.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
import numpy.typing as npt
from absl import flags
from PIL import Image

from apnet_jax import images
from apnet_jax.data.sampler import (
  RandomIdentitySampler,
  check_int,
  steps_per_epoch,
)

__all__ = [
  "RecordSource",
  "decode_and_resize",
  "eval_batches",
  "steps_per_epoch",
  "train_loader",
]

_THREADS_PER_PROCESS = 2
# Batches decoded ahead per process (>= the threads, so both stay busy).
_PREFETCH_BATCHES = 2


class RecordSource(Protocol):
  """A random-access source of re-ID records (see the module docstring)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


def _as_str(value: Any) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", errors="replace")
  return str(value)


def decode_and_resize(
  image: bytes, *, height: int, width: int, filename: str = "<unknown>"
) -> np.ndarray:
  """Decodes an image to 8-bit RGB (`apnet_jax.images`) and resizes it like the official code.

  The official transforms apply torchvision ``Resize((H, W))`` to a PIL image,
  which calls PIL's ``resize`` with bilinear filtering; so does this.

  Args:
    image: Encoded JPEG/PNG bytes.
    height: Output height.
    width: Output width.
    filename: Named in the error message if decoding fails.

  Returns:
    uint8 (height, width, 3).

  Raises:
    ValueError: If the bytes cannot be decoded, or hold a pixel format with
      no 8-bit RGB reading; the message names ``filename``.
  """
  if not isinstance(image, (bytes, np.bytes_)):
    raise ValueError(
      f"record {filename!r}: 'image' must hold the encoded file bytes, got"
      f" {type(image).__name__} (with TFDS, pass decoders={{'image':"
      " tfds.decode.SkipDecoding()}} to tfds.data_source)."
    )
  rgb = images.decode_rgb(bytes(image), repr(filename))
  if rgb.size != (width, height):
    rgb = rgb.resize((width, height), Image.BILINEAR)
  return np.asarray(rgb, dtype=np.uint8)


def _read_records(source: RecordSource, indices: Sequence[int]) -> list[dict]:
  # ArrayRecord-backed sources read a whole batch faster in one call.
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(list(indices)))
  return [source[i] for i in indices]


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  check_int("process_count", process_count, 1)
  check_int("process_index", process_index, 0)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
  return int(process_index), int(process_count)


def _local_batch_size(global_batch: int, process_count: int, what: str) -> int:
  if global_batch % process_count:
    raise ValueError(
      f"the global batch size {global_batch} ({what}) is not divisible by "
      f"process_count={process_count}; every process must load an equal "
      "share."
    )
  return global_batch // process_count


def _make_iterator(ds: grain.MapDataset, num_workers: int) -> grain.DatasetIterator:
  check_int("num_workers", num_workers, 0)
  # One element is a whole batch (~18 MB at 80 x 384 x 192): keep Grain's
  # defaults (16 threads, 500 elements of read-ahead) far away from it. Two
  # threads per process decode two batches at once (PIL releases the GIL);
  # on a 2-core machine that beat one thread in benchmarks/input_pipeline.py.
  iter_ds = ds.to_iter_dataset(
    grain.ReadOptions(
      num_threads=_THREADS_PER_PROCESS,
      prefetch_buffer_size=_PREFETCH_BATCHES,
    )
  )
  if num_workers:
    # grain 0.2.18 reads an absl flag when starting workers and fails unless
    # flags were parsed (google/grain#1355, fixed upstream by #1362), which
    # breaks notebooks and pytest. Marking them parsed keeps every default.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=num_workers,
        per_worker_buffer_size=_PREFETCH_BATCHES,
      ),
      # The parent's pid from here: a worker that starts after its parent died
      # would see its adopter's pid as its parent's.
      worker_init_fn=functools.partial(_exit_with_parent, os.getpid()),
    )
  return iter(iter_ds)


_PARENT_POLL_S = 0.5


def _exit_with_parent(parent: int, worker_index: int, worker_count: int) -> None:
  """Grain worker start-up: the worker exits as soon as the process that started it is gone.

  A parent killed by SIGKILL (or the OOM killer) cannot stop its workers, and
  Grain's would go on decoding, each holding its batches, for minutes. A
  thread polls the parent pid: it changes only when the parent has died.
  (``PR_SET_PDEATHSIG`` fires when the starting *thread* exits, and Grain may
  start workers from a thread that ends before the process does.)
  """
  del worker_index, worker_count

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(_PARENT_POLL_S)
    os._exit(1)  # no cleanup: the parent that would read anything is gone

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class _TrainBatch:
  """Step -> this process's slice of the decoded P x K batch (picklable)."""

  def __init__(
    self,
    source: RecordSource,
    labels: np.ndarray,
    sampler: RandomIdentitySampler,
    start: int,
    stop: int,
    height: int,
    width: int,
  ):
    self._source = source
    self._labels = labels
    self._sampler = sampler
    self._start, self._stop = start, stop
    self._height, self._width = height, width

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    indices = self._sampler.batch(step)[self._start : self._stop]
    records = _read_records(self._source, indices)
    images = []
    for i, r in zip(indices, records):
      name = f"{_as_str(r.get('filename', '?'))} (record {i})"
      # Labels given separately must describe this source, or the batches
      # would silently stop being P x K.
      if r["label"] != self._labels[i]:
        raise ValueError(
          f"record {name} has label {r['label']} but labels[{i}] is "
          f"{self._labels[i]}: the labels do not belong to this source."
        )
      images.append(
        decode_and_resize(r["image"], height=self._height, width=self._width, filename=name)
      )
    return {
      "image": np.stack(images),
      "label": np.array([r["label"] for r in records], np.int32),
      "pid": np.array([r["pid"] for r in records], np.int32),
      "camid": np.array([r["camid"] for r in records], np.int32),
      "index": np.asarray(indices, np.int64),
    }


def train_loader(
  source: RecordSource,
  labels: npt.ArrayLike | None = None,
  *,
  p: int,
  k: int,
  height: int,
  width: int,
  seed: int,
  num_epochs: int | None = None,
  start_step: int = 0,
  num_workers: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """Returns an iterator over P x K training batches, from batch ``start_step`` on.

  Batch ``s`` (0-based global step) holds P distinct identities x K images
  from ``RandomIdentitySampler(labels, p=p, k=k, seed=seed).batch(s)``; epoch
  ``e`` covers steps ``[e * spe, (e + 1) * spe)`` with
  ``spe = steps_per_epoch(labels, p=p, k=k)``.

  Batches are a pure function of (seed, step), so resuming needs no saved
  iterator state: ``start_step`` set to the checkpoint's step gives exactly
  the batches an uninterrupted run would have seen, with any ``num_workers``.
  With ``num_workers > 0``, call
  ``close()`` on the iterator when done with it, to stop the worker processes
  promptly.

  Args:
    source: Train records (see the module docstring).
    labels: ``labels[i]`` is the train label of record ``i``; read from the
      source (slow: it reads every record) when omitted.
    p: Identities per global batch.
    k: Images per identity.
    height: Output image height (e.g. 384).
    width: Output image width (e.g. 192).
    seed: Seed of the sampling; batches are a pure function of (seed, step).
    num_epochs: Number of epochs to yield (counted from step 0), or None for
      an endless stream.
    start_step: The global step of the first batch (a resumed run's step).
    num_workers: Grain worker processes decoding batches (0 = in-process).
    process_index: This JAX process (default ``jax.process_index()``).
    process_count: Number of JAX processes (default
      ``jax.process_count()``).

  Returns:
    An iterator of dicts with this process's ``p * k / process_count``
    examples: ``image`` uint8 (B, height, width, 3), ``label``, ``pid``,
    ``camid`` int32 (B,), and ``index`` int64 (B,) record indices.

  Raises:
    ValueError: For invalid arguments, labels of the wrong length, fewer
      than ``p`` identities, or a global batch not divisible by
      ``process_count``. When a batch is produced: an undecodable image, or
      a record whose label differs from ``labels``, raises ValueError naming
      the file.
  """
  check_int("height", height, 1)
  check_int("width", width, 1)
  if labels is None:
    labels = np.array([source[i]["label"] for i in range(len(source))])
  labels = np.asarray(labels)
  if labels.shape != (len(source),):
    raise ValueError(
      f"labels has shape {labels.shape} but the source has {len(source)} "
      "records; pass one train label per record."
    )
  sampler = RandomIdentitySampler(labels, p=p, k=k, seed=seed)
  process_index, process_count = _resolve_processes(process_index, process_count)
  local = _local_batch_size(sampler.batch_size, process_count, f"p={p} x k={k}")
  if num_epochs is None:
    num_steps = sys.maxsize
  else:
    check_int("num_epochs", num_epochs, 1)
    num_steps = num_epochs * sampler.steps_per_epoch
  load = _TrainBatch(
    source,
    labels,
    sampler,
    process_index * local,
    (process_index + 1) * local,
    height,
    width,
  )
  check_int("start_step", start_step, 0)
  if start_step > num_steps:
    raise ValueError(
      f"start_step={start_step} lies past the {num_steps} steps of num_epochs={num_epochs}."
    )
  ds = grain.MapDataset.range(start_step, num_steps).map(load)
  return _make_iterator(ds, num_workers)


class _EvalBatch:
  """Batch number -> this process's slice of an ordered, padded batch."""

  def __init__(
    self,
    source: RecordSource,
    batch_size: int,
    start: int,
    stop: int,
    height: int,
    width: int,
  ):
    self._source = source
    self._num_records = len(source)
    self._batch_size = batch_size
    self._start, self._stop = start, stop
    self._height, self._width = height, width

  def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
    first = batch_index * self._batch_size
    indices = np.arange(first + self._start, first + self._stop)
    mask = indices < self._num_records
    real = indices[mask]
    records = _read_records(self._source, real.tolist())
    local = indices.size
    image = np.zeros((local, self._height, self._width, 3), np.uint8)
    pid = np.full(local, -1, np.int32)
    camid = np.full(local, -1, np.int32)
    filename = [""] * local
    for j, (i, r) in enumerate(zip(real, records)):
      name = _as_str(r.get("filename", "?"))
      image[j] = decode_and_resize(
        r["image"],
        height=self._height,
        width=self._width,
        filename=f"{name} (record {i})",
      )
      pid[j], camid[j], filename[j] = r["pid"], r["camid"], name
    return {
      "image": image,
      "pid": pid,
      "camid": camid,
      "index": np.where(mask, indices, -1),
      "filename": np.array(filename, dtype=str),
      "mask": mask,
    }


def eval_batches(
  source: RecordSource,
  *,
  batch_size: int,
  height: int,
  width: int,
  num_workers: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """Yields every record of ``source`` once, in order, in fixed-shape batches.

  Global batch ``j`` covers records ``[j * batch_size, (j + 1) * batch_size)``;
  the last one is padded (zero images, pid/camid/index -1, filename '') and
  ``mask`` marks the real records, so every batch has the same shape and a
  jitted feature extractor compiles once. Use it once for the query and once
  for the gallery. Normalize on device with :func:`augment.normalize`. With
  ``num_workers > 0``, ``close()`` an iterator that is not read to the end.

  Args:
    source: Query or gallery records (see the module docstring).
    batch_size: Global batch size; divisible by ``process_count``.
    height: Output image height.
    width: Output image width.
    num_workers: Grain worker processes decoding batches (0 = in-process).
    process_index: This JAX process (default ``jax.process_index()``).
    process_count: Number of JAX processes (default
      ``jax.process_count()``).

  Returns:
    An iterator of ``ceil(len(source) / batch_size)`` dicts with this
    process's ``batch_size / process_count`` examples: ``image`` uint8
    (B, height, width, 3), ``pid``, ``camid`` int32 (B,), ``index`` int64
    (B,) record indices, ``filename`` str (B,), ``mask`` bool (B,).

  Raises:
    ValueError: For invalid arguments or an empty source. Undecodable images
      raise ValueError naming the file when their batch is produced.
  """
  check_int("batch_size", batch_size, 1)
  check_int("height", height, 1)
  check_int("width", width, 1)
  if len(source) == 0:
    raise ValueError("eval_batches got an empty source (0 records).")
  process_index, process_count = _resolve_processes(process_index, process_count)
  local = _local_batch_size(batch_size, process_count, "eval batch_size")
  load = _EvalBatch(
    source,
    batch_size,
    process_index * local,
    (process_index + 1) * local,
    height,
    width,
  )
  num_batches = math.ceil(len(source) / batch_size)
  ds = grain.MapDataset.range(num_batches).map(load)
  return _make_iterator(ds, num_workers)
