"""A re-ID dataset of one's own images, read from a folder (`reid_folder`).

The manual dir (DIR) holds one folder per split, ``train/``, ``query/`` and
``gallery/`` (or Market-1501's ``bounding_box_train/``, ``query/`` and
``bounding_box_test/``), with JPEG or PNG images at any depth below them.
Identities and cameras come from either:

* ``labels.csv`` at DIR's root, header ``path,pid,camid``, one row per image,
  its path relative to DIR; the path's top folder gives the split. pid and
  camid values may be any integers or strings. Per column, the distinct
  values of all splits are sorted (as numbers when every value is an
  integer, else as strings) and numbered: pids 1..n, camids 0..n-1, so that
  query and gallery share them. The sorted values are kept in the metadata
  (``labels_csv``): record pid p is ``labels_csv['pid'][p - 1]``, record camid
  c is ``labels_csv['camid'][c]``.
* otherwise, Market-style file names ``{pid}_c{camera}...``: pids as written
  (-1 junk, dropped; 0 a distractor, allowed in the gallery only), camid =
  camera - 1, any number of cameras.

Record pid 0 therefore always means a distractor, as in Market-1501. Every
image below DIR must belong to a split (and be listed in ``labels.csv`` when
there is one): nothing of the folder is silently left out.

A builder config is just a name: ``<data_dir>/reid_folder/<name>/`` holds the
folder prepared under it, and any name of letters, digits, ``_``, ``.`` and
``-`` makes a config.
"""

from __future__ import annotations

import csv
import functools
import io
import posixpath
import re
import warnings
from collections.abc import Mapping, Sequence

import tensorflow_datasets as tfds

from .. import reid_common

# Split -> the names its folder may have in DIR: ours, then Market-1501's.
SPLIT_FOLDERS: Mapping[str, tuple[str, ...]] = {
  "train": ("train", "bounding_box_train"),
  "query": ("query",),
  "gallery": ("gallery", "bounding_box_test"),
}
LABELS_FILE = "labels.csv"
LABELS_HEADER = ("path", "pid", "camid")
DEFAULT_NAME = "default"
FILE_NAMES = "file names"  # the source layout recorded when there is no labels.csv

_CONFIG_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_INTEGER = re.compile(r"[-+]?\d+")
# Image formats a user's folder may well hold but the records do not: refused
# by name rather than skipped like other files.
_OTHER_IMAGE_SUFFIXES = (".bmp", ".webp", ".gif", ".tif", ".tiff")


class UnmatchedQueryWarning(UserWarning):
  """Some query images have no gallery image to be matched with."""


@functools.cache
def named_config(name: str) -> tfds.core.BuilderConfig:
  """The config called ``name`` (one object per name, as TFDS expects).

  Raises:
    ValueError: a name that is no safe folder name.
  """
  if not isinstance(name, str) or not _CONFIG_NAME.fullmatch(name):
    raise ValueError(
      f"reid_folder: config name {name!r} (data.config) must be letters, digits, '_', '.' "
      "or '-', not starting with '.' or '-': it names the prepared copy's folder."
    )
  return tfds.core.BuilderConfig(name=name, description=f"A folder prepared as {name!r}.")


def number_values(values: Sequence[str], first: int) -> tuple[list[int] | list[str], list[int]]:
  """Numbers the distinct ``values`` first, first + 1, ... in sorted order.

  Values sort as integers when every one is an integer ('007' is then 7),
  otherwise as strings.

  Returns:
    The distinct values, sorted, and the number of each of ``values``.
  """
  keys = [int(v) for v in values] if all(_INTEGER.fullmatch(v) for v in values) else values
  distinct = sorted(set(keys))
  number = {key: first + i for i, key in enumerate(distinct)}
  return distinct, [number[key] for key in keys]


def _is_image_file(rel: str) -> bool:
  name = rel.rsplit("/", 1)[-1]
  return reid_common.is_image_name(name) or (
    not name.startswith(".") and name.lower().endswith(_OTHER_IMAGE_SUFFIXES)
  )


class Builder(reid_common.ManualReidBuilder):
  """One's own images in train/query/gallery folders, labelled by labels.csv or file names."""

  BUILDER_CONFIGS = [named_config(DEFAULT_NAME)]
  DEFAULT_BUILDER_CONFIG_NAME = DEFAULT_NAME
  ANY_CONFIG_NAME = True  # data.config names the prepared copy (`get_builder_config`).
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Pass your folder as manual_dir: it holds train/, query/ and gallery/ (or
  bounding_box_train/, query/, bounding_box_test/), images named
  {pid}_c{camera}_... or a labels.csv (path,pid,camid). See README.md next to
  this builder.
  """

  @classmethod
  def get_builder_config(
    cls, name: str, version: str | tfds.core.Version | None = None
  ) -> tfds.core.BuilderConfig:
    # Any name is a config: it only names where the prepared copy lives, and
    # the copy's metadata records the folder it came from.
    if version is not None and str(version) != str(cls.VERSION):
      # TFDS reads 'a:b' as config 'a' at version 'b': 'a:b' and 'a:c' would share a copy.
      raise ValueError(
        f"reid_folder: config name '{name}:{version}' (data.config) must not hold ':'."
      )
    return named_config(name)

  def _locate_root(self, tree: reid_common.ManualTree) -> tuple[reid_common.Layout, str]:
    # DIR itself is the root: the layout's markers are the split folders found.
    folders = tuple(_split_folder(tree, split) for split in reid_common.SPLITS)
    labelled_by = LABELS_FILE if tree.is_file(LABELS_FILE) else FILE_NAMES
    return reid_common.Layout(name=labelled_by, root_name="", markers=folders), ""

  def _read_layout(
    self, tree: reid_common.ManualTree, layout: reid_common.Layout, root: str
  ) -> dict[str, list[reid_common.ReidImage]]:
    del root  # always DIR itself (see _locate_root)
    folders = dict(zip(reid_common.SPLITS, layout.markers))
    files = _files_of_splits(tree, folders)
    if layout.name == LABELS_FILE:
      splits, values = _read_labels_csv(tree, folders, files)
      self.info.metadata["labels_csv"] = values
    else:
      splits = {split: _read_named_folder(tree, split, folder) for split, folder in folders.items()}
    _check_identities(tree, folders, splits)
    return splits


def _split_folder(tree: reid_common.ManualTree, split: str) -> str:
  """The folder of ``split`` in DIR; exactly one of its names must be there."""
  found = [name for name in SPLIT_FOLDERS[split] if tree.is_dir(name)]
  names = " or ".join(f"{name}/" for name in SPLIT_FOLDERS[split])
  if not found:
    raise FileNotFoundError(
      f"{tree.manual_dir} has no {split} folder: expected {names} (it holds: "
      f"{', '.join(tree.list_dir('')) or 'nothing'})."
    )
  if len(found) > 1:
    raise ValueError(
      f"{tree.manual_dir} holds both {found[0]}/ and {found[1]}/ for the {split} split; keep one."
    )
  return found[0]


def _files_of_splits(
  tree: reid_common.ManualTree, folders: Mapping[str, str]
) -> dict[str, list[str]]:
  """The image files below each split folder; refuses images elsewhere in DIR."""
  for name in tree.list_dir(""):
    if name in folders.values() or name.startswith("."):
      continue
    for rel in tree.walk_files(name) if tree.is_dir(name) else [name]:
      if _is_image_file(rel):
        raise ValueError(
          f"{tree.where(rel)} is in no split: images belong below "
          f"{', '.join(f'{f}/' for f in folders.values())} in {tree.manual_dir}. Move it "
          "there, or out of the folder."
        )
  files = {}
  for split, folder in folders.items():
    files[split] = [rel for rel in tree.walk_files(folder) if _is_image_file(rel)]
    for rel in files[split]:
      if not reid_common.is_image_name(rel.rsplit("/", 1)[-1]):
        raise ValueError(
          f"{tree.where(rel)}: only JPEG and PNG images ({', '.join(reid_common.IMAGE_SUFFIXES)})"
          " can be stored; convert it or move it out of the folder."
        )
  return files


def _read_named_folder(
  tree: reid_common.ManualTree, split: str, folder: str
) -> list[reid_common.ReidImage]:
  """A split labelled by Market-style file names."""
  images = reid_common.read_market_style_folder(
    tree, folder, root="", num_cameras=None, dataset="reid_folder"
  )
  for image in images:
    if image.pid < 0:
      raise ValueError(
        f"{image.location}: pid {image.pid}; pids are integers >= 0 (-1 marks junk)."
      )
    if image.pid == 0 and split != "gallery":
      raise ValueError(
        f"{image.location} has pid 0, a distractor, which only the gallery may hold; give it "
        "its identity's pid."
      )
  return images


def _read_labels_csv(
  tree: reid_common.ManualTree,
  folders: Mapping[str, str],
  files: Mapping[str, list[str]],
) -> tuple[dict[str, list[reid_common.ReidImage]], dict[str, list[int] | list[str]]]:
  """The splits labelled by labels.csv, and the pid and camid values of its numbering."""
  location = tree.where(LABELS_FILE)
  try:
    text = tree.read_bytes(LABELS_FILE).decode("utf-8-sig")  # -sig: Excel writes a BOM
  except UnicodeDecodeError as e:
    raise ValueError(f"{location} is not UTF-8 text: {e}") from None
  reader = csv.reader(io.StringIO(text, newline=""))
  header = next(reader, None)
  if header is None or tuple(cell.strip() for cell in header) != LABELS_HEADER:
    found = ",".join(header) if header else "missing (the file is empty)"
    raise ValueError(f"{location}: the header is {found}; expected {','.join(LABELS_HEADER)}.")
  split_of = {folder: split for split, folder in folders.items()}
  rows: dict[str, tuple[int, str, str, str]] = {}  # path -> (line, split, pid, camid)
  for row in reader:
    if not any(cell.strip() for cell in row):
      continue
    line = reader.line_num
    where = f"{location} line {line}"
    if len(row) != len(LABELS_HEADER):
      raise ValueError(
        f"{where}: {len(row)} fields, expected {len(LABELS_HEADER)} ({','.join(LABELS_HEADER)})."
      )
    path, pid, camid = (cell.strip() for cell in row)
    if not pid or not camid:
      raise ValueError(f"{where}: {path} has no {'pid' if not pid else 'camid'}.")
    rel = posixpath.normpath(path.replace("\\", "/"))
    if rel.startswith("/") or rel == ".." or rel.startswith("../"):
      raise ValueError(f"{where}: {path} is not a path inside {tree.manual_dir}.")
    split = split_of.get(rel.split("/", 1)[0]) if "/" in rel else None
    if split is None:
      raise ValueError(
        f"{where}: {path} is in no split: paths start with "
        f"{', '.join(f'{f}/' for f in folders.values())}."
      )
    if rel in rows:
      raise ValueError(f"{where}: {path} is listed twice (also on line {rows[rel][0]}).")
    if not tree.is_file(rel):
      raise FileNotFoundError(f"{where}: {tree.where(rel)} does not exist.")
    if not reid_common.is_image_name(rel.rsplit("/", 1)[-1]):
      raise ValueError(
        f"{where}: {path} is not a JPEG or PNG image ({', '.join(reid_common.IMAGE_SUFFIXES)})."
      )
    rows[rel] = (line, split, pid, camid)
  unlisted = [rel for split in files for rel in files[split] if rel not in rows]
  if unlisted:
    raise ValueError(
      f"{len(unlisted)} images below the split folders are not in {location}, e.g. "
      f"{tree.where(unlisted[0])}: give each a row, or move them out of the folder."
    )
  pid_values, pids = number_values([row[2] for row in rows.values()], first=1)
  camid_values, camids = number_values([row[3] for row in rows.values()], first=0)
  splits: dict[str, list[reid_common.ReidImage]] = {split: [] for split in folders}
  for (rel, (line, split, _, _)), pid, camid in zip(rows.items(), pids, camids):
    splits[split].append(
      reid_common.ReidImage(
        filename=rel,
        pid=pid,
        camid=camid,
        location=f"{tree.where(rel)} ({LABELS_FILE} line {line})",
        read=functools.partial(tree.read_bytes, rel),
      )
    )
  for split, images in splits.items():
    if not images:
      raise ValueError(f"{location} lists no image of the {split} split (below {folders[split]}/).")
  return splits, {"pid": pid_values, "camid": camid_values}


def _check_identities(
  tree: reid_common.ManualTree,
  folders: Mapping[str, str],
  splits: Mapping[str, Sequence[reid_common.ReidImage]],
) -> None:
  """Refuses a train split that cannot train; warns of queries that cannot be matched."""
  train_ids = {image.pid for image in splits["train"]}
  if len(train_ids) < 2:
    raise ValueError(
      f"The train split ({tree.where(folders['train'])}) holds {len(train_ids)} identity; "
      "training needs at least 2 (the losses tell identities apart)."
    )
  gallery_cameras: dict[int, set[int]] = {}
  for image in splits["gallery"]:
    gallery_cameras.setdefault(image.pid, set()).add(image.camid)
  absent = [q for q in splits["query"] if q.pid not in gallery_cameras]
  same_camera = [q for q in splits["query"] if gallery_cameras.get(q.pid) == {q.camid}]
  if absent or same_camera:
    example = (absent or same_camera)[0]
    warnings.warn(
      f"{len(absent)} of {len(splits['query'])} query images "
      f"({len({q.pid for q in absent})} identities) have no image of their identity in the "
      f"gallery ({tree.where(folders['gallery'])}), and {len(same_camera)} only in their own "
      f"camera, e.g. {example.location}: evaluation skips them.",
      UnmatchedQueryWarning,
      stacklevel=2,
    )
