"""CUHK03 (Li et al., CVPR 2014), new 767/700 protocol (Zhong et al., CVPR 2017).

Configs ``labeled`` (hand-drawn boxes) and ``detected`` (DPM boxes). Two
source layouts are accepted, auto-detected:

* The original release: ``cuhk03_release/cuhk-03.mat`` (MATLAB v7.3, i.e.
  HDF5) next to ``cuhk03_new_protocol_config_{labeled,detected}.mat``
  (MATLAB v5). In cuhk-03.mat, ``labeled``/``detected`` hold one object
  reference per camera pair (5); each dereferences to a 10 x persons array of
  image references (MATLAB is column-major, so h5py shows everything
  transposed); slots 1-5 are the pair's first camera, 6-10 its second, and
  an absent image is an empty array. The protocol file lists every image as
  ``<pair>_<person>_<camera>_<slot>.png`` (``filelist``) with its pid
  (``labels``) and 1-based ``train_idx``/``query_idx``/``gallery_idx``. These
  images have no source bytes: they are PNG-encoded once, and their
  ``filename`` is the protocol's name.
* CUHK03-NP: ``{labeled,detected}/{bounding_box_train,query,bounding_box_test}``
  with Market-style names (``0001_c1_1.png``); the source bytes are kept.

camid is the camera within the pair (0 or 1), as in every common re-ID
codebase; pids are the protocol's (1..1467).
"""

from __future__ import annotations

import contextlib
import functools
import io
import pathlib
import re
import tempfile
from collections.abc import Sequence

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from tqdm import auto as tqdm_auto

from .. import reid_common

_MAT = "cuhk03_release/cuhk-03.mat"
_NP_FOLDERS = {
  "train": "bounding_box_train",
  "query": "query",
  "gallery": "bounding_box_test",
}
_PROTOCOL_KEYS = {"train": "train_idx", "query": "query_idx", "gallery": "gallery_idx"}
_MAT_NAME = re.compile(r"(\d+)_(\d+)_([12])_(\d+)\.png")


def _protocol_file(config: str) -> str:
  return f"cuhk03_new_protocol_config_{config}.mat"


class Builder(reid_common.ManualReidBuilder):
  """CUHK03 767/700: 767 train ids, 700 test ids, 2 cameras per pair."""

  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name="labeled", description="Hand-drawn boxes."),
    tfds.core.BuilderConfig(name="detected", description="DPM-detected boxes."),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "labeled"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Either place cuhk03_release.zip (or the folder cuhk03_release/ holding
  cuhk-03.mat) together with cuhk03_new_protocol_config_labeled.mat and
  cuhk03_new_protocol_config_detected.mat in manual_dir, or place the
  CUHK03-NP folder (labeled/ and detected/, each with bounding_box_train/,
  query/, bounding_box_test/) or its zip there. See README.md next to this
  builder.
  """

  def _layouts(self) -> Sequence[reid_common.Layout]:
    config = self.builder_config.name
    return (
      reid_common.Layout(
        name="cuhk03_release",
        root_name="cuhk03",
        markers=(_MAT, _protocol_file(config)),
      ),
      reid_common.Layout(
        name="CUHK03-NP",
        root_name="cuhk03-np",
        markers=tuple(f"{config}/{f}" for f in _NP_FOLDERS.values()),
      ),
    )

  def _read_layout(
    self,
    tree: reid_common.ManualTree,
    layout: reid_common.Layout,
    root: str,
  ) -> dict[str, list[reid_common.ReidImage]]:
    config = self.builder_config.name
    if layout.name == "CUHK03-NP":
      return {
        split: reid_common.read_market_style_folder(
          tree, f"{config}/{folder}", root=root, num_cameras=2
        )
        for split, folder in _NP_FOLDERS.items()
      }
    return _read_release(tree, root, config)


def _join(root: str, rel: str) -> str:
  return f"{root}/{rel}" if root else rel


def _mat_string(cell: np.ndarray) -> str:
  """The string in a loadmat cell (an array holding one string)."""
  values = np.asarray(cell).ravel()
  if values.size != 1 or values.dtype.kind != "U":
    raise ValueError(f"expected a string, got {cell!r}")
  return str(values[0])


def _read_protocol(
  data: bytes, location: str
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
  """Returns (filelist, pids, 0-based indices of each split)."""
  import scipy.io  # pylint: disable=g-import-not-at-top

  try:
    protocol = scipy.io.loadmat(io.BytesIO(data))
  except Exception as e:  # scipy raises several types for a bad file
    raise ValueError(f"Cannot read {location} as a MATLAB file: {e}") from e
  missing = [k for k in ("filelist", "labels", *_PROTOCOL_KEYS.values()) if k not in protocol]
  if missing:
    raise ValueError(f"{location} lacks the field(s) {', '.join(missing)}.")
  try:
    filelist = [_mat_string(c) for c in np.ravel(protocol["filelist"])]
  except ValueError as e:
    raise ValueError(f"{location}: bad filelist entry: {e}") from None
  pids = np.ravel(protocol["labels"]).astype(np.int64)
  if len(pids) != len(filelist):
    raise ValueError(f"{location}: {len(pids)} labels for {len(filelist)} files.")
  indices = {}
  for split, key in _PROTOCOL_KEYS.items():
    index = np.ravel(protocol[key]).astype(np.int64) - 1  # MATLAB: 1-based
    if not index.size:
      raise ValueError(f"{location}: {key} is empty: the {split} split would have no images.")
    if index.min() < 0 or index.max() >= len(filelist):
      raise ValueError(f"{location}: {key} holds indices outside 1..{len(filelist)}.")
    indices[split] = index
  return filelist, pids, indices


def _parse_mat_name(name: str, location: str) -> tuple[int, int, int, int]:
  """(pair, person, camera, slot), all 1-based, of '1_001_1_01.png'."""
  match = _MAT_NAME.fullmatch(name)
  if not match:
    raise ValueError(
      f"{location}: cannot parse {name!r}; expected"
      " <pair>_<person>_<camera 1|2>_<slot>.png, e.g. 1_001_1_01.png."
    )
  pair, person, camera, slot = map(int, match.groups())
  if not 1 <= slot <= 10 or camera != (1 if slot <= 5 else 2):
    raise ValueError(
      f"{location}: {name!r} names slot {slot} of camera {camera}; slots"
      " 1-5 belong to camera 1, 6-10 to camera 2."
    )
  return pair, person, camera, slot


class _ReleaseImages:
  """Reads images out of an open cuhk-03.mat (h5py.File)."""

  def __init__(self, mat, config: str, location: str):
    self._location = location
    if config not in mat:
      raise ValueError(f"{location} has no '{config}' dataset.")
    self._mat = mat
    self._pair_refs = np.asarray(mat[config]).ravel()
    self._persons = {}  # pair -> (persons, 10) image references

  def png(self, name: str, pair: int, person: int, slot: int) -> bytes:
    where = f"{self._location} ({name})"
    if not 1 <= pair <= len(self._pair_refs):
      raise ValueError(f"{where}: no camera pair {pair}.")
    if pair not in self._persons:
      self._persons[pair] = np.asarray(self._mat[self._pair_refs[pair - 1]]).T
    persons = self._persons[pair]
    if not 1 <= person <= persons.shape[0]:
      raise ValueError(f"{where}: pair {pair} has no person {person}.")
    image = np.asarray(self._mat[persons[person - 1, slot - 1]]).T
    if image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
      raise ValueError(f"{where}: the image is empty or not RGB ({image.shape}).")
    buffer = io.BytesIO()
    PIL.Image.fromarray(image.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _read_release(
  tree: reid_common.ManualTree, root: str, config: str
) -> dict[str, list[reid_common.ReidImage]]:
  """Reads the .mat release; PNG-encodes the protocol's images up front."""
  import h5py  # pylint: disable=g-import-not-at-top

  protocol_rel = _join(root, _protocol_file(config))
  protocol_location = tree.where(protocol_rel)
  filelist, pids, indices = _read_protocol(tree.read_bytes(protocol_rel), protocol_location)
  mat_rel = _join(root, _MAT)
  mat_location = tree.where(mat_rel)
  wanted = sorted({int(i) for index in indices.values() for i in index})
  pngs = {}
  with contextlib.ExitStack() as stack:
    path = tree.local_path(mat_rel)
    if path is None:  # inside a zip: h5py needs a seekable file on disk
      tmp = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory()))
      path = tree.extract(mat_rel, tmp)
    try:
      mat = stack.enter_context(h5py.File(path, "r"))
    except OSError as e:
      raise ValueError(f"Cannot read {mat_location} as a MATLAB v7.3 (HDF5) file: {e}") from e
    release = _ReleaseImages(mat, config, mat_location)
    # Not apnet_jax.progress.bar: preparing runs on one process and must not
    # start a JAX backend (on a TPU host it would hold the chips).
    for i in tqdm_auto.tqdm(wanted, desc=f"Reading {config} images of cuhk-03.mat"):
      name = filelist[i]
      pair, person, _, slot = _parse_mat_name(name, protocol_location)
      pngs[name] = release.png(name, pair, person, slot)
  splits = {}
  for split, index in indices.items():
    splits[split] = [
      reid_common.ReidImage(
        filename=filelist[i],
        pid=int(pids[i]),
        camid=_parse_mat_name(filelist[i], protocol_location)[2] - 1,
        location=f"{mat_location} ({config} image {filelist[i]})",
        read=functools.partial(pngs.__getitem__, filelist[i]),
      )
      for i in index
    ]
  return splits
