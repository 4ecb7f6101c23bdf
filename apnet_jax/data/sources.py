"""Random-access data sources of the prepared re-ID datasets.

`load_split` opens one split (``train``, ``query`` or ``gallery``) of a
dataset prepared by `apnet_jax.data.prepare.prepare` as a TFDS ArrayRecord
data source. Record ``i`` is a dict, the format the Grain pipeline
(`apnet_jax.data.pipeline`) consumes:

* ``image``: bytes, the encoded JPEG/PNG exactly as in the source files (not
  decoded: the pipeline decodes);
* ``pid``: np.int64 person id (0 = distractor, in the gallery of Market-1501 and
  reid_folder only);
* ``camid``: np.int64 0-based camera index;
* ``label``: np.int64 contiguous train label (0..num_train_ids-1, in pid
  order) in ``train``, -1 in ``query`` and ``gallery``;
* ``filename``: bytes (UTF-8), the image's path relative to the dataset root.

Records are in filename order. `split_annotations` returns the pid, camid and
label columns of a whole split without reading any image (they are stored in
the dataset's metadata at build time), e.g. for the P x K sampler.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from apnet_jax.data import entries
from apnet_jax.datasets.cuhk03 import cuhk03_dataset_builder
from apnet_jax.datasets.dukemtmc_reid import dukemtmc_reid_dataset_builder
from apnet_jax.datasets.market1501 import market1501_dataset_builder
from apnet_jax.datasets.msmt17 import msmt17_dataset_builder
from apnet_jax.datasets.reid_folder import reid_folder_dataset_builder
from apnet_jax.datasets.synthetic_reid import synthetic_reid_dataset_builder

# Dataset name -> TFDS builder class.
BUILDERS: Mapping[str, type[tfds.core.GeneratorBasedBuilder]] = {
  "market1501": market1501_dataset_builder.Builder,
  "dukemtmc_reid": dukemtmc_reid_dataset_builder.Builder,
  "cuhk03": cuhk03_dataset_builder.Builder,
  "msmt17": msmt17_dataset_builder.Builder,
  "synthetic_reid": synthetic_reid_dataset_builder.Builder,
  "reid_folder": reid_folder_dataset_builder.Builder,
}

DatasetRef = str | tfds.core.DatasetBuilder
Config = str | tfds.core.BuilderConfig | None


def resolved(entry: entries.DatasetEntry) -> entries.DatasetEntry:
  """``entry`` with the config TFDS opens for it written out (``msmt17`` -> ``msmt17:train``).

  An entry without a config opens its builder's default: the
  ``DEFAULT_BUILDER_CONFIG_NAME``, else the first of ``BUILDER_CONFIGS``; a
  builder without configs keeps ''.
  """
  if entry.config or entry.name not in BUILDERS:
    return entry
  builder = BUILDERS[entry.name]
  configs = builder.BUILDER_CONFIGS or []
  default = builder.DEFAULT_BUILDER_CONFIG_NAME or (configs[0].name if configs else "")
  return entries.DatasetEntry(entry.name, default)


def same_training_data(first: Any, second: Any) -> bool:
  """Whether two ``data`` sections (configs or their dicts) train on the same datasets.

  Spellings of one list of datasets agree: ``msmt17`` and ``msmt17:train``,
  ``data.name=msmt17`` with ``data.config=train``, spaces around a ``+``. The
  order counts (it sets each dataset's identity labels). A section that does
  not parse agrees with none.
  """
  try:
    return [resolved(e) for e in entries.data_entries(first, known=BUILDERS)] == [
      resolved(e) for e in entries.data_entries(second, known=BUILDERS)
    ]
  except (ValueError, TypeError, KeyError):
    return False


def get_builder(
  name_or_builder: DatasetRef,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  config: Config = None,
  **builder_kwargs: Any,
) -> tfds.core.DatasetBuilder:
  """Returns the builder of a dataset (a registered name) or ``builder`` itself.

  Args:
    name_or_builder: a name of `BUILDERS` or a builder instance (returned
      unchanged; then ``data_dir`` and ``config`` must be None).
    data_dir: the folder holding ``<name>/[<config>/]<version>/``.
    config: a builder config or its name; None for the default.
    **builder_kwargs: more arguments of the builder class.

  Raises:
    ValueError: unknown name, or arguments given with a builder instance.
  """
  if isinstance(name_or_builder, tfds.core.DatasetBuilder):
    if data_dir is not None or config is not None or builder_kwargs:
      raise ValueError("Pass data_dir/config only with a dataset name, not with a builder.")
    return name_or_builder
  if name_or_builder not in BUILDERS:
    raise ValueError(f"Unknown dataset {name_or_builder!r}; known: {', '.join(BUILDERS)}.")
  if data_dir is None:
    raise ValueError("data_dir is required with a dataset name.")
  return BUILDERS[name_or_builder](data_dir=os.fspath(data_dir), config=config, **builder_kwargs)


def _prepared_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
  """Raises a clear error unless ``split`` of ``builder`` can be read."""
  if not builder.is_prepared():
    raise FileNotFoundError(
      f"Dataset {builder.info.full_name} is not prepared: nothing at"
      f" {builder.data_path}. Build it first with"
      f" apnet_jax.data.prepare.prepare({builder.name!r}, ...)."
    )
  if split not in builder.info.splits:
    raise ValueError(
      f"{builder.info.full_name} has no split {split!r}; it has {', '.join(builder.info.splits)}."
    )


def load_split(
  name_or_builder: DatasetRef,
  split: str,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  config: Config = None,
) -> Sequence[dict[str, Any]]:
  """Opens a prepared split as a random-access source of records.

  Args:
    name_or_builder: a dataset name of `BUILDERS`, or a builder instance.
    split: 'train', 'query' or 'gallery'.
    data_dir: the data dir it was prepared into (with a name).
    config: the builder config (with a name); None for the default.

  Returns:
    A TFDS ArrayRecord data source (supports ``len`` and indexing) whose
    records hold the encoded image bytes (see the module docstring).

  Raises:
    FileNotFoundError: the dataset was not prepared in ``data_dir``.
    ValueError: unknown dataset or split, or a damaged split file.
  """
  builder = get_builder(name_or_builder, data_dir=data_dir, config=config)
  _prepared_split(builder, split)
  source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  _check_readable(builder, split, source)
  return source


def _check_readable(
  builder: tfds.core.DatasetBuilder, split: str, source: Sequence[dict[str, Any]]
) -> None:
  """Refuses a split whose ArrayRecord file is damaged, naming it and the fix.

  A truncated file (a full disk or an interrupted copy) loses the index at
  its end, and every record then reads as fields of None, which would fail
  far downstream with a misleading message. Its first and last records show it.
  """
  for index in sorted({0, len(source) - 1}) if len(source) else ():
    if source[index].get("image") is None:
      files = sorted(
        p.name for p in builder.data_path.iterdir() if f"-{split}.array_record" in p.name
      )
      raise ValueError(
        f"{builder.data_path}: the {split} split ({', '.join(files)}) cannot be read "
        f"(record {index} is empty): the file is damaged, e.g. truncated by a full disk "
        f"or an interrupted copy. Delete {builder.data_path} and prepare the dataset "
        "again (--mode prepare with its data.manual_dir)."
      )


@dataclasses.dataclass(frozen=True)
class SplitAnnotations:
  """The identity columns of a split, in record order.

  Attributes:
    pid: (N,) int64 person ids.
    camid: (N,) int64 0-based cameras.
    label: (N,) int64 train labels (-1 outside train).
  """

  pid: np.ndarray
  camid: np.ndarray
  label: np.ndarray

  def __len__(self) -> int:
    return len(self.pid)


def split_annotations(
  name_or_builder: DatasetRef,
  split: str,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  config: Config = None,
) -> SplitAnnotations:
  """The pid/camid/label arrays of a prepared split, without reading images.

  Arguments as `load_split`.

  Raises:
    FileNotFoundError: the dataset was not prepared in ``data_dir``.
    ValueError: unknown split, or metadata that does not match the records.
  """
  builder = get_builder(name_or_builder, data_dir=data_dir, config=config)
  _prepared_split(builder, split)
  metadata = builder.info.metadata or {}
  try:
    columns = metadata["splits"][split]
    annotations = SplitAnnotations(
      **{k: np.asarray(columns[k], np.int64) for k in ("pid", "camid", "label")}
    )
  except (KeyError, TypeError) as e:
    raise ValueError(
      f"{builder.data_path}/metadata.json lacks the annotations of {split}"
      f" ({e!r}); rebuild the dataset with apnet_jax.data.prepare."
    ) from None
  expected = builder.info.splits[split].num_examples
  if not len(annotations.pid) == len(annotations.camid) == len(annotations.label) == expected:
    raise ValueError(
      f"{builder.data_path}/metadata.json: the {split} annotations do not"
      f" match its {expected} records; rebuild the dataset."
    )
  return annotations
