"""The datasets a run reads: opened, or prepared first when that needs no download.

A run names its datasets in its config: ``data`` for training (one dataset,
or several joined for joint training) and ``eval.datasets`` for evaluation.
`open_dataset` gives the builder of one of them, preparing it when it can
(``data.manual_dir`` is set, or the builder needs no download, like
``synthetic_reid``) and otherwise refusing with the command that prepares it,
before anything is trained. With several JAX processes, process 0 opens (or
prepares) it first and the others open it after: one writer for a shared
``data.data_dir``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from apnet_jax import distributed
from apnet_jax.data import prepare, sources


def open_dataset(data_config: ml_collections.ConfigDict, *, name: str | None = None,
                 config: str | None = None, key: str = "data.name") -> tfds.core.DatasetBuilder:
  """The prepared builder of dataset ``name:config`` (default: ``data.name:data.config``).

  Args:
    data_config: the config's ``data`` section: where prepared datasets live
      (``data_dir``) and, for ``data.name`` itself, the ``manual_dir`` to
      prepare it from.
    name, config: another dataset than ``data.name`` (an entry of
      ``eval.datasets``, a constituent of a joint ``data.name``); it is
      prepared here only when that needs no download.
    key: the config key that asked for the dataset, named by the errors.

  Raises:
    FileNotFoundError: the dataset is not prepared and cannot be prepared
      here; the message names it and the command that prepares it.
  """
  main = name is None  # data.manual_dir prepares data.name only
  if main:
    name, config = data_config.name, data_config.config
  manual_dir = data_config.manual_dir if main else ""
  data_dir = os.path.expanduser(data_config.data_dir)
  builder = distributed.on_process_0_first(
      lambda: _open_or_prepare(name, config, data_dir, manual_dir, key, main=main),
      f"{name}: process 0 could not open the dataset")
  if jax.process_index() != 0:
    builder = sources.get_builder(name, data_dir=data_dir, config=config or None)
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"{name}: process 0 has it, but process {jax.process_index()} finds nothing in "
          f"{data_dir}. Give all processes one shared --config.data.data_dir, or run "
          "--mode prepare on every host first.")
  return builder


def _open_or_prepare(name: str, config: str, data_dir: str, manual_dir: str, key: str, *,
                     main: bool) -> tfds.core.DatasetBuilder:
  builder = sources.get_builder(name, data_dir=data_dir, config=config or None)
  if builder.is_prepared():
    if manual_dir:
      prepare.check_same_source(builder, manual_dir)
    return builder
  if not builder.MANUAL_DOWNLOAD_INSTRUCTIONS or manual_dir:
    return prepare_dataset(name, config, data_dir, manual_dir)
  entry = f"{name}:{config}" if config else name
  if main:  # this run prepares it, given the folder
    how = (f"run with --config.data.manual_dir=<the folder holding it> (once; it is then kept "
           f"in {data_dir})")
  else:
    how = ("prepare it once with: python run.py --config configs/common.py --mode prepare "
           f"--config.data.name={name}" + (f" --config.data.config={config}" if config else "")
           + f" --config.data.data_dir={data_dir} --config.data.manual_dir=<the folder "
           "holding it>")
  raise FileNotFoundError(f"{key}: {entry} is not prepared in {data_dir}. Download it as "
                          f"apnet_jax/datasets/{name}/README.md says and {how}.")


def prepare_dataset(name: str, config: str, data_dir: str,
                    manual_dir: str) -> tfds.core.DatasetBuilder:
  """Builds dataset ``name:config`` (a no-op when built) and prints its statistics table."""
  return prepare.prepare(name, manual_dir=manual_dir or None,
                         data_dir=os.path.expanduser(data_dir), config=config or None)


def prepare_data(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """``--mode prepare``: builds the dataset of ``data_config`` from ``data.manual_dir``."""
  return prepare_dataset(data_config.name, data_config.config, data_config.data_dir,
                         data_config.manual_dir)


def num_train_ids(data_config: ml_collections.ConfigDict) -> int:
  """Train identities: from the prepared dataset, else its published statistics."""
  builder = sources.get_builder(data_config.name, data_dir=os.path.expanduser(
      data_config.data_dir), config=data_config.config or None)
  if builder.is_prepared():
    return int(len(np.unique(sources.split_annotations(builder, "train").label)))
  known = prepare.STANDARD_STATISTICS.get(prepare.dataset_key(builder))
  if known is not None:
    return known["train"].ids
  return int(builder.builder_config.num_train_ids)


@dataclasses.dataclass(frozen=True)
class TrainSplit:
  """The records training draws from, and their identities."""

  source: Any  # random access: record i as `apnet_jax.data.sources` describes it
  labels: np.ndarray  # (N,) int64 train label of each record, 0..num_classes-1
  num_classes: int


def open_train_split(data_config: ml_collections.ConfigDict) -> TrainSplit:
  """The train split of ``data.name`` (opened, or prepared, as `open_dataset` does)."""
  builder = open_dataset(data_config)
  labels = sources.split_annotations(builder, "train").label
  return TrainSplit(sources.load_split(builder, "train"), labels, int(len(np.unique(labels))))
