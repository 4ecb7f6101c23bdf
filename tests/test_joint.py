"""Joint training data: name[:config] entries, and the train splits of two datasets as one.

The two datasets are `synthetic_reid:tiny` (8 train ids, 3 cameras) and a
`reid_folder` dataset written here (3 train ids), so the expected joint labels
can be written out by hand.
"""

import pickle

import data_fixtures as fx
import ml_collections
import numpy as np
import pytest

from apnet_jax import config_check
from apnet_jax.data import joint, pipeline, sources
from apnet_jax.data.entries import DatasetEntry, data_entries, parse_entries
from configs import joint as joint_config

SYNTHETIC_TRAIN_IDS = 8  # synthetic_reid:tiny, by its builder config
# The folder's train images and what the joint split must make of them: it
# comes second, so its labels (pid order) start after the synthetic ones.
FOLDER_TRAIN = [  # (filename, pid, camid, joint label)
  ("train/0005_c1_a.jpg", 5, 0, 8),
  ("train/0005_c2_b.jpg", 5, 1, 8),
  ("train/0009_c1_a.jpg", 9, 0, 9),
  ("train/0009_c2_a.jpg", 9, 1, 9),
  ("train/0012_c1_a.jpg", 12, 0, 10),
  ("train/0012_c1_b.jpg", 12, 0, 10),
  ("train/0012_c2_a.jpg", 12, 1, 10),
]
FOLDER_TEST = ["query/0020_c1_q.jpg", "gallery/0020_c2_g.jpg"]
H, W = 32, 16


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  """(synthetic_reid:tiny, reid_folder:mycams), prepared once."""
  root = tmp_path_factory.mktemp("joint")
  names = [row[0] for row in FOLDER_TRAIN] + FOLDER_TEST
  for seed, name in enumerate(names):
    (root / "mine" / name).parent.mkdir(parents=True, exist_ok=True)
    (root / "mine" / name).write_bytes(fx.jpeg_bytes(seed))
  synthetic = fx.build("synthetic_reid", None, root / "data", config="tiny")
  folder = fx.build("reid_folder", root / "mine", root / "data", config="mycams")
  return synthetic, folder


def loader(split, **kwargs):
  args = {
    "p": 9,
    "k": 2,
    "height": H,
    "width": W,
    "seed": 0,
    "num_epochs": 1,
    "process_index": 0,
    "process_count": 1,
  }
  return pipeline.train_loader(split.source, split.labels, **{**args, **kwargs})


def assert_same_batches(got, want):
  assert len(got) == len(want) > 0
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --- The joint split ------------------------------------------------------------


def test_the_classes_are_the_sum_and_the_folder_follows_the_synthetic_ids(datasets):
  synthetic, folder = datasets
  split = joint.joint_train_split([synthetic, folder])
  assert split.num_classes == SYNTHETIC_TRAIN_IDS + 3
  assert split.entries == (
    DatasetEntry("synthetic_reid", "tiny"),
    DatasetEntry("reid_folder", "mycams"),
  )
  assert split.label_offsets == (0, SYNTHETIC_TRAIN_IDS)
  first = len(split) - len(FOLDER_TRAIN)
  assert [
    (r["filename"].decode(), r["pid"], r["camid"], r["label"])
    for r in (split.source[i] for i in range(first, len(split)))
  ] == FOLDER_TRAIN
  np.testing.assert_array_equal(split.labels[first:], [row[3] for row in FOLDER_TRAIN])
  np.testing.assert_array_equal(split.constituent, [0] * first + [1] * len(FOLDER_TRAIN))
  # The labels of the two datasets are disjoint and together cover every class.
  synthetic_labels, folder_labels = set(split.labels[:first]), set(split.labels[first:])
  assert not synthetic_labels & folder_labels
  assert synthetic_labels | folder_labels == set(range(split.num_classes))
  assert [r["label"] for r in split.source.__getitems__(range(len(split)))] == list(split.labels)


def test_a_batch_draws_identities_of_both_datasets_and_keeps_their_records(datasets):
  synthetic, folder = datasets
  split = joint.joint_train_split([synthetic, folder])
  originals = [sources.load_split(synthetic, "train"), sources.load_split(folder, "train")]
  # 9 identities per batch: more than either dataset has alone.
  batches = list(loader(split))
  assert batches
  for batch in batches:
    assert len(set(batch["label"])) == 9
    from_dataset = split.constituent[batch["index"]]
    assert set(from_dataset) == {0, 1}
    for j, (index, dataset) in enumerate(zip(batch["index"], from_dataset)):
      # The record of its own dataset: pid, camid and pixels unchanged, label offset.
      record = originals[dataset][int(index) - (0 if dataset == 0 else len(originals[0]))]
      assert (batch["pid"][j], batch["camid"][j]) == (record["pid"], record["camid"])
      assert batch["label"][j] == record["label"] + (0, SYNTHETIC_TRAIN_IDS)[dataset]
      np.testing.assert_array_equal(
        batch["image"][j], pipeline.decode_and_resize(record["image"], height=H, width=W)
      )


def test_one_dataset_gives_exactly_its_own_train_split(datasets):
  synthetic, _ = datasets
  split = joint.joint_train_split([synthetic])
  source = sources.load_split(synthetic, "train")
  labels = sources.split_annotations(synthetic, "train").label
  assert split.num_classes == SYNTHETIC_TRAIN_IDS and split.label_offsets == (0,)
  assert [split.source[i] for i in range(len(split))] == [source[i] for i in range(len(source))]
  np.testing.assert_array_equal(split.labels, labels)
  assert split.labels.dtype == labels.dtype
  want = pipeline.train_loader(
    source,
    labels,
    p=4,
    k=2,
    height=H,
    width=W,
    seed=3,
    num_epochs=1,
    process_index=0,
    process_count=1,
  )
  assert_same_batches(list(loader(split, p=4, seed=3)), list(want))


def test_batches_are_a_function_of_seed_and_step(datasets):
  split = joint.joint_train_split(list(datasets))
  reference = list(loader(split, num_epochs=2))
  assert_same_batches(list(loader(split, num_epochs=2)), reference)
  # What bitwise resume rests on: a loader started at step s gives the batches from s on.
  for start in (1, len(reference) - 1):
    assert_same_batches(list(loader(split, num_epochs=2, start_step=start)), reference[start:])
  other = next(loader(split, seed=1))
  assert not np.array_equal(other["index"], reference[0]["index"])


def test_the_source_survives_pickling_as_grain_workers_receive_it(datasets):
  split = joint.joint_train_split(list(datasets))
  copy = pickle.loads(pickle.dumps(split.source))
  indices = [len(split) - 1, 0, 50, 3]
  assert copy.__getitems__(indices) == [split.source[i] for i in indices]


def test_a_dataset_given_twice_or_none_is_refused(datasets):
  synthetic, folder = datasets
  with pytest.raises(ValueError, match=r"synthetic_reid/tiny/1\.0\.0 is given twice"):
    joint.joint_train_split([synthetic, folder, synthetic])
  with pytest.raises(ValueError, match="at least one dataset"):
    joint.joint_train_split([])


def test_a_record_past_the_end_is_refused(datasets):
  split = joint.joint_train_split(list(datasets))
  with pytest.raises(IndexError, match=f"record {len(split)} is outside"):
    split.source[len(split)]


# --- Entries ----------------------------------------------------------------------


def test_entries_keep_their_order_and_configs():
  assert parse_entries(
    "market1501+dukemtmc_reid+msmt17:train", separator="+", known=sources.BUILDERS
  ) == (
    DatasetEntry("market1501", ""),
    DatasetEntry("dukemtmc_reid", ""),
    DatasetEntry("msmt17", "train"),
  )
  assert parse_entries("dukemtmc_reid, msmt17,reid_folder:mycams", separator=",") == (
    DatasetEntry("dukemtmc_reid"),
    DatasetEntry("msmt17"),
    DatasetEntry("reid_folder", "mycams"),
  )
  assert [str(e) for e in parse_entries("cuhk03:detected+market1501", separator="+")] == [
    "cuhk03:detected",
    "market1501",
  ]


@pytest.mark.parametrize(
  "text, match",
  [
    ("market1501++msmt17", r"data\.name='market1501\+\+msmt17': entry 2 is empty"),
    ("market1501+", "entry 2 is empty"),
    ("", "entry 1 is empty"),
    ("msmt17:", r"entry 'msmt17:' is not name\[:config\]"),
    (":train", r"entry ':train' is not name\[:config\]"),
    ("market1501+duke", r"entry 'duke' names no known dataset; known: cuhk03, dukemtmc_reid"),
    ("msmt17:train+market1501+msmt17:train", "entry 'msmt17:train' is given twice"),
  ],
)
def test_bad_entries_are_refused_by_entry(text, match):
  with pytest.raises(ValueError, match=match):
    parse_entries(text, separator="+", known=sources.BUILDERS, key="data.name")


def data(name, config=""):
  return ml_collections.ConfigDict({"name": name, "config": config})


def test_the_datasets_of_a_data_section():
  assert data_entries(data("cuhk03", "detected")) == (DatasetEntry("cuhk03", "detected"),)
  assert data_entries(data("market1501")) == (DatasetEntry("market1501", ""),)
  assert data_entries(data("msmt17:trainval")) == (DatasetEntry("msmt17", "trainval"),)
  assert data_entries(data("market1501+cuhk03:labeled"), known=sources.BUILDERS) == (
    DatasetEntry("market1501"),
    DatasetEntry("cuhk03", "labeled"),
  )


def test_entries_that_carry_configs_leave_data_config_unused():
  # As with configs/folder.py, whose data.config is 'default' until data.name joins datasets.
  assert data_entries(data("market1501+cuhk03", "detected")) == (
    DatasetEntry("market1501"),
    DatasetEntry("cuhk03"),
  )
  assert data_entries(data("cuhk03:labeled", "detected")) == (DatasetEntry("cuhk03", "labeled"),)


# --- Config -----------------------------------------------------------------------


def test_the_joint_config_checks_and_names_the_three_benchmarks():
  config = joint_config.get_config()
  config_check.check(config, "train", datasets=sources.BUILDERS)
  assert data_entries(config.data, known=sources.BUILDERS) == (
    DatasetEntry("market1501"),
    DatasetEntry("dukemtmc_reid"),
    DatasetEntry("msmt17", "train"),
  )
  with pytest.raises(ValueError, match="configs/joint.py takes no argument"):
    joint_config.get_config("bn")


def test_the_config_check_refuses_bad_entries_by_name():
  config = joint_config.get_config()
  config.data.name = "market1501+msmt"
  config.data.config = "train"
  with pytest.raises(config_check.ConfigError) as refusal:
    config_check.check(config, "prepare", datasets=sources.BUILDERS)
  assert [key for key, _, _ in refusal.value.problems] == ["data.name"]
  assert "entry 'msmt' names no known dataset" in str(refusal.value)


def test_the_joint_config_classifies_the_published_train_identities(tmp_path):
  # Nothing prepared: --mode summary counts from the benchmarks' published statistics,
  # Market-1501 751, DukeMTMC-reID 702 and MSMT17 1,041 train identities.
  from apnet_jax.data import opening

  config = joint_config.get_config()
  config.data.data_dir = str(tmp_path)
  assert opening.num_train_ids(config.data) == 751 + 702 + 1041
