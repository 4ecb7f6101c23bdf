"""prepare(): registry, statistics table, statistics check, config reuse."""

import dataclasses
import pathlib
import warnings

import data_fixtures as fx
import pytest
import tensorflow_datasets as tfds

from apnet_jax.data import prepare, sources
from apnet_jax.datasets.synthetic_reid import SyntheticReidConfig

# Counted by hand from market1501/dummy_data (junk dropped, pid 0 kept).
MARKET_DUMMY = {
  "train": prepare.SplitStatistics(ids=3, images=5, cameras=5),
  "query": prepare.SplitStatistics(ids=2, images=2, cameras=2),
  "gallery": prepare.SplitStatistics(ids=4, images=6, cameras=5),
}


def test_registry_names_the_builders():
  assert sorted(sources.BUILDERS) == [
    "cuhk03",
    "dukemtmc_reid",
    "market1501",
    "msmt17",
    "reid_folder",
    "synthetic_reid",
  ]
  for name, cls in sources.BUILDERS.items():
    assert cls.name == name  # the TFDS name, hence the data_dir folder


def test_standard_statistics_cover_every_real_config():
  keys = set()
  for name, cls in sources.BUILDERS.items():
    if name in ("synthetic_reid", "reid_folder"):  # no published statistics
      continue
    configs = [c.name for c in cls.BUILDER_CONFIGS] or [None]
    keys.update(f"{name}/{c}" if c else name for c in configs)
  assert keys == set(prepare.STANDARD_STATISTICS)


def test_prepare_prints_statistics_and_reuses(tmp_path, capsys):
  builder = fx.build("market1501", fx.dummy_data("market1501"), tmp_path)
  out = capsys.readouterr().out
  assert "market1501" in out
  assert "gallery        4        6        5" in out
  assert prepare.split_statistics(builder) == MARKET_DUMMY
  assert prepare.split_statistics("market1501", data_dir=tmp_path) == MARKET_DUMMY
  # A second call from the same folder reuses the built dataset (another folder is
  # refused: tests/test_datasets_errors.py).
  info = pathlib.Path(builder.data_path) / "dataset_info.json"
  mtime = info.stat().st_mtime_ns
  fx.build("market1501", fx.dummy_data("market1501"), tmp_path)
  assert info.stat().st_mtime_ns == mtime


def test_prepare_warns_where_statistics_differ_from_the_published(tmp_path, monkeypatch):
  with pytest.warns(prepare.StatisticsWarning) as caught:
    prepare.prepare("market1501", manual_dir=fx.dummy_data("market1501"), data_dir=tmp_path)
  # Only ours: older libraries add deprecation warnings of their own.
  [warning] = [w for w in caught if issubclass(w.category, prepare.StatisticsWarning)]
  message = str(warning.message)
  assert message.startswith(f"market1501 at {tmp_path / 'market1501' / '1.0.0'} differs")
  for split, stats in MARKET_DUMMY.items():
    published = prepare.STANDARD_STATISTICS["market1501"][split]
    assert f"{split}: {stats}, expected {published}" in message
  # Matching statistics: no warning (nor on reuse).
  monkeypatch.setitem(prepare.STANDARD_STATISTICS, "market1501", MARKET_DUMMY)
  with warnings.catch_warnings():
    warnings.simplefilter("error", prepare.StatisticsWarning)
    prepare.prepare("market1501", manual_dir=fx.dummy_data("market1501"), data_dir=tmp_path)


def test_check_statistics_passes_on_match_and_names_mismatches(tmp_path, capsys):
  builder = fx.build("market1501", fx.dummy_data("market1501"), tmp_path)
  assert prepare.check_standard_statistics(builder, expected=MARKET_DUMMY) == MARKET_DUMMY
  wrong = dict(MARKET_DUMMY, query=prepare.SplitStatistics(2, 3, 2))
  with pytest.raises(ValueError, match=r"query: SplitStatistics\(ids=2, images=2"):
    prepare.check_standard_statistics(builder, expected=wrong)
  # Against the published table the dummy data must fail, on every split.
  with pytest.raises(ValueError) as e:
    prepare.check_standard_statistics("market1501", data_dir=tmp_path)
  for split in ("train", "query", "gallery"):
    assert f"{split}: SplitStatistics" in str(e.value)
  assert "ids=751, images=12936, cameras=6" in str(e.value)


def test_statistics_mismatches_reports_missing_and_extra_splits():
  stats = {"train": prepare.SplitStatistics(1, 2, 1)}
  expected = {"query": prepare.SplitStatistics(1, 2, 1)}
  assert prepare.statistics_mismatches(stats, expected) == [
    "query: missing (expected SplitStatistics(ids=1, images=2, cameras=1))",
    "train: unexpected split",
  ]


def test_prepared_dataset_is_readable_by_tfds_alone(tmp_path):
  builder = fx.build("msmt17", fx.dummy_data("msmt17"), tmp_path, "trainval")
  restored = tfds.builder_from_directory(str(tmp_path / "msmt17" / "trainval" / "1.0.0"))
  source = restored.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
  assert len(source) == 4
  assert restored.info.metadata["source_layout"] == "MSMT17_V1"
  assert builder.info.full_name == "msmt17/trainval/1.0.0"


def test_reusing_a_name_with_another_config_is_refused(tmp_path):
  mine = SyntheticReidConfig(
    name="mine",
    num_train_ids=3,
    num_test_ids=3,
    num_distractors=1,
    num_cameras=2,
    images_per_id_per_camera=2,
    height=32,
    width=16,
  )
  prepare.prepare("synthetic_reid", manual_dir=None, data_dir=tmp_path, config=mine)
  other = dataclasses.replace(mine, seed=1)
  with pytest.raises(ValueError, match=r"synthetic_reid/mine\b.*'seed': 0.*'seed': 1"):
    prepare.prepare("synthetic_reid", manual_dir=None, data_dir=tmp_path, config=other)
  renamed = dataclasses.replace(mine, name="mine_seed1", seed=1)
  builder = prepare.prepare("synthetic_reid", manual_dir=None, data_dir=tmp_path, config=renamed)
  assert builder.info.metadata["config"]["seed"] == 1
  assert str(builder.data_path).endswith("synthetic_reid/mine_seed1/1.0.0")
