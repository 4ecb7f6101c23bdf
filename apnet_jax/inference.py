"""A trained model on your own images: features, rankings, and an exported extractor.

``extract_folder`` runs the evaluation feature extractor over every image of a
folder (recursively) and, given a gallery folder, ranks each image against it.
``export_workdir`` writes the extractor as a ``jax.export`` file that
``apnet_jax.export.load`` turns back into a function.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from apnet_jax import config_check, export, restore
from apnet_jax import workdir as workdir_lib
from apnet_jax.evaluation import evaluator as evaluator_lib
from apnet_jax.evaluation import plots

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(folder: str) -> list[str]:
  """Image files under ``folder`` (recursively), sorted by path."""
  folder = os.path.expanduser(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder not found: {folder}")
  files = sorted(
    os.path.join(root, name)
    for root, _, names in os.walk(folder)
    for name in names
    if name.lower().endswith(IMAGE_EXTENSIONS)
  )
  if not files:
    raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
  return files


class _FolderSource:
  """Records of image files in the format the eval pipeline reads (no identities)."""

  def __init__(self, files: list[str]):
    self.files = files

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    with open(self.files[index], "rb") as f:
      image = f.read()
    return {"image": image, "pid": -1, "camid": -1, "label": -1, "filename": self.files[index]}


def folder_features(
  model, files: list[str], config: ml_collections.ConfigDict, *, desc: str
) -> np.ndarray:
  """Evaluation features (image + flip) of image files, in order; ``desc`` names the bar."""
  # The evaluator's extractor, so that these features compare with a benchmark's.
  evaluator = evaluator_lib.ReidEvaluator(config, datasets=())
  return evaluator.features(model, _FolderSource(files), desc=desc)["features"]


def extract_folder(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """``--mode extract``: features of ``extract.input_dir``, optionally ranked.

  Writes to ``workdir/extract/``: ``features.npy`` (N, D) float32 and
  ``files.txt`` (one path per row); with ``extract.gallery_dir`` also
  ``gallery_features.npy``, ``gallery_files.txt``, ``ranking.json`` (each
  image's ``extract.top`` nearest gallery images with distances) and
  ``ranked_list.png`` (the first ``extract.num_pictures`` images). The folder
  holds this invocation's outputs only: they are written beside it and
  swapped in whole when complete (`apnet_jax.workdir.replace_folder`).
  """
  config_check.check_mode(config, "extract")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  model, source = restore.restore_model(config, workdir)
  out_dir = os.path.join(workdir, "extract")
  files = list_images(config.extract.input_dir)
  # Every process takes part in the (sharded) extraction; process 0 writes.
  features = folder_features(model, files, config, desc="extract")
  gallery_files = list_images(config.extract.gallery_dir) if config.extract.gallery_dir else []
  gallery = folder_features(model, gallery_files, config, desc="gallery") if gallery_files else None
  result = {"num_images": len(files), "feature_dim": int(features.shape[1]), **source}
  if gallery_files:
    result["num_gallery"] = len(gallery_files)
  if jax.process_index() != 0:
    return result
  workdir_lib.ensure_workdir(workdir)
  with workdir_lib.replace_folder(out_dir) as staging:
    np.save(os.path.join(staging, "features.npy"), features)
    _write_lines(os.path.join(staging, "files.txt"), files)
    if gallery_files:
      np.save(os.path.join(staging, "gallery_features.npy"), gallery)
      _write_lines(os.path.join(staging, "gallery_files.txt"), gallery_files)
      top = min(config.extract.top, len(gallery_files))
      order, dist = plots.rank(features, gallery, top=top)
      ranking = {
        f: [{"file": gallery_files[j], "distance": float(d)} for j, d in zip(row, drow)]
        for f, row, drow in zip(files, order, dist)
      }
      with open(os.path.join(staging, "ranking.json"), "w") as f:
        json.dump(ranking, f, indent=1)
      shown = range(min(config.extract.num_pictures, len(files)))
      plots.plot_ranked_lists(
        [_read(files[i]) for i in shown],
        [[_read(gallery_files[j]) for j in order[i]] for i in shown],
        None,
        os.path.join(staging, "ranked_list.png"),
        query_labels=[os.path.basename(files[i]) for i in shown],
      )
  print(f"features of {len(files)} images -> {out_dir}")
  return result


def _read(path: str) -> np.ndarray:
  with open(path, "rb") as f:
    return plots.decode(f.read(), path)


def export_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``--mode export``: writes ``workdir/feature_extractor.jaxexport``; returns its path."""
  config_check.check_mode(config, "export")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  model, _ = restore.restore_model(config, workdir)
  path = os.path.join(workdir, "feature_extractor.jaxexport")
  if jax.process_index() == 0:  # one file, written by one process
    workdir_lib.ensure_workdir(workdir)
    export.export_feature_extractor(
      model, path, input_size=tuple(config.model.input_size), eval_feature=config.model.eval_feature
    )
    print(
      f"exported the feature extractor (uint8 images of {tuple(config.model.input_size)}, "
      f"any batch size) -> {path}"
    )
  return path


def _write_lines(path: str, lines: list[str]) -> None:
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
