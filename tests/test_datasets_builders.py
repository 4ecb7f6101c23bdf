"""The re-ID builders read their dummy data (folders and zips) correctly.

Expected records are written out by hand from the dummy layouts (see each
builder's dummy_data/), independently of the builders' parsing code.
"""

import json
import shutil

import data_fixtures as fx
import numpy as np
import pytest
import tensorflow_datasets as tfds

from apnet_jax.data import sources
from apnet_jax.datasets import reid_common

# (filename, pid, camid, label) per split, in filename order.
MARKET = {
  "train": [
    ("bounding_box_train/0002_c1s1_000451_03.jpg", 2, 0, 0),
    ("bounding_box_train/0002_c2s1_000301_01.jpg", 2, 1, 0),
    ("bounding_box_train/0007_c3s3_077419_03.jpg", 7, 2, 1),
    ("bounding_box_train/0007_c6s1_000001_01.jpg", 7, 5, 1),
    ("bounding_box_train/0010_c5s1_024601_01.jpg", 10, 4, 2),
  ],
  "query": [
    ("query/0003_c1s1_000101_00.jpg", 3, 0, -1),
    ("query/0004_c2s1_000201_00.jpg", 4, 1, -1),
  ],
  "gallery": [  # the junk -1_c1s1_000401_03.jpg is dropped, pid 0 kept
    ("bounding_box_test/0000_c3s1_000551_05.jpg", 0, 2, -1),
    ("bounding_box_test/0000_c4s1_000601_02.jpg", 0, 3, -1),
    ("bounding_box_test/0003_c1s1_000171_01.jpg", 3, 0, -1),
    ("bounding_box_test/0003_c2s1_000131_01.jpg", 3, 1, -1),
    ("bounding_box_test/0004_c4s1_000251_02.jpg", 4, 3, -1),
    ("bounding_box_test/0005_c6s1_000301_01.jpg", 5, 5, -1),
  ],
}
DUKE = {
  "train": [
    ("bounding_box_train/0001_c2_f0046182.jpg", 1, 1, 0),
    ("bounding_box_train/0001_c5_f0051341.jpg", 1, 4, 0),
    ("bounding_box_train/0003_c1_f0044158.jpg", 3, 0, 1),
    ("bounding_box_train/0003_c8_f0001000.jpg", 3, 7, 1),
  ],
  "query": [
    ("query/0005_c2_f0046985.jpg", 5, 1, -1),
    ("query/0008_c7_f0070000.jpg", 8, 6, -1),
  ],
  "gallery": [
    ("bounding_box_test/0005_c1_f0045000.jpg", 5, 0, -1),
    ("bounding_box_test/0008_c3_f0070001.jpg", 8, 2, -1),
    ("bounding_box_test/0009_c4_f0000001.jpg", 9, 3, -1),
  ],
}
_MSMT_TRAIN = [
  ("train/0000/0000_000_01_0303morning_0008_0.jpg", 0, 0, 0),
  ("train/0000/0000_001_05_0303morning_0009_0.jpg", 0, 4, 0),
  ("train/0001/0001_000_15_0303noon_0010_1.jpg", 1, 14, 1),
]
_MSMT_TEST = {
  "query": [
    ("test/0000/0000_000_02_0303afternoon_0100_0.jpg", 0, 1, -1),
    ("test/0001/0001_000_11_0304morning_0005_0.jpg", 1, 10, -1),
  ],
  "gallery": [
    ("test/0000/0000_001_07_0303afternoon_0200_0.jpg", 0, 6, -1),
    ("test/0001/0001_001_12_0304morning_0006_0.jpg", 1, 11, -1),
    ("test/0001/0001_002_11_0304morning_0007_0.jpg", 1, 10, -1),
  ],
}
MSMT_TRAIN = {"train": _MSMT_TRAIN, **_MSMT_TEST}
MSMT_TRAINVAL = {  # + list_val.txt's image of pid 1
  "train": _MSMT_TRAIN + [("train/0001/0001_003_09_0303noon_0030_0.jpg", 1, 8, 1)],
  **_MSMT_TEST,
}


def cuhk03_np(kind):
  gallery = [
    (f"{kind}/bounding_box_test/0005_c2_2.png", 5, 1, -1),
    (f"{kind}/bounding_box_test/0006_c1_2.png", 6, 0, -1),
    (f"{kind}/bounding_box_test/0006_c2_3.png", 6, 1, -1),
  ]
  if kind == "detected":
    gallery.append((f"{kind}/bounding_box_test/0007_c1_1.png", 7, 0, -1))
  return {
    "train": [
      (f"{kind}/bounding_box_train/0001_c1_1.png", 1, 0, 0),
      (f"{kind}/bounding_box_train/0001_c2_2.png", 1, 1, 0),
      (f"{kind}/bounding_box_train/0002_c1_1.png", 2, 0, 1),
      (f"{kind}/bounding_box_train/0002_c2_3.png", 2, 1, 1),
    ],
    "query": [
      (f"{kind}/query/0005_c1_1.png", 5, 0, -1),
      (f"{kind}/query/0006_c2_1.png", 6, 1, -1),
    ],
    "gallery": gallery,
  }


# (builder, config, root folder in dummy_data, expected records).
CASES = [
  ("market1501", None, "Market-1501-v15.09.15", MARKET),
  ("dukemtmc_reid", None, "DukeMTMC-reID", DUKE),
  ("msmt17", "train", "MSMT17_V1", MSMT_TRAIN),
  ("msmt17", "trainval", "MSMT17_V1", MSMT_TRAINVAL),
  ("cuhk03", "labeled", "cuhk03-np", cuhk03_np("labeled")),
  ("cuhk03", "detected", "cuhk03-np", cuhk03_np("detected")),
]
IDS = [f"{name}-{config}" for name, config, _, _ in CASES]


def _check(builder, expected, root):
  """Records, order, source bytes and metadata annotations are as expected."""
  assert set(builder.info.splits) == {"train", "query", "gallery"}
  for split, rows in expected.items():
    got = fx.records(builder, split)
    assert [r[:4] for r in got] == rows, split
    for filename, *_, image in got:
      # Stored unchanged: the exact bytes of the source file.
      assert image == (root / filename).read_bytes(), filename
    annotations = sources.split_annotations(builder, split)
    np.testing.assert_array_equal(annotations.pid, [r[1] for r in rows])
    np.testing.assert_array_equal(annotations.camid, [r[2] for r in rows])
    np.testing.assert_array_equal(annotations.label, [r[3] for r in rows])


@pytest.mark.parametrize("name,config,root,expected", CASES, ids=IDS)
def test_builds_from_folder(tmp_path, name, config, root, expected):
  builder = fx.build(name, fx.dummy_data(name), tmp_path / "data", config)
  _check(builder, expected, fx.dummy_data(name) / root)
  # The standard TFDS location, readable without our builder classes.
  version_dir = tmp_path / "data" / name / (config or "") / "1.0.0"
  assert str(builder.data_path) == str(version_dir)
  restored = tfds.builder_from_directory(str(version_dir))
  assert restored.info.splits["train"].num_examples == len(expected["train"])


@pytest.mark.parametrize(
  "name,config,root,expected", [CASES[0], CASES[2], CASES[4]], ids=[IDS[0], IDS[2], IDS[4]]
)
def test_builds_from_zip(tmp_path, name, config, root, expected):
  manual = tmp_path / "manual"
  fx.zip_folder(fx.dummy_data(name) / root, manual / f"{root}.zip")
  builder = fx.build(name, manual, tmp_path / "data", config)
  _check(builder, expected, fx.dummy_data(name) / root)
  assert builder.info.metadata["source_layout"] in (root, "CUHK03-NP")


def test_manual_dir_may_be_the_dataset_root(tmp_path):
  root = fx.dummy_data("market1501") / "Market-1501-v15.09.15"
  builder = fx.build("market1501", root, tmp_path / "data")
  _check(builder, MARKET, root)


def test_msmt17_v2_layout_is_detected(tmp_path):
  src = fx.dummy_data("msmt17") / "MSMT17_V1"
  v2 = tmp_path / "manual" / "MSMT17_V2"
  v2.mkdir(parents=True)
  for old, new in (("train", "mask_train_v2"), ("test", "mask_test_v2")):
    shutil.copytree(src / old, v2 / new)
  for lst in src.glob("list_*.txt"):
    (v2 / lst.name).write_bytes(lst.read_bytes())
  builder = fx.build("msmt17", tmp_path / "manual", tmp_path / "data", "train")
  assert builder.info.metadata["source_layout"] == "MSMT17_V2"
  renamed = {
    split: [
      (f.replace("train/", "mask_train_v2/", 1).replace("test/", "mask_test_v2/", 1), *rest)
      for f, *rest in rows
    ]
    for split, rows in MSMT_TRAIN.items()
  }
  _check(builder, renamed, v2)


def _cuhk03_release_expected(kind):
  filelist, pids, indices = fx.cuhk03_protocol()
  train_pids = sorted({pids[i] for i in indices["train"]})
  expected = {}
  for split, index in indices.items():
    rows = []
    for i in index:
      label = train_pids.index(pids[i]) if split == "train" else -1
      rows.append((filelist[i], pids[i], int(filelist[i].split("_")[2]) - 1, label))
    expected[split] = sorted(rows)
  return expected


@pytest.mark.parametrize("zipped", [False, True], ids=["folder", "zip"])
@pytest.mark.parametrize("kind", ["labeled", "detected"])
def test_cuhk03_from_mat_release(tmp_path, kind, zipped):
  manual = fx.write_cuhk03_release(tmp_path / "manual")
  if zipped:
    fx.zip_folder(manual / "cuhk03_release", manual / "cuhk03_release.zip")
    shutil.rmtree(manual / "cuhk03_release")
  builder = fx.build("cuhk03", manual, tmp_path / "data", kind)
  assert builder.info.metadata["source_layout"] == "cuhk03_release"
  expected = _cuhk03_release_expected(kind)
  for split, rows in expected.items():
    got = fx.records(builder, split)
    assert [r[:4] for r in got] == rows
    for filename, *_, image in got:
      assert image[:8] == b"\x89PNG\r\n\x1a\n"  # PNG-encoded once
      pair, person, _, slot = (int(p) for p in filename[:-4].split("_"))
      np.testing.assert_array_equal(fx.decode(image), fx.cuhk03_image(kind, pair, person, slot - 1))


def test_records_are_filename_ordered_and_deterministic(tmp_path):
  a = fx.build("market1501", fx.dummy_data("market1501"), tmp_path / "a")
  b = fx.build("market1501", fx.dummy_data("market1501"), tmp_path / "b")
  for split in ("train", "query", "gallery"):
    ra, rb = fx.records(a, split), fx.records(b, split)
    assert ra == rb
    assert [r[0] for r in ra] == sorted(r[0] for r in ra)
  files = sorted(p.name for p in a.data_path.iterdir() if "array_record" in p.name)
  for name in files:
    assert (a.data_path / name).read_bytes() == (b.data_path / name).read_bytes()


def test_record_format(tmp_path):
  builder = fx.build("market1501", fx.dummy_data("market1501"), tmp_path / "data")
  source = sources.load_split("market1501", "train", data_dir=tmp_path / "data")
  record = source[0]
  assert set(record) == {"image", "pid", "camid", "label", "filename"}
  assert isinstance(record["image"], bytes)
  assert isinstance(record["filename"], bytes)
  for key in ("pid", "camid", "label"):
    assert np.asarray(record[key]).dtype == np.int64
  metadata = json.loads((builder.data_path / "metadata.json").read_text())
  assert metadata["splits"]["train"]["pid"] == [2, 2, 7, 7, 10]


def test_manual_dir_holding_several_benchmarks(tmp_path):
  # Market and Duke share folder names: each builder picks its own root.
  manual = tmp_path / "reid"
  for name, root in (("market1501", "Market-1501-v15.09.15"), ("dukemtmc_reid", "DukeMTMC-reID")):
    shutil.copytree(fx.dummy_data(name) / root, manual / root)
  _check(
    fx.build("market1501", manual, tmp_path / "data"), MARKET, manual / "Market-1501-v15.09.15"
  )
  _check(fx.build("dukemtmc_reid", manual, tmp_path / "data"), DUKE, manual / "DukeMTMC-reID")


def test_image_feature_stores_bytes_and_paths_unchanged(tmp_path):
  # tfds 4.9.10 without TensorFlow: bytes pass through, a path is read as is.
  feature = reid_common.reid_features()["image"]
  path = fx.dummy_data("market1501") / "Market-1501-v15.09.15/query/0003_c1s1_000101_00.jpg"
  data = path.read_bytes()
  assert feature.encode_example(data) == data
  assert feature.encode_example(str(path)) == data
