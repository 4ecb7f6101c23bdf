"""reid_folder: one's own images, labelled by file names or labels.csv.

The tests make their folders (tiny PNG and JPEG images written with PIL);
expected records are written out by hand from those layouts.
"""

import json
import os
import re
import subprocess
import sys
import zipfile

import data_fixtures as fx
import numpy as np
import PIL.Image
import pytest

from apnet_jax import config_check
from apnet_jax.data import opening, sources
from apnet_jax.datasets.reid_folder import UnmatchedQueryWarning
from configs.folder import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_image(path, seed, size=(16, 8)):
  """A tiny random image; PNG or JPEG after the file's suffix."""
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3)).astype(np.uint8)
  PIL.Image.fromarray(pixels).save(path)
  return path


# (filename, pid, camid, label) per split, in filename order: Market-style
# names, images in subfolders, a camera past 9, junk and a distractor.
NAMED_FILES = {
  "train": ["1501/1501_c1_a.jpg", "1501/1501_c12_b.png", "7/0007_c2_a.png", "0007_c3_b.jpg"],
  "query": ["0003_c1_x.png", "0004_c2_x.jpg"],
  "gallery": ["0003_c2_y.png", "0004_c1_y.png", "0004_c5_z.jpg", "0000_c4_d.png", "-1_c1_junk.png"],
}
NAMED = {
  "train": [
    ("train/0007_c3_b.jpg", 7, 2, 0),
    ("train/1501/1501_c12_b.png", 1501, 11, 1),
    ("train/1501/1501_c1_a.jpg", 1501, 0, 1),
    ("train/7/0007_c2_a.png", 7, 1, 0),
  ],
  "query": [("query/0003_c1_x.png", 3, 0, -1), ("query/0004_c2_x.jpg", 4, 1, -1)],
  "gallery": [
    ("gallery/0000_c4_d.png", 0, 3, -1),
    ("gallery/0003_c2_y.png", 3, 1, -1),
    ("gallery/0004_c1_y.png", 4, 0, -1),
    ("gallery/0004_c5_z.jpg", 4, 4, -1),
  ],
}


def named_folder(root, folders=("train", "query", "gallery")):
  for seed, (split, folder) in enumerate(zip(NAMED_FILES, folders)):
    for i, name in enumerate(NAMED_FILES[split]):
      write_image(root / folder / name, 10 * seed + i)
  return root


# labels.csv with string pids and camids; the images' names say nothing.
CSV_ROWS = [
  ("train/alice/1.png", "alice", "north"),
  ("train/alice/2.jpg", "alice", "south"),
  ("train/bob/1.png", "bob", "north"),
  ("train/bob/2.png", "bob", "east"),
  ("query/q1.png", "carol", "north"),
  ("query/q2.png", "dave", "south"),
  ("gallery/g1.png", "carol", "south"),
  ("gallery/g2.jpg", "dave", "east"),
  ("gallery/g3.png", "erin", "north"),
]
# pids: alice bob carol dave erin -> 1..5; camids: east north south -> 0..2.
CSV = {
  "train": [
    ("train/alice/1.png", 1, 1, 0),
    ("train/alice/2.jpg", 1, 2, 0),
    ("train/bob/1.png", 2, 1, 1),
    ("train/bob/2.png", 2, 0, 1),
  ],
  "query": [("query/q1.png", 3, 1, -1), ("query/q2.png", 4, 2, -1)],
  "gallery": [
    ("gallery/g1.png", 3, 2, -1),
    ("gallery/g2.jpg", 4, 0, -1),
    ("gallery/g3.png", 5, 1, -1),
  ],
}


def write_csv(root, rows, header="path,pid,camid"):
  lines = [header] + [",".join(row) for row in rows]
  (root / "labels.csv").write_text("\n".join(lines) + "\n")


def csv_folder(root, rows=CSV_ROWS):
  for i, (path, _, _) in enumerate(rows):
    write_image(root / path, i)
  write_csv(root, rows)
  return root


def build(manual_dir, data_dir, name=None):
  return fx.build("reid_folder", manual_dir, data_dir, config=name)


def split_records(builder):
  return {split: [r[:4] for r in fx.records(builder, split)] for split in NAMED}


def assert_nothing_built(data_dir):
  """No prepared or half-written version of any name under data_dir."""
  left = [p for p in (data_dir / "reid_folder").glob("*/*") if p.is_dir()]
  assert not left, left


# --- Reading --------------------------------------------------------------------


def test_market_style_names(tmp_path):
  manual = named_folder(tmp_path / "mine")
  builder = build(manual, tmp_path / "data")
  assert split_records(builder) == NAMED
  assert str(builder.data_path) == str(tmp_path / "data" / "reid_folder" / "default" / "1.0.0")
  assert builder.info.metadata["source_layout"] == "file names"
  record = fx.records(builder, "train")[1]
  assert record[4] == (manual / "train/1501/1501_c12_b.png").read_bytes()  # stored unchanged


def test_market_folder_names_are_accepted(tmp_path):
  manual = named_folder(tmp_path / "mine", ("bounding_box_train", "query", "bounding_box_test"))
  records = split_records(build(manual, tmp_path / "data"))
  rename = {"train/": "bounding_box_train/", "gallery/": "bounding_box_test/"}
  expected = {
    split: [
      (re.sub(r"^(train|gallery)/", lambda m: rename[m.group(0)], f), *rest) for f, *rest in rows
    ]
    for split, rows in NAMED.items()
  }
  assert records == expected


def test_labels_csv_with_string_ids(tmp_path):
  builder = build(csv_folder(tmp_path / "mine"), tmp_path / "data", "mycams")
  assert split_records(builder) == CSV
  assert builder.info.metadata["source_layout"] == "labels.csv"
  assert builder.info.metadata["labels_csv"] == {
    "pid": ["alice", "bob", "carol", "dave", "erin"],
    "camid": ["east", "north", "south"],
  }


def test_labels_csv_integer_ids_sort_as_numbers(tmp_path):
  rows = [
    ("train/a.png", "10", "3"),
    ("train/b.png", "9", "12"),
    ("query/c.png", "100", "3"),
    ("gallery/d.png", "100", "12"),
    ("gallery/e.png", "0", "3"),
  ]
  manual = csv_folder(tmp_path / "mine", rows)
  write_csv(manual, [("train\\b.png", *rows[1][1:])] + rows[:1] + rows[2:])  # Windows' separator
  builder = build(manual, tmp_path / "data")
  assert builder.info.metadata["labels_csv"] == {"pid": [0, 9, 10, 100], "camid": [3, 12]}
  # pid 0 of the CSV is a person like any other: record pid 1, never a distractor.
  assert split_records(builder) == {
    "train": [("train/a.png", 3, 0, 1), ("train/b.png", 2, 1, 0)],
    "query": [("query/c.png", 4, 0, -1)],
    "gallery": [("gallery/d.png", 4, 1, -1), ("gallery/e.png", 1, 0, -1)],
  }


def test_a_zip_in_the_folder_is_read_as_extracted(tmp_path):
  src = csv_folder(tmp_path / "src")
  manual = tmp_path / "mine"
  manual.mkdir()
  with zipfile.ZipFile(manual / "shop.zip", "w") as zf:
    for path in sorted(src.rglob("*")):
      if path.is_file():
        zf.write(path, path.relative_to(src).as_posix())
  assert split_records(build(manual, tmp_path / "data")) == CSV


@pytest.mark.slow
def test_prepare_command_prints_the_statistics_table(tmp_path):
  manual = csv_folder(tmp_path / "mine")
  result = subprocess.run(
    [
      sys.executable,
      "run.py",
      "--config",
      "configs/folder.py",
      "--mode",
      "prepare",
      f"--config.data.manual_dir={manual}",
      "--config.data.config=mycams",
      f"--config.data.data_dir={tmp_path / 'data'}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "reid_folder/mycams" in result.stdout
  for row in (
    "train          2        4        3",
    "query          2        2        2",
    "gallery        3        3        3",
  ):
    assert row in result.stdout, result.stdout
  assert (tmp_path / "data" / "reid_folder" / "mycams" / "1.0.0").is_dir()


# --- Names in one data_dir ---------------------------------------------------------


def test_two_names_stay_apart_and_another_folder_under_a_name_is_refused(tmp_path):
  named, csv = named_folder(tmp_path / "named"), csv_folder(tmp_path / "csv")
  data = tmp_path / "data"
  first = build(named, data, "cams_a")
  second = build(csv, data, "cams_b")
  assert first.data_path != second.data_path
  assert split_records(sources.get_builder("reid_folder", data_dir=data, config="cams_a")) == NAMED
  assert split_records(sources.get_builder("reid_folder", data_dir=data, config="cams_b")) == CSV
  build(named, data, "cams_a")  # the same folder again: reused
  with pytest.raises(
    ValueError, match=rf"{re.escape(str(named))}.*{re.escape(str(csv))}.*data\.config="
  ):
    build(csv, data, "cams_a")
  assert split_records(sources.get_builder("reid_folder", data_dir=data, config="cams_a")) == NAMED
  # Training with that folder under that name is refused too, before anything is read.
  config = get_config()
  config.data.data_dir, config.data.manual_dir, config.data.config = str(data), str(csv), "cams_a"
  with pytest.raises(ValueError, match=rf"{re.escape(str(named))}.*{re.escape(str(csv))}"):
    opening.open_dataset(config.data)


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "a:b", ".hidden", ""])
def test_a_name_that_is_no_folder_name_is_refused(tmp_path, name):
  with pytest.raises(ValueError, match=r"data\.config"):
    build(named_folder(tmp_path / "mine"), tmp_path / "data", name)
  assert not (tmp_path / "data").exists()  # refused before any folder is made


def test_distractors_can_be_dropped_at_evaluation():
  config = get_config()
  config.eval.drop_distractors = True
  config_check.check_mode(config, "eval")  # pid 0 means a distractor here, as on Market-1501
  config.data.name = "msmt17"  # where pid 0 is a person
  with pytest.raises(ValueError, match=r"eval\.drop_distractors"):
    config_check.check_mode(config, "eval")


# --- Bad input --------------------------------------------------------------------


def _refused(manual, data, error, match, name=None):
  with pytest.raises(error, match=match):
    build(manual, data, name)
  assert_nothing_built(data)


def test_an_image_in_no_split(tmp_path):
  manual = named_folder(tmp_path / "mine")
  stray = write_image(manual / "extra" / "0001_c1_x.png", 0)
  _refused(manual, tmp_path / "data", ValueError, re.escape(str(stray)))


def test_a_csv_row_in_no_split(tmp_path):
  manual = csv_folder(tmp_path / "mine")
  write_csv(manual, CSV_ROWS + [("other/x.png", "alice", "north")])
  _refused(manual, tmp_path / "data", ValueError, r"labels\.csv line 11: other/x\.png")


def test_a_csv_row_whose_file_is_missing(tmp_path):
  manual = csv_folder(tmp_path / "mine")
  (manual / "query" / "q2.png").unlink()
  _refused(
    manual,
    tmp_path / "data",
    FileNotFoundError,
    rf"labels\.csv line 7: {re.escape(str(manual / 'query' / 'q2.png'))}",
  )


def test_a_duplicate_csv_row(tmp_path):
  manual = csv_folder(tmp_path / "mine")
  write_csv(manual, CSV_ROWS + [("./train/bob/1.png", "bob", "north")])
  _refused(
    manual, tmp_path / "data", ValueError, r"labels\.csv line 11: \./train/bob/1\.png.*line 4\b"
  )


def test_an_image_missing_from_the_csv(tmp_path):
  manual = csv_folder(tmp_path / "mine")
  unlisted = write_image(manual / "gallery" / "g9.png", 0)
  _refused(
    manual, tmp_path / "data", ValueError, rf"\b1\b.*labels\.csv.*{re.escape(str(unlisted))}"
  )


@pytest.mark.parametrize("header", ["path,pid", "file,pid,camid", "path;pid;camid", ""])
def test_a_csv_with_a_wrong_header(tmp_path, header):
  manual = csv_folder(tmp_path / "mine")
  write_csv(manual, CSV_ROWS, header=header)
  if not header:
    (manual / "labels.csv").write_text("")
  _refused(
    manual,
    tmp_path / "data",
    ValueError,
    rf"{re.escape(str(manual / 'labels.csv'))}: .*path,pid,camid",
  )


def test_an_unparseable_name(tmp_path):
  manual = named_folder(tmp_path / "mine")
  bad = write_image(manual / "train" / "person7_cam2.png", 0)
  _refused(manual, tmp_path / "data", ValueError, rf"pid.*camera.*{re.escape(str(bad))}")


@pytest.mark.parametrize("name", ["-2_c1_x.png", "0005_c0_x.png"])
def test_a_negative_pid_or_camera_zero(tmp_path, name):
  manual = named_folder(tmp_path / "mine")
  bad = write_image(manual / "gallery" / name, 0)
  _refused(manual, tmp_path / "data", ValueError, rf"{re.escape(str(bad))}: (pid -2|camera 0)")


def test_a_distractor_outside_the_gallery(tmp_path):
  manual = named_folder(tmp_path / "mine")
  bad = write_image(manual / "query" / "0000_c1_x.png", 0)
  _refused(manual, tmp_path / "data", ValueError, rf"{re.escape(str(bad))}.*pid 0\b")


def test_a_query_identity_absent_from_the_gallery_is_a_warning(tmp_path):
  manual = named_folder(tmp_path / "mine")
  write_image(manual / "query" / "0042_c1_x.png", 0)  # nobody 42 in the gallery
  write_image(manual / "query" / "0043_c1_x.png", 1)
  write_image(manual / "query" / "0003_c2_z.png", 2)  # 3 is in the gallery in camera 2 only
  gallery = re.escape(str(manual / "gallery"))
  with pytest.warns(
    UnmatchedQueryWarning, match=rf"2 of 5 query .*\(2 identities\).*{gallery}.*\b1\b"
  ):
    builder = build(manual, tmp_path / "data")
  assert len(fx.records(builder, "query")) == 5  # kept: the evaluation skips them


def test_a_train_split_with_one_identity(tmp_path):
  manual = named_folder(tmp_path / "mine")
  for path in (manual / "train").rglob("0007_*"):
    path.unlink()
  _refused(
    manual,
    tmp_path / "data",
    ValueError,
    rf"train split \({re.escape(str(manual / 'train'))}\).*\b1\b",
  )


def test_a_corrupt_image_is_named_and_nothing_is_built(tmp_path):
  manual = csv_folder(tmp_path / "mine")
  (manual / "gallery" / "g3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  _refused(
    manual,
    tmp_path / "data",
    ValueError,
    rf"{re.escape(str(manual / 'gallery' / 'g3.png'))} \(labels\.csv line 10\)",
  )


@pytest.mark.parametrize("missing", ["gallery", "train"])
def test_a_missing_split_folder(tmp_path, missing):
  manual = named_folder(tmp_path / "mine")
  for path in sorted((manual / missing).rglob("*"), reverse=True):
    path.unlink() if path.is_file() else path.rmdir()
  (manual / missing).rmdir()
  _refused(
    manual, tmp_path / "data", FileNotFoundError, rf"{re.escape(str(manual))}.*\b{missing}\b"
  )


def test_both_names_of_a_split_folder(tmp_path):
  manual = named_folder(tmp_path / "mine")
  write_image(manual / "bounding_box_test" / "0003_c2_y.png", 0)
  _refused(manual, tmp_path / "data", ValueError, r"gallery/.*bounding_box_test/")


def test_an_image_format_the_records_cannot_hold(tmp_path):
  manual = named_folder(tmp_path / "mine")
  bmp = write_image(manual / "gallery" / "0003_c3_w.bmp", 0)
  _refused(manual, tmp_path / "data", ValueError, rf"{re.escape(str(bmp))}: .*JPEG.*PNG")


# --- Training end to end -----------------------------------------------------------------


@pytest.mark.slow
def test_training_on_a_folder_end_to_end(tmp_path):
  """run.py with configs/folder.py prepares the folder under its name, trains, evaluates."""
  manual = tmp_path / "mine"
  for pid in range(1, 5):  # P x K = 4 x 2: the 8 images split over the 8 simulated devices
    for camera in (1, 2):
      write_image(manual / "train" / f"{pid:04d}_c{camera}_a.jpg", 10 * pid + camera)
  for pid in (5, 6):
    write_image(manual / "query" / f"{pid:04d}_c1_q.png", 10 * pid)
    write_image(manual / "gallery" / f"{pid:04d}_c2_g.png", 10 * pid + 1)
  workdir, data = tmp_path / "run", tmp_path / "data"
  result = subprocess.run(
    [
      sys.executable,
      "run.py",
      "--config",
      "configs/folder.py",
      "--workdir",
      str(workdir),
      f"--config.data.manual_dir={manual}",
      "--config.data.config=shop",
      f"--config.data.data_dir={data}",
      "--config.data.num_workers=0",
      "--config.model.depth=18",
      "--config.model.width=0.25",
      "--config.model.input_size=(64,32)",
      "--config.model.init_from=",
      "--config.augment.pad=2",
      "--config.data.p=4",
      "--config.data.k=2",
      "--config.train.max_steps=2",
      "--config.eval.batch_size=16",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["protocol"]["dataset"] == "reid_folder/shop"
  assert (results["protocol"]["num_query"], results["protocol"]["num_gallery"]) == (2, 2)
  assert 0.0 <= results["mAP"] <= 100.0
  assert (data / "reid_folder" / "shop" / "1.0.0").is_dir()
