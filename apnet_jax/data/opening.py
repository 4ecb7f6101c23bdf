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

import os

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from apnet_jax import distributed
from apnet_jax.data import entries, joint, prepare, sources


def open_dataset(
  data_config: ml_collections.ConfigDict,
  entry: entries.DatasetEntry | None = None,
  *,
  key: str = "data.name",
) -> tfds.core.DatasetBuilder:
  """The prepared builder of ``entry``, or of the one dataset ``data.name`` names.

  Args:
    data_config: the config's ``data`` section: where prepared datasets live
      (``data_dir``) and the ``manual_dir`` to prepare ``data.name`` from.
    entry: another dataset (an entry of ``eval.datasets``, a constituent of
      joint training); prepared here only when that needs no download.
    key: the config key that asked for ``entry``, named by the errors.

  Raises:
    FileNotFoundError: the dataset is not prepared and cannot be prepared
      here; the message names it and the command that prepares it.
    ValueError: ``entry`` is None but ``data.name`` joins several datasets.
  """
  main = entry is None  # data.manual_dir prepares the one dataset of data.name only
  if main:
    named = entries.data_entries(data_config, known=sources.BUILDERS)
    if len(named) > 1:
      raise ValueError(
        f"data.name={data_config.name!r} joins {len(named)} datasets; open "
        "each of entries.data_entries(data) (open_train_split does)."
      )
    entry = named[0]
  name, config = entry.name, entry.config
  manual_dir = data_config.manual_dir if main else ""
  data_dir = os.path.expanduser(data_config.data_dir)
  builder = distributed.on_process_0_first(
    lambda: _open_or_prepare(name, config, data_dir, manual_dir, key, main=main),
    f"{name}: process 0 could not open the dataset",
  )
  if jax.process_index() != 0:
    builder = sources.get_builder(name, data_dir=data_dir, config=config or None)
    if not builder.is_prepared():
      raise FileNotFoundError(
        f"{name}: process 0 has it, but process {jax.process_index()} finds nothing in "
        f"{data_dir}. Give all processes one shared --config.data.data_dir, or run "
        "--mode prepare on every host first."
      )
  return builder


def _open_or_prepare(
  name: str, config: str, data_dir: str, manual_dir: str, key: str, *, main: bool
) -> tfds.core.DatasetBuilder:
  builder = sources.get_builder(name, data_dir=data_dir, config=config or None)
  if builder.is_prepared():
    if manual_dir:
      prepare.check_same_source(builder, manual_dir)
    return builder
  if not builder.MANUAL_DOWNLOAD_INSTRUCTIONS or manual_dir:
    return prepare_dataset(name, config, data_dir, manual_dir)
  entry = f"{name}:{config}" if config else name
  if main:  # this run prepares it, given the folder
    how = (
      f"run with --config.data.manual_dir=<the folder holding it> (once; it is then kept "
      f"in {data_dir})"
    )
  else:
    how = (
      "prepare it once with: python run.py --config configs/common.py --mode prepare "
      f"--config.data.name={name}"
      + (f" --config.data.config={config}" if config else "")
      + f" --config.data.data_dir={data_dir} --config.data.manual_dir=<the folder "
      "holding it>"
    )
  raise FileNotFoundError(
    f"{key}: {entry} is not prepared in {data_dir}. Download it as "
    f"apnet_jax/datasets/{name}/README.md says and {how}."
  )


def prepare_dataset(
  name: str, config: str, data_dir: str, manual_dir: str
) -> tfds.core.DatasetBuilder:
  """Builds dataset ``name:config`` (a no-op when built) and prints its statistics table."""
  return prepare.prepare(
    name,
    manual_dir=manual_dir or None,
    data_dir=os.path.expanduser(data_dir),
    config=config or None,
  )


def prepare_data(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """``--mode prepare``: builds the dataset of ``data.name`` from ``data.manual_dir``.

  Raises:
    ValueError: ``data.name`` joins several datasets (one folder cannot hold
      them); the message names each one to prepare on its own.
  """
  named = entries.data_entries(data_config, known=sources.BUILDERS)
  if len(named) > 1:
    each = ", ".join(
      f"--config.data.name={e.name}" + (f" --config.data.config={e.config}" if e.config else "")
      for e in named
    )
    raise ValueError(
      f"data.name={data_config.name!r} joins {len(named)} datasets: prepare each on its own, "
      f"with its folder as --config.data.manual_dir ({each})."
    )
  (entry,) = named
  return prepare_dataset(entry.name, entry.config, data_config.data_dir, data_config.manual_dir)


def open_train_split(data_config: ml_collections.ConfigDict) -> joint.JointTrainSplit:
  """The train split of ``data.name``: one dataset's, or several joined (`joint`)."""
  named = entries.data_entries(data_config, known=sources.BUILDERS)
  if data_config.config and ("+" in data_config.name or ":" in data_config.name):
    logging.warning(
      "data.config=%r is not used: data.name=%r gives each dataset's config (%s).",
      data_config.config,
      data_config.name,
      ", ".join(map(str, named)),
    )
  if len(named) == 1:
    builders = [open_dataset(data_config)]
  else:
    builders = [open_dataset(data_config, entry) for entry in named]
  return joint.joint_train_split(builders)


def num_train_ids(data_config: ml_collections.ConfigDict) -> int:
  """Train identities of ``data.name`` (summed over joined datasets): from each prepared
  dataset, else from its published statistics."""
  total = 0
  for entry in entries.data_entries(data_config, known=sources.BUILDERS):
    builder = sources.get_builder(
      entry.name, data_dir=os.path.expanduser(data_config.data_dir), config=entry.config or None
    )
    if builder.is_prepared():
      total += int(len(np.unique(sources.split_annotations(builder, "train").label)))
    elif prepare.dataset_key(builder) in prepare.STANDARD_STATISTICS:
      total += prepare.STANDARD_STATISTICS[prepare.dataset_key(builder)]["train"].ids
    else:
      total += int(builder.builder_config.num_train_ids)
  return total
