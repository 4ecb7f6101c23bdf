"""Helpers of the dataset tests: dummy data, zips, CUHK03 .mat files, records."""

from __future__ import annotations

import io
import pathlib
import shutil
import warnings
import zipfile

import h5py
import numpy as np
import PIL.Image
import scipy.io

from apnet_jax.data import prepare, sources

DATASETS_DIR = pathlib.Path(sources.BUILDERS["market1501"].code_path).parent.parent


def dummy_data(name: str) -> pathlib.Path:
  """The committed dummy manual_dir of builder ``name``."""
  return DATASETS_DIR / name / "dummy_data"


def copy_dummy(name: str, dest: pathlib.Path) -> pathlib.Path:
  """A writable copy of the dummy manual_dir (for tests that break it)."""
  shutil.copytree(dummy_data(name), dest)
  return dest


def zip_folder(folder: pathlib.Path, zip_path: pathlib.Path) -> pathlib.Path:
  """Zips ``folder`` as its archive would: members start with its name."""
  zip_path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
    for path in sorted(folder.rglob("*")):
      zf.write(path, path.relative_to(folder.parent).as_posix())
  return zip_path


def build(name, manual_dir, data_dir, config=None):
  """Prepares a dataset quietly enough for tests; returns the builder.

  Dummy data never has the published statistics: their warning is silenced
  here (tests/test_datasets_prepare.py checks it).
  """
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", prepare.StatisticsWarning)
    return prepare.prepare(name, manual_dir=manual_dir, data_dir=data_dir, config=config)


def records(builder, split):
  """All records of a split as (filename, pid, camid, label, image bytes)."""
  source = sources.load_split(builder, split)
  return [
    (
      r["filename"].decode(),
      int(r["pid"]),
      int(r["camid"]),
      int(r["label"]),
      r["image"],
    )
    for r in (source[i] for i in range(len(source)))
  ]


def jpeg_bytes(seed: int, size=(8, 4)) -> bytes:
  rng = np.random.default_rng(seed)
  buffer = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 256, (*size, 3)).astype(np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
  return np.asarray(PIL.Image.open(io.BytesIO(data)))


# ----------------------------------------------------------------------------
# CUHK03 original release: cuhk-03.mat (HDF5) + protocol file (MATLAB v5).
# ----------------------------------------------------------------------------

# Persons per camera pair, and which of the 10 slots hold an image (slots
# 0-4: the pair's first camera, 5-9: its second; the others are empty).
CUHK03_PAIRS = (
  {1: (0, 1, 5, 6), 2: (0, 5), 3: (1, 2, 7)},
  {1: (0, 5, 8), 2: (3, 9)},
)


def cuhk03_image(kind: str, pair: int, person: int, slot: int) -> np.ndarray:
  """The (H, W, 3) uint8 image of a slot; H != W so a transpose would show."""
  seed = [("labeled", "detected").index(kind), pair, person, slot]
  return np.random.default_rng(seed).integers(0, 256, (6, 4, 3)).astype(np.uint8)


def write_cuhk03_mat(path: pathlib.Path) -> None:
  """Writes cuhk-03.mat as MATLAB v7.3 stores it (column-major, references)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with h5py.File(path, "w") as f:
    refs = f.create_group("#refs#")
    for kind in ("labeled", "detected"):
      pair_refs = []
      for pair, persons in enumerate(CUHK03_PAIRS, start=1):
        slots = np.empty((10, len(persons)), dtype=h5py.ref_dtype)
        for person, filled in persons.items():
          for slot in range(10):
            if slot in filled:
              # MATLAB's H x W x 3 array appears as 3 x W x H in HDF5.
              data = cuhk03_image(kind, pair, person, slot).T
            else:
              data = np.zeros(2, np.uint64)  # MATLAB's empty []
            ds = refs.create_dataset(f"{kind}_{pair}_{person}_{slot}", data=data)
            slots[slot, person - 1] = ds.ref
        pair_refs.append(refs.create_dataset(f"{kind}_{pair}", data=slots).ref)
      f.create_dataset(kind, data=np.array([pair_refs], dtype=h5py.ref_dtype))


def cuhk03_protocol() -> tuple[list[str], list[int], dict[str, list[int]]]:
  """(filelist, pids, 0-based indices per split) of the dummy protocol.

  pids number the persons across pairs (pair 1: 1..3, pair 2: 4..5). Train:
  pids 1 and 4; test: 2, 3, 5, each with its first image as the query.
  """
  filelist, pids = [], []
  split_of = {}
  pid = 0
  for pair, persons in enumerate(CUHK03_PAIRS, start=1):
    for person, filled in persons.items():
      pid += 1
      for slot in filled:
        camera = 1 if slot < 5 else 2
        name = f"{pair}_{person:03d}_{camera}_{slot + 1:02d}.png"
        if pid in (1, 4):
          split = "train"
        elif slot == filled[0]:
          split = "query"
        else:
          split = "gallery"
        split_of[len(filelist)] = split
        filelist.append(name)
        pids.append(pid)
  indices = {s: [i for i, v in split_of.items() if v == s] for s in ("train", "query", "gallery")}
  return filelist, pids, indices


def write_cuhk03_protocol(path: pathlib.Path, **overrides) -> None:
  """Writes cuhk03_new_protocol_config_*.mat (MATLAB v5, 1-based indices)."""
  filelist, pids, indices = cuhk03_protocol()
  cells = np.empty((len(filelist), 1), dtype=object)
  for i, name in enumerate(filelist):
    cells[i, 0] = name
  content = {
    "filelist": cells,
    "labels": np.array(pids, np.float64).reshape(-1, 1),
    "camId": np.array([int(n.split("_")[2]) for n in filelist], np.float64).reshape(-1, 1),
    "train_idx": np.array(indices["train"], np.float64).reshape(-1, 1) + 1,
    "query_idx": np.array(indices["query"], np.float64).reshape(-1, 1) + 1,
    "gallery_idx": np.array(indices["gallery"], np.float64).reshape(-1, 1) + 1,
  }
  content.update(overrides)
  content = {k: v for k, v in content.items() if v is not None}
  path.parent.mkdir(parents=True, exist_ok=True)
  scipy.io.savemat(path, content)


def write_cuhk03_release(root: pathlib.Path) -> pathlib.Path:
  """torchreid's layout: cuhk03_release/cuhk-03.mat + the protocol files."""
  write_cuhk03_mat(root / "cuhk03_release" / "cuhk-03.mat")
  for kind in ("labeled", "detected"):
    write_cuhk03_protocol(root / f"cuhk03_new_protocol_config_{kind}.mat")
  return root
