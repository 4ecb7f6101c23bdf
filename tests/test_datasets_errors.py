"""Bad input gives errors naming the file, key or step; failed builds leave nothing."""

import re
import zipfile

import data_fixtures as fx
import numpy as np
import PIL.Image
import pytest

from apnet_jax.data import prepare, sources

MARKET_ROOT = "Market-1501-v15.09.15"


def _market_copy(tmp_path):
  manual = fx.copy_dummy("market1501", tmp_path / "manual")
  return manual, manual / MARKET_ROOT


@pytest.mark.parametrize("name", ["market1501", "reid_folder"])
@pytest.mark.parametrize("what", ["missing", "empty", "a file"])
def test_a_manual_dir_that_cannot_hold_the_dataset_is_named_before_any_build(tmp_path, name, what):
  # TFDS's own check raised an AssertionError naming neither the dataset nor the setting.
  manual = tmp_path / "manual"
  if what == "empty":
    manual.mkdir()
  elif what == "a file":
    manual.write_text("not a folder")
  with pytest.raises(FileNotFoundError, match=rf"{name}.*{re.escape(str(manual))}.*manual_dir"):
    fx.build(name, manual, tmp_path / "data")
  assert not any((tmp_path / "data").rglob("*"))  # nothing half-built


def test_manual_dir_required(tmp_path):
  with pytest.raises(ValueError, match="market1501.*manual_dir"):
    prepare.prepare("market1501", manual_dir=None, data_dir=tmp_path)


def test_unrelated_manual_dir_says_what_is_expected(tmp_path):
  (tmp_path / "manual" / "photos").mkdir(parents=True)
  (tmp_path / "manual" / "notes.txt").write_text("hi")
  with pytest.raises(FileNotFoundError) as e:
    fx.build("market1501", tmp_path / "manual", tmp_path / "data")
  message = str(e.value)
  assert str(tmp_path / "manual") in message and MARKET_ROOT in message
  assert "bounding_box_test" in message and "notes.txt" in message


def test_missing_folder_is_named(tmp_path):
  manual, root = _market_copy(tmp_path)
  for f in (root / "bounding_box_test").iterdir():
    f.unlink()
  (root / "bounding_box_test").rmdir()
  with pytest.raises(FileNotFoundError, match="bounding_box_test") as e:
    fx.build("market1501", manual, tmp_path / "data")
  assert str(root) in str(e.value)


def test_unparsable_filename_is_named(tmp_path):
  manual, root = _market_copy(tmp_path)
  (root / "query" / "person.jpg").write_bytes(fx.jpeg_bytes(0))
  with pytest.raises(ValueError, match=r"query/person\.jpg"):
    fx.build("market1501", manual, tmp_path / "data")


def test_camera_out_of_range_is_named(tmp_path):
  manual, root = _market_copy(tmp_path)
  (root / "query" / "0003_c9s1_000101_00.jpg").write_bytes(fx.jpeg_bytes(0))
  with pytest.raises(ValueError, match=r"0003_c9s1_000101_00\.jpg.*camera 9"):
    fx.build("market1501", manual, tmp_path / "data")


def test_market_folder_is_refused_by_the_duke_builder(tmp_path):
  # Duke's 8 cameras cover Market's 6: only the names tell them apart.
  manual = fx.copy_dummy("market1501", tmp_path / "manual")
  with pytest.raises(
    ValueError,
    match=r"bounding_box_train/0002_c1s1_000451_03\.jpg.*"
    r"Market-1501.*dukemtmc_reid",
  ):
    fx.build("dukemtmc_reid", manual, tmp_path / "data")
  assert not sources.get_builder("dukemtmc_reid", data_dir=tmp_path / "data").is_prepared()


def test_duke_folder_is_refused_by_the_market_builder(tmp_path):
  manual = tmp_path / "manual"
  fx.zip_folder(fx.dummy_data("dukemtmc_reid") / "DukeMTMC-reID", manual / "DukeMTMC-reID.zip")
  with pytest.raises(
    ValueError,
    match=r"DukeMTMC-reID\.zip:DukeMTMC-reID/bounding_box_train/"
    r"0001_c2_f0046182\.jpg.*DukeMTMC-reID",
  ):
    fx.build("market1501", manual, tmp_path / "data")


def test_empty_split_folder_is_named(tmp_path):
  manual, root = _market_copy(tmp_path)
  for f in (root / "bounding_box_train").iterdir():
    f.unlink()
  with pytest.raises(ValueError, match=re.escape(str(root / "bounding_box_train"))):
    fx.build("market1501", manual, tmp_path / "data")


def test_split_folder_of_junk_only_is_named(tmp_path):
  manual, root = _market_copy(tmp_path)
  for f in (root / "query").iterdir():
    f.unlink()
  (root / "query" / "-1_c1s1_000401_03.jpg").write_bytes(fx.jpeg_bytes(0))
  with pytest.raises(ValueError, match=re.escape(str(root / "query"))):
    fx.build("market1501", manual, tmp_path / "data")


def test_non_jpeg_png_image_is_named(tmp_path):
  manual, root = _market_copy(tmp_path)
  gif = root / "query" / "0003_c1s1_000999_00.jpg"
  PIL.Image.new("RGB", (4, 8)).save(gif, format="GIF")
  with pytest.raises(ValueError, match=r"0003_c1s1_000999_00\.jpg.*GIF"):
    fx.build("market1501", manual, tmp_path / "data")


def test_failed_build_leaves_nothing_loadable_and_a_rebuild_works(tmp_path):
  manual, root = _market_copy(tmp_path)
  # A truncated JPEG in the last split written: the build fails mid-way,
  # after train and query were written.
  bad = root / "bounding_box_test" / "0005_c6s1_000301_01.jpg"
  good = bad.read_bytes()
  bad.write_bytes(good[: len(good) // 2])
  data_dir = tmp_path / "data"
  with pytest.raises(ValueError, match=re.escape(str(bad))):
    fx.build("market1501", manual, data_dir)
  builder = sources.get_builder("market1501", data_dir=data_dir)
  assert not builder.is_prepared()
  with pytest.raises(FileNotFoundError, match=rf"market1501.*{re.escape(str(data_dir))}"):
    sources.load_split("market1501", "train", data_dir=data_dir)
  leftovers = [p for p in data_dir.rglob("*") if "array_record" in p.name]
  assert leftovers == []
  bad.write_bytes(good)  # the user fixes the file and runs again
  builder = fx.build("market1501", manual, data_dir)
  assert len(sources.load_split(builder, "gallery")) == 6


def test_corrupt_image_in_zip_is_named(tmp_path):
  src = fx.copy_dummy("market1501", tmp_path / "src") / MARKET_ROOT
  (src / "query" / "0003_c1s1_000101_00.jpg").write_bytes(b"\xff\xd8\xff garbage")
  manual = tmp_path / "manual"
  fx.zip_folder(src, manual / f"{MARKET_ROOT}.zip")
  with pytest.raises(
    ValueError,
    match=re.escape(f"{MARKET_ROOT}.zip:{MARKET_ROOT}/query/0003_c1s1_000101_00.jpg"),
  ):
    fx.build("market1501", manual, tmp_path / "data")


def test_bad_zip_is_named(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "Market.zip").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "manual" / "Market.zip"))):
    fx.build("market1501", tmp_path / "manual", tmp_path / "data")


def test_msmt17_missing_list_file_is_named(tmp_path):
  manual = fx.copy_dummy("msmt17", tmp_path / "manual")
  (manual / "MSMT17_V1" / "list_gallery.txt").unlink()
  with pytest.raises(FileNotFoundError, match=r"list_gallery\.txt"):
    fx.build("msmt17", manual, tmp_path / "data")


def test_msmt17_listed_image_missing_is_named(tmp_path):
  manual = fx.copy_dummy("msmt17", tmp_path / "manual")
  with (manual / "MSMT17_V1" / "list_query.txt").open("a") as f:
    f.write("0009/0009_000_03_0303noon_0001_0.jpg 9\n")
  with pytest.raises(FileNotFoundError, match=r"list_query\.txt, line 3\b.*0009/0009_000_03"):
    fx.build("msmt17", manual, tmp_path / "data")


def test_msmt17_malformed_line_is_named(tmp_path):
  manual = fx.copy_dummy("msmt17", tmp_path / "manual")
  (manual / "MSMT17_V1" / "list_train.txt").write_text("0000/0000_000_01_0303morning_0008_0.jpg\n")
  with pytest.raises(ValueError, match=r"list_train\.txt, line 1\b"):
    fx.build("msmt17", manual, tmp_path / "data")


def test_msmt17_empty_list_is_named(tmp_path):
  manual = fx.copy_dummy("msmt17", tmp_path / "manual")
  (manual / "MSMT17_V1" / "list_query.txt").write_text("\n")
  with pytest.raises(ValueError, match=r"list_query\.txt.*query split"):
    fx.build("msmt17", manual, tmp_path / "data")


def test_cuhk03_protocol_empty_split_is_named(tmp_path):
  manual = fx.write_cuhk03_release(tmp_path / "manual")
  fx.write_cuhk03_protocol(
    manual / "cuhk03_new_protocol_config_labeled.mat", train_idx=np.zeros((0, 1))
  )
  with pytest.raises(ValueError, match=r"labeled\.mat: train_idx\b.*train split"):
    fx.build("cuhk03", manual, tmp_path / "data", "labeled")


def test_cuhk03_protocol_missing_field_is_named(tmp_path):
  manual = fx.write_cuhk03_release(tmp_path / "manual")
  fx.write_cuhk03_protocol(manual / "cuhk03_new_protocol_config_labeled.mat", gallery_idx=None)
  with pytest.raises(ValueError, match=r"labeled\.mat.*gallery_idx"):
    fx.build("cuhk03", manual, tmp_path / "data", "labeled")


def test_cuhk03_protocol_index_out_of_range(tmp_path):
  manual = fx.write_cuhk03_release(tmp_path / "manual")
  fx.write_cuhk03_protocol(
    manual / "cuhk03_new_protocol_config_detected.mat",
    query_idx=np.array([[1.0], [99.0]]),
  )
  with pytest.raises(ValueError, match=r"detected\.mat: query_idx\b"):
    fx.build("cuhk03", manual, tmp_path / "data", "detected")


def test_cuhk03_protocol_naming_an_empty_slot(tmp_path):
  manual = fx.write_cuhk03_release(tmp_path / "manual")
  filelist, _, _ = fx.cuhk03_protocol()
  cells = np.empty((len(filelist), 1), dtype=object)
  for i, name in enumerate(filelist):
    cells[i, 0] = name
  cells[0, 0] = "1_001_1_05.png"  # slot 5 of pair 1, person 1 is empty
  fx.write_cuhk03_protocol(manual / "cuhk03_new_protocol_config_labeled.mat", filelist=cells)
  with pytest.raises(ValueError, match=r"1_001_1_05\.png"):
    fx.build("cuhk03", manual, tmp_path / "data", "labeled")


def test_cuhk03_missing_protocol_file_is_named(tmp_path):
  manual = fx.write_cuhk03_release(tmp_path / "manual")
  (manual / "cuhk03_new_protocol_config_detected.mat").unlink()
  with pytest.raises(FileNotFoundError, match=r"cuhk03_new_protocol_config_detected\.mat"):
    fx.build("cuhk03", manual, tmp_path / "data", "detected")


def test_unknown_dataset_and_split(tmp_path):
  with pytest.raises(ValueError, match="'market'"):
    sources.load_split("market", "train", data_dir=tmp_path)
  builder = fx.build("market1501", fx.dummy_data("market1501"), tmp_path / "data")
  with pytest.raises(ValueError, match="'test'"):
    sources.load_split(builder, "test")


def test_zip_holding_the_root_one_folder_deeper(tmp_path):
  src = fx.dummy_data("dukemtmc_reid") / "DukeMTMC-reID"
  manual = tmp_path / "manual"
  manual.mkdir()
  with zipfile.ZipFile(manual / "duke.zip", "w") as zf:
    for path in sorted(src.rglob("*")):
      zf.write(path, "downloads/" + path.relative_to(src.parent).as_posix())
  builder = fx.build("dukemtmc_reid", manual, tmp_path / "data")
  assert len(sources.load_split(builder, "train")) == 4


def test_a_corrupt_compressed_member_names_the_archive_and_member(tmp_path):
  src = fx.copy_dummy("market1501", tmp_path / "src") / MARKET_ROOT
  archive = fx.zip_folder(src, tmp_path / "manual" / f"{MARKET_ROOT}.zip")
  member = f"{MARKET_ROOT}/query/0003_c1s1_000101_00.jpg"
  with zipfile.ZipFile(archive) as zf:
    info = zf.getinfo(member)
  data = bytearray(archive.read_bytes())
  # The member's deflate stream starts after its local header; 0xFF there is
  # block type 3, which zlib refuses ("invalid block type").
  start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
  data[start : start + 4] = b"\xff\xff\xff\xff"
  archive.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=re.escape(f"{MARKET_ROOT}.zip:{member} (error: ")):
    fx.build("market1501", tmp_path / "manual", tmp_path / "data")


def test_a_truncated_prepared_split_is_named_with_the_fix(tmp_path):
  builder = fx.build("synthetic_reid", None, tmp_path / "data", config="tiny")
  (train_file,) = [p for p in builder.data_path.iterdir() if "-train.array_record" in p.name]
  data = train_file.read_bytes()
  train_file.write_bytes(data[: len(data) // 2])
  with pytest.raises(
    ValueError,
    match=rf"train split \({train_file.name}\).*"
    rf"{re.escape(str(builder.data_path))}",
  ):
    sources.load_split("synthetic_reid", "train", data_dir=tmp_path / "data", config="tiny")
  sources.load_split("synthetic_reid", "query", data_dir=tmp_path / "data", config="tiny")


def test_preparing_again_from_another_manual_dir_says_so_and_how_to_rebuild(tmp_path):
  first, _ = _market_copy(tmp_path / "a")
  second, _ = _market_copy(tmp_path / "b")
  builder = fx.build("market1501", first, tmp_path / "data")
  fx.build("market1501", first, tmp_path / "data")  # the same folder: reused quietly
  with pytest.raises(
    ValueError,
    match=rf"{re.escape(str(builder.data_path))}.*manual_dir "
    rf"{re.escape(str(first))}.*{re.escape(str(second))}"
    rf".*{re.escape(str(builder.data_path))}",
  ):
    fx.build("market1501", second, tmp_path / "data")
