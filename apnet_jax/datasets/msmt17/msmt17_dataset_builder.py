"""MSMT17 (Wei et al., CVPR 2018) as an ArrayRecord TFDS dataset.

Both releases are read, auto-detected from the folder names:

* V1: ``MSMT17_V1/{train,test}/`` with ``list_{train,val,query,gallery}.txt``;
* V2: ``MSMT17_V2/{mask_train_v2,mask_test_v2}/`` with the same lists (faces
  are blurred; results are lower than on V1). The metadata's
  ``source_layout`` says which one a dataset was built from.

Each list line is ``<path below the image folder> <pid>``; the train and val
lists point into the train folder, query and gallery into the test folder.
The camera is the third '_'-separated field of the name (1..15), the pid the
list's. Configs: ``train`` (the standard training set, list_train only) and
``trainval`` (list_train + list_val, same 1,041 ids).
"""

from __future__ import annotations

import functools

import tensorflow_datasets as tfds

from .. import reid_common

_NUM_CAMERAS = 15
_LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")


def _layout(version: str, train_dir: str, test_dir: str) -> reid_common.Layout:
  return reid_common.Layout(name=version, root_name=version, markers=(train_dir, test_dir) + _LISTS)


# Layout name -> (train image folder, test image folder).
_IMAGE_DIRS = {
  "MSMT17_V1": ("train", "test"),
  "MSMT17_V2": ("mask_train_v2", "mask_test_v2"),
}


class Builder(reid_common.ManualReidBuilder):
  """MSMT17: 1,041 train ids, 3,060 test ids, 15 cameras."""

  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name="train", description="Train split = list_train.txt (standard)."),
    tfds.core.BuilderConfig(
      name="trainval",
      description="Train split = list_train.txt + list_val.txt.",
    ),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "train"
  LAYOUTS = tuple(_layout(v, *dirs) for v, dirs in _IMAGE_DIRS.items())
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Place MSMT17_V1.zip or MSMT17_V2.zip, or the folder extracted from it
  (MSMT17_V1/ with train/, test/ and list_{train,val,query,gallery}.txt, or
  MSMT17_V2/ with mask_train_v2/, mask_test_v2/ and the same lists), in
  manual_dir. See README.md next to this builder.
  """

  def _read_layout(
    self,
    tree: reid_common.ManualTree,
    layout: reid_common.Layout,
    root: str,
  ) -> dict[str, list[reid_common.ReidImage]]:
    train_dir, test_dir = _IMAGE_DIRS[layout.name]
    train_lists = ["list_train.txt"]
    if self.builder_config.name == "trainval":
      train_lists.append("list_val.txt")
    read = functools.partial(_read_list, tree, root)
    lists = {
      "train": train_lists,
      "query": ["list_query.txt"],
      "gallery": ["list_gallery.txt"],
    }
    splits = {}
    for split, names in lists.items():
      image_dir = train_dir if split == "train" else test_dir
      splits[split] = [im for name in names for im in read(name, image_dir)]
      if not splits[split]:
        listed = " and ".join(tree.where(f"{root}/{n}" if root else n) for n in names)
        verb = "lists" if len(names) == 1 else "list"
        raise ValueError(f"{listed} {verb} no image: the {split} split would be empty.")
    return splits


def _read_list(
  tree: reid_common.ManualTree, root: str, list_name: str, image_dir: str
) -> list[reid_common.ReidImage]:
  """Reads one list file; its paths are relative to ``image_dir``."""
  list_rel = f"{root}/{list_name}" if root else list_name
  list_location = tree.where(list_rel)
  try:
    lines = tree.read_bytes(list_rel).decode("utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise ValueError(f"{list_location} is not a text file: {e}") from e
  images = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f"{list_location}, line {number}"
    fields = line.split()
    if len(fields) != 2:
      raise ValueError(f"{where}: expected '<image path> <pid>', got {line!r}.")
    path, pid_text = fields
    filename = f"{image_dir}/{path}"
    rel = f"{root}/{filename}" if root else filename
    if not tree.is_file(rel):
      raise FileNotFoundError(f"{where} lists {path}, but {tree.where(rel)} does not exist.")
    try:
      pid = int(pid_text)
      camera = int(path.rsplit("/", 1)[-1].split("_")[2])
    except (ValueError, IndexError):
      raise ValueError(
        f"{where}: cannot parse pid and camera from {line!r}; expected"
        " e.g. '0000/0000_000_01_0303morning_0008_0.jpg 0' (camera 1)."
      ) from None
    location = tree.where(rel)
    reid_common.check_camid(camera - 1, _NUM_CAMERAS, location)
    images.append(
      reid_common.ReidImage(
        filename=filename,
        pid=pid,
        camid=camera - 1,
        location=location,
        read=functools.partial(tree.read_bytes, rel),
      )
    )
  return images
