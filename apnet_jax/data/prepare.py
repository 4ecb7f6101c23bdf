"""Builds the re-ID datasets (TFDS ArrayRecord) and reports their statistics.

`prepare` builds a dataset into ``data_dir/<name>/[<config>/]<version>/``,
the standard TFDS location (readable with `tfds.builder_from_directory` and
`apnet_jax.data.sources.load_split`), showing TFDS's progress bars, and
prints a table of ids / images / cameras per split. A second call reuses the
built dataset. A failed build leaves nothing loadable behind: TFDS writes
into a temporary folder and renames it only on success. TFDS deletes that
folder when the build raises; the folders of builds that were killed are
deleted by the next successful `prepare` of the same dataset.

`STANDARD_STATISTICS` holds the benchmarks' published statistics. `prepare`
compares every benchmark it prepares with them and warns
(`StatisticsWarning`, naming the dataset, each split and both counts) where
they differ: expected for partial or dummy copies, a sign of the wrong or an
incomplete folder otherwise. `check_standard_statistics` makes the comparison
an error. To check real data after preparing it::

    python -c "from apnet_jax.data import prepare; \
prepare.check_standard_statistics('market1501', data_dir='~/tensorflow_datasets')"

(add ``config='detected'`` etc. for CUHK03 and MSMT17). It prints the table
and raises ValueError naming every split whose statistics differ.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from apnet_jax import progress
from apnet_jax.data import sources
from apnet_jax.datasets import reid_common

# TFDS's notice, while it builds, that the unfinished version folder is not a
# prepared dataset yet: true of every build, so it tells a user nothing.
progress.quiet_log_lines("Variant folder ")


@dataclasses.dataclass(frozen=True)
class SplitStatistics:
  """Counts of one split: distinct pids (pid 0 counts as one), images, cameras."""

  ids: int
  images: int
  cameras: int


Statistics = Mapping[str, SplitStatistics]


class StatisticsWarning(UserWarning):
  """A prepared benchmark's statistics differ from the published ones."""


def _table(
  train: tuple[int, int, int], query: tuple[int, int, int], gallery: tuple[int, int, int]
) -> dict[str, SplitStatistics]:
  return {
    "train": SplitStatistics(*train),
    "query": SplitStatistics(*query),
    "gallery": SplitStatistics(*gallery),
  }


# Published statistics (ids, images, cameras) per dataset key (see
# `dataset_key`); Market-1501's gallery counts the distractors (pid 0) as one
# id. MSMT17 V1 and V2 have the same counts.
STANDARD_STATISTICS: Mapping[str, Statistics] = {
  "market1501": _table((751, 12936, 6), (750, 3368, 6), (751, 15913, 6)),
  "dukemtmc_reid": _table((702, 16522, 8), (702, 2228, 8), (1110, 17661, 8)),
  "cuhk03/labeled": _table((767, 7368, 2), (700, 1400, 2), (700, 5328, 2)),
  "cuhk03/detected": _table((767, 7365, 2), (700, 1400, 2), (700, 5332, 2)),
  "msmt17/train": _table((1041, 30248, 15), (3060, 11659, 15), (3060, 82161, 15)),
  "msmt17/trainval": _table((1041, 32621, 15), (3060, 11659, 15), (3060, 82161, 15)),
}


def dataset_key(builder: tfds.core.DatasetBuilder) -> str:
  """'<name>' or '<name>/<config>', e.g. 'cuhk03/labeled'."""
  config = builder.builder_config
  return f"{builder.name}/{config.name}" if config else builder.name


def prepare(
  name: str,
  *,
  manual_dir: str | os.PathLike[str] | None,
  data_dir: str | os.PathLike[str],
  config: sources.Config = None,
  **builder_kwargs: Any,
) -> tfds.core.DatasetBuilder:
  """Builds dataset ``name`` (if not built yet) and prints its statistics.

  A benchmark whose statistics differ from `STANDARD_STATISTICS` gets a
  `StatisticsWarning`, not an error: partial and dummy copies are legitimate.

  Args:
    name: a dataset of `apnet_jax.data.sources.BUILDERS`, e.g. 'market1501'.
    manual_dir: the folder holding the downloaded archive or its extracted
      folder (see the builder's README.md); None for 'synthetic_reid'.
    data_dir: where to build, e.g. '~/tensorflow_datasets'.
    config: builder config or its name (e.g. 'detected' for cuhk03,
      'trainval' for msmt17, a `SyntheticReidConfig`); None for the default.
    **builder_kwargs: more arguments of the builder class.

  Returns:
    The prepared builder.

  Raises:
    ValueError: unknown name, missing manual_dir, a dataset of the same name
      built from a different config, or bad input data (the message names
      the file).
    FileNotFoundError: the manual dir or an expected file is missing.
  """
  data_dir = os.path.expanduser(os.fspath(data_dir))
  builder = sources.get_builder(
    name,
    data_dir=data_dir,
    config=config,
    file_format="array_record",
    **builder_kwargs,
  )
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and manual_dir is None:
    raise ValueError(
      f"{name} needs manual_dir, the folder holding its files:\n"
      f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
    )
  if builder.data_path.exists() and builder.is_prepared():
    _check_same_config(builder)
    check_same_source(builder, manual_dir)
  elif builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    _check_manual_dir(name, manual_dir, builder.MANUAL_DOWNLOAD_INSTRUCTIONS)
  download_config = tfds.download.DownloadConfig(
    manual_dir=None if manual_dir is None else os.path.expanduser(os.fspath(manual_dir))
  )
  builder.download_and_prepare(download_config=download_config)
  _remove_killed_builds(builder)
  stats = split_statistics(builder)
  key = dataset_key(builder)
  print(format_statistics(stats, title=key))
  if key in STANDARD_STATISTICS:
    problems = statistics_mismatches(stats, STANDARD_STATISTICS[key])
    if problems:
      warnings.warn(
        f"{key} at {builder.data_path} differs from the published statistics"
        " (fine for a partial or dummy copy; otherwise check that manual_dir"
        " holds the complete, right benchmark):\n  " + "\n  ".join(problems),
        StatisticsWarning,
        stacklevel=2,
      )
  return builder


def _check_manual_dir(name: str, manual_dir: str | os.PathLike[str], instructions: str) -> None:
  """Refuses a manual_dir that cannot hold the dataset, before TFDS starts a build.

  TFDS would stop with an AssertionError that names neither the dataset nor
  the setting; an existing but unrelated folder is the builder's to judge.
  """
  path = os.path.expanduser(os.fspath(manual_dir))
  if not os.path.isdir(path):
    problem = "is a file, not a folder" if os.path.exists(path) else "does not exist"
  elif not os.listdir(path):
    problem = "is empty"
  else:
    return
  raise FileNotFoundError(
    f"{name}: manual_dir {path} {problem}; pass the folder holding its files "
    f"(data.manual_dir):\n{instructions}"
  )


def _remove_killed_builds(builder: tfds.core.DatasetBuilder) -> None:
  """Deletes TFDS's temporary folders of this dataset version left by killed builds.

  They sit next to the built version as ``incomplete.XXXXXX_<version>``; no
  other file is touched. (A build of the same version still running elsewhere
  could not finish anyway: its rename onto the built version would fail.)
  """
  unfinished = re.compile(
    re.escape(tfds.core.constants.INCOMPLETE_PREFIX)
    + r"[A-Z0-9]{6}_"
    + re.escape(str(builder.version))
  )
  for path in builder.data_path.parent.iterdir():
    if unfinished.fullmatch(path.name) and path.is_dir():
      path.rmtree()


def _check_same_config(builder: tfds.core.DatasetBuilder) -> None:
  """Refuses to reuse a dataset built from another config of the same name."""
  built = (builder.info.metadata or {}).get("config")
  wanted = reid_common.config_fields(builder.builder_config)
  if built is not None and built != wanted:
    raise ValueError(
      f"{builder.data_path} was built from config {built}, not {wanted}."
      " Give the config another name, or use another data_dir."
    )


def check_same_source(
  builder: tfds.core.DatasetBuilder, manual_dir: str | os.PathLike[str] | None
) -> None:
  """Refuses to pass off a prepared dataset as built from another ``manual_dir``.

  A prepared dataset is reused as it is; a new folder would be ignored without
  a word. Datasets built before the folder was recorded are let through.
  """
  built = (builder.info.metadata or {}).get("manual_dir")
  if manual_dir is None or built is None:
    return
  wanted = os.path.realpath(os.path.expanduser(os.fspath(manual_dir)))
  if wanted != built:
    if getattr(builder, "ANY_CONFIG_NAME", False):  # a name of the user's: pick another
      remedy = (
        "prepare it under another name (--config.data.config=NEW_NAME), or delete "
        f"{builder.data_path} and prepare again"
      )
    else:
      remedy = (
        f"delete {builder.data_path} (or give another --config.data.data_dir) and prepare again"
      )
    raise ValueError(
      f"{builder.data_path} was prepared from manual_dir {built}, not {wanted}; nothing was "
      f"rebuilt. To prepare {wanted}, {remedy}; to use the prepared one, set "
      f"--config.data.manual_dir={built} or leave it empty."
    )


def split_statistics(
  name_or_builder: sources.DatasetRef,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  config: sources.Config = None,
) -> dict[str, SplitStatistics]:
  """The ids / images / cameras of every split of a prepared dataset."""
  builder = sources.get_builder(name_or_builder, data_dir=data_dir, config=config)
  stats = {}
  for split in builder.info.splits:
    annotations = sources.split_annotations(builder, split)
    stats[split] = SplitStatistics(
      ids=len(np.unique(annotations.pid)),
      images=len(annotations),
      cameras=len(np.unique(annotations.camid)),
    )
  return {s: stats[s] for s in reid_common.SPLITS if s in stats}


def format_statistics(stats: Statistics, *, title: str = "") -> str:
  """A text table of ``stats``: one row per split."""
  rows = [f"{'split':<8} {'ids':>7} {'images':>8} {'cameras':>8}"]
  rows += [f"{split:<8} {s.ids:>7,} {s.images:>8,} {s.cameras:>8}" for split, s in stats.items()]
  width = max(len(r) for r in rows)
  header = [title, "-" * width] if title else []
  return "\n".join(header + rows)


def statistics_mismatches(actual: Statistics, expected: Statistics) -> list[str]:
  """Describes every split whose statistics differ; empty when all match."""
  problems = []
  for split, want in expected.items():
    got = actual.get(split)
    if got is None:
      problems.append(f"{split}: missing (expected {want})")
    elif got != want:
      problems.append(f"{split}: {got}, expected {want}")
  problems += [f"{split}: unexpected split" for split in actual if split not in expected]
  return problems


def check_standard_statistics(
  name_or_builder: sources.DatasetRef,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  config: sources.Config = None,
  expected: Statistics | None = None,
) -> dict[str, SplitStatistics]:
  """Prints a prepared dataset's statistics and checks them.

  Args:
    name_or_builder: a dataset name or builder (as `sources.load_split`).
    data_dir: the data dir (with a name).
    config: the builder config (with a name); None for the default.
    expected: the statistics to expect; default: `STANDARD_STATISTICS` of
      the dataset.

  Returns:
    The dataset's statistics.

  Raises:
    ValueError: some statistics differ (all differences are named), or no
      standard statistics exist for the dataset.
  """
  builder = sources.get_builder(name_or_builder, data_dir=data_dir, config=config)
  key = dataset_key(builder)
  if expected is None:
    if key not in STANDARD_STATISTICS:
      raise ValueError(
        f"No standard statistics for {key}; known: {', '.join(STANDARD_STATISTICS)}."
      )
    expected = STANDARD_STATISTICS[key]
  actual = split_statistics(builder)
  print(format_statistics(actual, title=key))
  problems = statistics_mismatches(actual, expected)
  if problems:
    raise ValueError(
      f"{key} at {builder.data_path} differs from the expected statistics:\n  "
      + "\n  ".join(problems)
    )
  return actual
