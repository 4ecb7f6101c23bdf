"""Shared pieces of the re-ID TFDS builders.

Every builder here yields the same record structure (see `reid_features`):

* ``image``: the encoded JPEG/PNG bytes, exactly as found in the source files
  (never re-encoded; CUHK03's ``.mat`` images, which have no source bytes, are
  PNG-encoded once).
* ``pid``: the person id of the benchmark (0 = distractor in Market-1501 and
  reid_folder).
* ``camid``: the 0-based camera index.
* ``label``: the contiguous train label (0..num_train_ids-1, in pid order)
  in the ``train`` split, -1 in ``query`` and ``gallery``.
* ``filename``: the image's path relative to the dataset root.

Examples of a split are stored in filename order (`disable_shuffling`), so a
build is deterministic and record ``i`` of a split is its ``i``-th filename.
The pid/camid/label arrays of every split are also written to the dataset's
``metadata.json`` (`DatasetInfo.metadata`), so the P x K sampler can read all
train labels without touching the images.

A builder's ``manual_dir`` may hold the benchmark's zip archive or its
extracted folder: `ManualTree` shows every ``*.zip`` in it as if it were
extracted in place, and `locate_root` finds the dataset root (the manual dir
itself or a folder up to two levels below it).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
import io
import json
import os
import pathlib
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath

from apnet_jax.images import decode_rgb

TRAIN_SPLIT = "train"
SPLITS = ("train", "query", "gallery")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def reid_features() -> tfds.features.FeaturesDict:
  """The features of every re-ID example (see the module docstring)."""
  return tfds.features.FeaturesDict(
    {
      # Given bytes, tfds stores them unchanged (no TensorFlow needed).
      "image": tfds.features.Image(shape=(None, None, 3)),
      "pid": np.int64,
      "camid": np.int64,
      "label": np.int64,
      "filename": tfds.features.Text(),
    }
  )


# ----------------------------------------------------------------------------
# Reading manual_dir: folders and zip archives alike.
# ----------------------------------------------------------------------------


def _join(*parts: str) -> str:
  return "/".join(p for p in parts if p)


def _parent(rel: str) -> str:
  return rel.rsplit("/", 1)[0] if "/" in rel else ""


class _ZipIndex:
  """The file and folder names of one zip archive."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    try:
      self.zip = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
      raise ValueError(f"{path} is not a readable zip archive: {e}") from e
    self.files: dict[str, zipfile.ZipInfo] = {}
    self.children: dict[str, set[str]] = {"": set()}  # folder -> entries
    for info in self.zip.infolist():
      rel = info.filename.replace("\\", "/").strip("/")
      if not rel:
        continue
      if info.is_dir():
        self.children.setdefault(rel, set())
      else:
        self.files[rel] = info
      # Zips need not list folders: derive them from the member paths.
      child = rel
      while child:
        parent = _parent(child)
        self.children.setdefault(parent, set()).add(child.rsplit("/", 1)[-1])
        child = parent

  def is_dir(self, rel: str) -> bool:
    return rel in self.children

  def read(self, rel: str) -> bytes:
    try:
      return self.zip.read(self.files[rel])
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
      raise ValueError(
        f"Cannot read {self.path}:{rel} ({type(e).__name__}: {e}): the "
        "archive is damaged; download it again or extract it with another "
        "tool and pass the folder as manual_dir."
      ) from e


class ManualTree:
  """The files of ``manual_dir``, each ``*.zip`` in it seen as extracted there.

  Paths are '/'-separated and relative to ``manual_dir``. Where a folder and a
  zip hold the same path, the folder wins (it is faster to read).
  """

  def __init__(self, manual_dir: os.PathLike[str] | str):
    self.manual_dir = pathlib.Path(os.fspath(manual_dir))
    if not self.manual_dir.is_dir():
      raise FileNotFoundError(f"manual_dir {self.manual_dir} does not exist.")
    self._zips = [
      _ZipIndex(p)
      for p in sorted(self.manual_dir.iterdir())
      if p.suffix.lower() == ".zip" and p.is_file()
    ]

  def _fs(self, rel: str) -> pathlib.Path:
    return self.manual_dir / rel if rel else self.manual_dir

  def is_dir(self, rel: str) -> bool:
    return self._fs(rel).is_dir() or any(z.is_dir(rel) for z in self._zips)

  def is_file(self, rel: str) -> bool:
    return self._fs(rel).is_file() or any(rel in z.files for z in self._zips)

  def exists(self, rel: str) -> bool:
    return self.is_dir(rel) or self.is_file(rel)

  def list_dir(self, rel: str) -> list[str]:
    """Sorted names of the entries (files and folders) directly in ``rel``."""
    names = set()
    fs_dir = self._fs(rel)
    if fs_dir.is_dir():
      names.update(p.name for p in fs_dir.iterdir())
    for z in self._zips:
      names.update(z.children.get(rel, ()))
    return sorted(names)

  def list_files(self, rel: str) -> list[str]:
    """Sorted names of the files directly in folder ``rel``."""
    return [n for n in self.list_dir(rel) if self.is_file(_join(rel, n))]

  def list_dirs(self, rel: str) -> list[str]:
    """Sorted names of the folders directly in folder ``rel``."""
    return [n for n in self.list_dir(rel) if self.is_dir(_join(rel, n))]

  def walk_files(self, rel: str) -> list[str]:
    """Paths of the files below folder ``rel``, subfolders included, sorted.

    Hidden folders (.ipynb_checkpoints, .git) are skipped: they hold copies
    and tool state, not data.
    """
    files = []
    for name in self.list_dir(rel):
      path = _join(rel, name)
      if self.is_dir(path):
        if not name.startswith("."):
          files.extend(self.walk_files(path))
      else:
        files.append(path)
    return files

  def where(self, rel: str) -> str:
    """Where ``rel`` lives, for messages: a path, or ``archive.zip:member``."""
    if self._fs(rel).exists():
      return str(self._fs(rel))
    for z in self._zips:
      if rel in z.files or z.is_dir(rel):
        return f"{z.path}:{rel}"
    return str(self._fs(rel))

  def read_bytes(self, rel: str) -> bytes:
    """The content of file ``rel``; errors name the file."""
    path = self._fs(rel)
    if path.is_file():
      try:
        return path.read_bytes()
      except OSError as e:
        raise ValueError(f"Cannot read {path}: {e}") from e
    for z in self._zips:
      if rel in z.files:
        return z.read(rel)
    raise FileNotFoundError(f"{self.where(rel)} does not exist.")

  def local_path(self, rel: str) -> pathlib.Path | None:
    """The file's path on disk, or None when it only exists inside a zip."""
    path = self._fs(rel)
    return path if path.is_file() else None

  def extract(self, rel: str, directory: pathlib.Path) -> pathlib.Path:
    """Extracts zip member ``rel`` into ``directory``; returns its path."""
    for z in self._zips:
      if rel in z.files:
        target = directory / rel.rsplit("/", 1)[-1]
        with z.zip.open(z.files[rel]) as src, target.open("wb") as dst:
          while chunk := src.read(1 << 24):
            dst.write(chunk)
        return target
    raise FileNotFoundError(f"{self.where(rel)} does not exist.")


@dataclasses.dataclass(frozen=True)
class Layout:
  """A way a benchmark can be laid out below its root folder.

  Attributes:
    name: e.g. 'MSMT17_V1'; recorded in the dataset's metadata.
    root_name: the root folder's usual name, e.g. 'Market-1501-v15.09.15'
      (messages only: any root holding the markers is accepted).
    markers: paths (folders or files) that must exist below the root.
  """

  name: str
  root_name: str
  markers: tuple[str, ...]


def locate_root(tree: ManualTree, layouts: Sequence[Layout]) -> tuple[Layout, str]:
  """Finds the dataset root in ``tree`` and the layout it follows.

  Candidates are the manual dir itself and the folders one and two levels
  below it (in folders and zips alike). The candidate holding most markers of
  a layout wins (ties: the one with the layout's usual folder name, then the
  shallowest); all of that layout's markers must then be present.

  Args:
    tree: the manual dir.
    layouts: the layouts the benchmark may come in.

  Returns:
    The layout and the root's path relative to the manual dir ('' for the
    manual dir itself).

  Raises:
    FileNotFoundError: no candidate holds any marker (the message says what
      is expected where and what the manual dir holds), or the best one lacks
      some markers (the message names them).
  """
  top = tree.list_dir("")
  if not top:
    raise FileNotFoundError(f"manual_dir {tree.manual_dir} is empty.")
  candidates = [""]
  for name in tree.list_dirs(""):
    candidates.append(name)
    candidates.extend(_join(name, sub) for sub in tree.list_dirs(name))
  # Best: most markers, then named as usual (a manual dir may hold several
  # benchmarks with the same folder names), then shallowest.
  best = None
  for root in candidates:
    for order, layout in enumerate(layouts):
      found = sum(tree.exists(_join(root, m)) for m in layout.markers)
      usual_name = root.rsplit("/", 1)[-1] == layout.root_name
      key = (found, usual_name, -root.count("/") - bool(root), -order)
      if found and (best is None or key > best[0]):
        best = (key, layout, root)
  if best is None:
    expected = "\n".join(
      f"  {lay.root_name}/ (or {lay.root_name}.zip) holding " + ", ".join(lay.markers)
      for lay in layouts
    )
    raise FileNotFoundError(
      f"Found no dataset in manual_dir {tree.manual_dir}. Expected one of:\n"
      f"{expected}\nbut it holds: {', '.join(top)}"
    )
  _, layout, root = best
  missing = [m for m in layout.markers if not tree.exists(_join(root, m))]
  if missing:
    raise FileNotFoundError(
      f"{layout.name} at {tree.where(root) if root else tree.manual_dir}"
      f" lacks {', '.join(missing)} (expected: {', '.join(layout.markers)})."
    )
  return layout, root


# ----------------------------------------------------------------------------
# Images and their identities.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReidImage:
  """One image of a split, before it is written.

  Attributes:
    filename: path relative to the dataset root (the record's `filename`).
    pid: person id.
    camid: 0-based camera index.
    location: where the bytes come from, for error messages.
    read: returns the encoded image bytes.
    label: contiguous train label, -1 outside train (set by `assign_labels`).
  """

  filename: str
  pid: int
  camid: int
  location: str
  read: Callable[[], bytes] = dataclasses.field(compare=False, repr=False)
  label: int = -1


_MARKET_NAME = re.compile(r"(-?\d+)_c(\d+)")


@dataclasses.dataclass(frozen=True)
class NameStyle:
  """How one benchmark names its image files, to recognise it by them.

  Attributes:
    dataset: the benchmark, e.g. 'Market-1501' (messages only).
    pattern: matches the start of each of its file names (junk included).
    example: one of its file names (messages only).
  """

  dataset: str
  pattern: re.Pattern[str]
  example: str


# Market-1501 and DukeMTMC-reID share their folder layout, and Duke's 8
# cameras cover Market's 6: only the file names tell them apart. Market's
# camera is followed by its video sequence ('c1s1', junk and distractors
# too); Duke's names end in a frame number ('_f0046182').
MARKET1501_NAMES = NameStyle(
  "Market-1501", re.compile(r"-?\d+_c\d+s\d+_"), "0002_c1s1_000451_03.jpg"
)
DUKEMTMC_REID_NAMES = NameStyle(
  "DukeMTMC-reID", re.compile(r"-?\d+_c\d+_f\d+"), "0001_c2_f0046182.jpg"
)


def is_image_name(name: str) -> bool:
  """Whether a file is an image to read; hidden files (._x.jpg) are not."""
  return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def parse_market_name(name: str, location: str) -> tuple[int, int]:
  """Returns (pid, 1-based camera) of a Market-style name '0002_c1s1_...jpg'.

  Raises:
    ValueError: naming the file, when the name does not follow the pattern.
  """
  match = _MARKET_NAME.match(name)
  try:
    if not match:
      raise ValueError("no '<pid>_c<camera>' prefix")
    return int(match.group(1)), int(match.group(2))
  except ValueError as e:
    raise ValueError(
      f"Cannot parse pid and camera from {location}: {e}; expected a name"
      " like 0002_c1s1_000451_03.jpg (pid 2, camera 1)."
    ) from None


def check_camid(camid: int, num_cameras: int | None, location: str) -> None:
  """Camera numbers start at 1 (camid 0); ``num_cameras`` None sets no upper bound."""
  if camid < 0 or (num_cameras is not None and camid >= num_cameras):
    bound = f"1..{num_cameras}" if num_cameras is not None else "1 or more"
    raise ValueError(f"{location}: camera {camid + 1} is outside {bound}.")


def read_market_style_folder(
  tree: ManualTree,
  folder: str,
  *,
  root: str,
  num_cameras: int | None,
  dataset: str = "",
  foreign_names: Sequence[NameStyle] = (),
) -> list[ReidImage]:
  """Reads a Market-style folder (bounding_box_train, query, ...).

  Junk images (pid -1) are dropped; distractors (pid 0) are kept. Non-image
  files (Thumbs.db, ...) are ignored. Images in subfolders are read too; a
  record's filename is its path below the root.

  Args:
    tree: the manual dir.
    folder: the folder, relative to the dataset root.
    root: the dataset root, relative to the manual dir.
    num_cameras: the benchmark's number of cameras (camera ids are checked);
      None for any number.
    dataset: the benchmark being read, e.g. 'market1501' (messages only).
    foreign_names: name styles of look-alike benchmarks to refuse.

  Returns:
    The folder's images.

  Raises:
    ValueError: naming the file, for a name that cannot be parsed, a camera
      out of range or a name in one of ``foreign_names``; naming the folder,
      when it yields no image.
  """
  images = []
  junk = 0
  for rel in tree.walk_files(_join(root, folder)):
    name = rel.rsplit("/", 1)[-1]
    if not is_image_name(name):
      continue
    location = tree.where(rel)
    for style in foreign_names:
      if style.pattern.match(name):
        raise ValueError(
          f"{location} is named like a {style.dataset} image (e.g."
          f" {style.example}), not a {dataset or 'dataset'} one: the folder"
          f" {tree.where(_join(root, folder))} seems to hold {style.dataset}."
        )
    pid, camera = parse_market_name(name, location)
    check_camid(camera - 1, num_cameras, location)
    if pid == -1:
      junk += 1
      continue  # junk: not a person, excluded by every protocol
    images.append(
      ReidImage(
        filename=rel[len(root) + 1 :] if root else rel,
        pid=pid,
        camid=camera - 1,
        location=location,
        read=functools.partial(tree.read_bytes, rel),
      )
    )
  if not images:
    what = (
      f"only junk images ({junk}, pid -1)"
      if junk
      else f"no images ({', '.join(IMAGE_SUFFIXES)} files)"
    )
    raise ValueError(
      f"{tree.where(_join(root, folder))} holds {what}: the split read from it would be empty."
    )
  return images


def check_image(data: bytes, location: str) -> None:
  """Decodes ``data`` fully, as training will (`apnet_jax.images.decode_rgb`).

  Raises:
    ValueError: naming ``location``: a corrupt image, one that is not JPEG or
      PNG, or a pixel format with no 8-bit RGB reading.
  """
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      image_format = image.format
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"Cannot decode image {location}: {e}") from e
  if image_format not in ("JPEG", "PNG"):
    raise ValueError(f"{location} is a {image_format} image; expected JPEG or PNG.")
  decode_rgb(data, location)


def assign_labels(
  splits: Mapping[str, Sequence[ReidImage]],
) -> dict[str, list[ReidImage]]:
  """Sorts each split by filename and sets the contiguous train labels.

  Raises:
    ValueError: a split is empty or holds a filename twice.
  """
  for split in SPLITS:
    if not splits.get(split):
      raise ValueError(f"The {split} split has no images.")
  train_pids = sorted({image.pid for image in splits[TRAIN_SPLIT]})
  label_of = {pid: label for label, pid in enumerate(train_pids)}
  result = {}
  for split in SPLITS:
    images = sorted(splits[split], key=lambda image: image.filename)
    for a, b in zip(images, images[1:]):
      if a.filename == b.filename:
        raise ValueError(f"{a.filename} appears twice in {split}: {a.location}, {b.location}.")
    if split == TRAIN_SPLIT:
      images = [dataclasses.replace(i, label=label_of[i.pid]) for i in images]
    result[split] = images
  return result


def split_arrays(images: Sequence[ReidImage]) -> dict[str, list[int]]:
  """The pid/camid/label columns of a split, in record order (JSON-ready)."""
  return {
    "pid": [i.pid for i in images],
    "camid": [i.camid for i in images],
    "label": [i.label for i in images],
  }


def config_fields(config: tfds.core.BuilderConfig | None) -> dict[str, Any]:
  """The fields of a builder config that decide the data (JSON-ready).

  Stored in the metadata, so that a dataset built from another config of the
  same name is recognised.
  """
  if config is None:
    return {}
  skip = {"version", "release_notes", "supported_versions", "description", "tags"}
  fields = {
    f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in skip
  }
  return json.loads(json.dumps(fields))


# ----------------------------------------------------------------------------
# The base builder.
# ----------------------------------------------------------------------------


class ReidBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the re-ID builders: train/query/gallery in filename order.

  Subclasses implement `_collect_images`; everything else (features, labels,
  ordering, metadata, image checks) is shared.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  # TFDS finds a builder's README.md, CITATIONS.bib and checksums.tsv from its
  # module file. Its `code_path` evaluates `importlib_resources.abc.Traversable`,
  # a package tfds 4.9.10 does not declare for Python >= 3.9
  # (tensorflow/datasets#11212): the plain way instead.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pytype: disable=signature-mismatch
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=reid_features(),
      metadata=tfds.core.MetadataDict(),
      # Keys are record indices in filename order; TFDS then writes the
      # records in that order instead of ordering them by hashed keys.
      disable_shuffling=True,
    )

  @abc.abstractmethod
  def _collect_images(
    self, dl_manager: tfds.download.DownloadManager
  ) -> tuple[str, dict[str, list[ReidImage]]]:
    """Returns (source layout name, images of each split)."""

  def _split_generators(
    self, dl_manager: tfds.download.DownloadManager
  ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    layout, splits = self._collect_images(dl_manager)
    splits = assign_labels(splits)
    self.info.metadata["source_layout"] = layout
    self.info.metadata["config"] = config_fields(self.builder_config)
    self.info.metadata["splits"] = {split: split_arrays(images) for split, images in splits.items()}
    return {split: self._generate_examples(images) for split, images in splits.items()}

  def _generate_examples(self, images: Sequence[ReidImage]) -> Iterator[tuple[int, dict[str, Any]]]:
    for index, image in enumerate(images):
      data = image.read()
      check_image(data, image.location)
      yield (
        index,
        {
          "image": data,
          "pid": image.pid,
          "camid": image.camid,
          "label": image.label,
          "filename": image.filename,
        },
      )


class ManualReidBuilder(ReidBuilder, skip_registration=True):
  """A re-ID builder reading the benchmark's files from ``manual_dir``."""

  LAYOUTS: Sequence[Layout]

  def _collect_images(
    self, dl_manager: tfds.download.DownloadManager
  ) -> tuple[str, dict[str, list[ReidImage]]]:
    # A missing or empty folder never gets here: `prepare` refuses it first, and
    # under TFDS's own tools dl_manager.manual_dir does.
    tree = ManualTree(dl_manager.manual_dir)
    # Recorded so that preparing again from another folder is noticed.
    self.info.metadata["manual_dir"] = os.path.realpath(os.fspath(dl_manager.manual_dir))
    layout, root = self._locate_root(tree)
    return layout.name, self._read_layout(tree, layout, root)

  def _locate_root(self, tree: ManualTree) -> tuple[Layout, str]:
    """The layout of the dataset in ``tree`` and its root (see `locate_root`)."""
    return locate_root(tree, self._layouts())

  def _layouts(self) -> Sequence[Layout]:
    """The layouts this builder (and config) accepts."""
    return self.LAYOUTS

  @abc.abstractmethod
  def _read_layout(self, tree: ManualTree, layout: Layout, root: str) -> dict[str, list[ReidImage]]:
    """Returns the images of each split of the dataset at ``root``."""


class MarketStyleBuilder(ManualReidBuilder, skip_registration=True):
  """Market-1501-style folders: bounding_box_train, query, bounding_box_test."""

  NUM_CAMERAS: int
  # File names of look-alike benchmarks to refuse (see MARKET1501_NAMES).
  FOREIGN_NAMES: Sequence[NameStyle] = ()
  # Split -> folder below the root, for every layout of the benchmark.
  FOLDERS = {
    "train": "bounding_box_train",
    "query": "query",
    "gallery": "bounding_box_test",
  }

  def _read_layout(self, tree: ManualTree, layout: Layout, root: str) -> dict[str, list[ReidImage]]:
    return {
      split: read_market_style_folder(
        tree,
        folder,
        root=root,
        num_cameras=self.NUM_CAMERAS,
        dataset=self.name,
        foreign_names=self.FOREIGN_NAMES,
      )
      for split, folder in self.FOLDERS.items()
    }


def market_style_layout(root: str) -> Layout:
  """The layout of a Market-1501-style release whose root folder is ``root``."""
  return Layout(name=root, root_name=root, markers=tuple(MarketStyleBuilder.FOLDERS.values()))
