"""The train split of joint training: the train splits of several datasets as one.

`joint_train_split` concatenates the train splits of the constituents, in the
order given, into one random-access source in the record format of
`apnet_jax.data.sources.load_split`, which `apnet_jax.data.pipeline.train_loader`
reads. Identities stay distinct: the ``label`` of a record of constituent
``c`` is offset by the train ids of the constituents before it, so the labels
of the union are 0..num_classes-1 and the P x K sampler draws over all of them.

``pid`` and ``camid`` keep their values within their own dataset (camera 0 of
Market-1501 is not camera 0 of DukeMTMC-reID): `JointTrainSplit.constituent`
says which dataset each record, and so each batch entry (through the batch's
``index``), comes from. With one constituent the split is that dataset's train
split record for record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from apnet_jax.data import sources
from apnet_jax.data.entries import DatasetEntry


class ConcatenatedSource:
  """Several train sources read as one, each record's ``label`` offset by its source's.

  Picklable (Grain's worker processes receive it) when its sources are.
  """

  def __init__(self, parts: Sequence[Sequence[dict[str, Any]]], label_offsets: Sequence[int]):
    if len(parts) != len(label_offsets):
      raise ValueError(f"{len(parts)} sources but {len(label_offsets)} label offsets.")
    self._parts = list(parts)
    self._offsets = [int(o) for o in label_offsets]
    # Record index at which each part starts, and the total as the last entry.
    self._starts = np.cumsum([0] + [len(p) for p in self._parts])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _locate(self, index: int) -> tuple[int, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} is outside the joint train split of {len(self)} records.")
    part = int(np.searchsorted(self._starts, index, side="right")) - 1
    return part, index - int(self._starts[part])

  def _offset(self, record: dict[str, Any], part: int) -> dict[str, Any]:
    return {**record, "label": record["label"] + self._offsets[part]}

  def __getitem__(self, index: int) -> dict[str, Any]:
    part, local = self._locate(int(index))
    return self._offset(self._parts[part][local], part)

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """The records of ``indices`` in that order, each source read once (faster for ArrayRecord)."""
    located = [self._locate(int(i)) for i in indices]
    records: list[dict[str, Any] | None] = [None] * len(located)
    for part, source in enumerate(self._parts):
      mine = [j for j, (p, _) in enumerate(located) if p == part]
      if not mine:
        continue
      wanted = [located[j][1] for j in mine]
      if hasattr(source, "__getitems__"):
        read = list(source.__getitems__(wanted))
      else:
        read = [source[i] for i in wanted]
      for j, record in zip(mine, read):
        records[j] = self._offset(record, part)
    return records


@dataclasses.dataclass(frozen=True)
class JointTrainSplit:
  """The union of the constituents' train splits.

  Attributes:
    entries: the constituents, in order, with the builder config each resolved
      to (``msmt17`` reads as ``msmt17:train``): what a workdir records.
    source: the records (`ConcatenatedSource`): constituent 0's first, with
      offset labels; pass it to `pipeline.train_loader`.
    labels: (N,) int64 offset train labels in record order, for the sampler
      (``train_loader``'s ``labels``).
    num_classes: the sum of the constituents' train ids: the classifier's size.
    label_offsets: per constituent, the label of its first identity.
    constituent: (N,) int32, per record, the index of its constituent in
      ``entries``; a record's ``pid`` and ``camid`` are those of that dataset.
  """

  entries: tuple[DatasetEntry, ...]
  source: ConcatenatedSource
  labels: np.ndarray
  num_classes: int
  label_offsets: tuple[int, ...]
  constituent: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


def joint_train_split(builders: Sequence[tfds.core.DatasetBuilder]) -> JointTrainSplit:
  """Joins the train splits of prepared datasets, in the order given.

  Args:
    builders: the opened builders of the constituents (at least one).

  Returns:
    The joint split; with one builder its records, labels and batches are
    those of ``sources.load_split(builder, 'train')`` and
    ``sources.split_annotations(builder, 'train').label``.

  Raises:
    ValueError: no builder; one dataset given twice (the same prepared copy),
      which would train each of its persons as two identities; train labels
      that are not 0..n-1 (the message names the dataset's folder).
    FileNotFoundError: a dataset that is not prepared (from `sources`).
  """
  if not builders:
    raise ValueError("joint_train_split needs at least one dataset.")
  seen: dict[str, str] = {}
  for builder in builders:
    path = str(builder.data_path)
    if path in seen:
      raise ValueError(
        f"{builder.info.full_name} is given twice ({path}): each of its persons "
        "would be trained as two identities."
      )
    seen[path] = builder.info.full_name
  parts, labels, offsets, constituent = [], [], [], []
  num_classes = 0
  for index, builder in enumerate(builders):
    label = sources.split_annotations(builder, "train").label
    num_ids = len(np.unique(label))
    # Offsets add up the ids before: they leave no gap and no overlap only when
    # every dataset labels its identities 0..n-1.
    if not np.array_equal(np.unique(label), np.arange(num_ids)):
      raise ValueError(
        f"{builder.data_path}: the train labels are not 0..{num_ids - 1}; "
        "rebuild the dataset with apnet_jax.data.prepare."
      )
    parts.append(sources.load_split(builder, "train"))
    labels.append(label + num_classes)
    offsets.append(num_classes)
    constituent.append(np.full(len(label), index, np.int32))
    num_classes += num_ids
  entries = tuple(
    DatasetEntry(b.name, b.builder_config.name if b.builder_config else "") for b in builders
  )
  return JointTrainSplit(
    entries=entries,
    source=ConcatenatedSource(parts, offsets),
    labels=np.concatenate(labels),
    num_classes=num_classes,
    label_offsets=tuple(offsets),
    constituent=np.concatenate(constituent),
  )
