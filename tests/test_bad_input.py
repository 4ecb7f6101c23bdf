"""Bad input not covered elsewhere: truncated .mat, weights of another model, killed prepare.

The rest of the bad-input list lives next to what it tests: corrupt JPEGs,
missing folders, unparsable names, an empty manual_dir and a failed build in
test_datasets_errors.py; a corrupt image given to --mode extract in
test_inference.py; unknown config keys, bad train settings and a non-finite loss in
test_train.py; wrong shapes in a state dict in test_weights.py; a full disk
while saving a checkpoint, and a damaged one, in test_reliability.py.
"""

import os
import re
import signal
import subprocess
import sys

import data_fixtures as fx
import numpy as np
import pytest
from flax import nnx

from apnet_jax import build_model, restore, torch_io, weights
from apnet_jax.data import sources
from configs.synthetic import get_config


@pytest.mark.parametrize(
  "mat", ["cuhk03_release/cuhk-03.mat", "cuhk03_new_protocol_config_labeled.mat"]
)
def test_truncated_cuhk03_mat_is_named(tmp_path, mat):
  manual = fx.write_cuhk03_release(tmp_path / "manual")
  path = manual / mat
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a download cut short
  with pytest.raises(ValueError, match=re.escape(str(path))):
    fx.build("cuhk03", manual, tmp_path / "data", "labeled")
  assert not sources.get_builder(
    "cuhk03", data_dir=tmp_path / "data", config="labeled"
  ).is_prepared()


def test_imagenet_weights_of_another_width_name_the_file_and_keys(tmp_path):
  config = get_config("tiny")  # width 0.25: the stem has 16 channels
  model = nnx.eval_shape(lambda: build_model(config.model, 8, rngs=nnx.Rngs(0)))
  full_width = {
    "conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
    "layer1.0.conv1.weight": np.zeros((64, 64, 3, 3), np.float32),
  }
  path = tmp_path / "resnet50-19c8e357.pth"
  torch_io.write_pth(full_width, path)
  with pytest.raises(ValueError) as error:
    restore.init_from_imagenet(model, str(path))
  message = str(error.value)
  assert message.startswith(f"model.init_from: {path}: ")
  assert "conv1.weight: expected (16, 3, 7, 7), got (64, 3, 7, 7)" in message
  assert "layer1.0.conv1.weight: expected (16, 16, 3, 3), got (64, 64, 3, 3)" in message


def test_official_checkpoint_of_another_model_names_the_file_and_settings(tiny_model, tmp_path):
  """Weights the model leaves out, or cannot take, are refused naming the file."""
  config = get_config("tiny")  # level 2: a finer split of attention, SAMS weights and all
  state = weights.torch_state_dict(tiny_model)
  path = tmp_path / "apnet_level2.pth"
  torch_io.write_pth(state, path)
  config.eval.torch_checkpoint = str(path)
  config.model.level = 1
  with pytest.raises(
    ValueError,
    match=rf"eval\.torch_checkpoint: {re.escape(str(path))} .*"
    r"\['BN1\.bottleneck2.*model\.level \(1\).*model\.kind \('channel'\)",
  ):
    restore.restore_model(config, str(tmp_path))
  config.model.level, config.model.width = 2, 0.5
  with pytest.raises(
    ValueError,
    match=rf"^eval\.torch_checkpoint: {re.escape(str(path))}: .*"
    r"base\.conv1\.weight.*\(32, 3, 7, 7\).*\(16, 3, 7, 7\)",
  ):
    restore.restore_model(config, str(tmp_path))


# Run as `python -c KILL_IN_PREPARE manual_dir data_dir`: prepares market1501
# and SIGKILLs itself on reaching the gallery (train and query are written).
KILL_IN_PREPARE = """
import os, signal, sys
from apnet_jax.data import prepare
from apnet_jax.datasets import reid_common

check_image = reid_common.check_image

def check_or_die(data, location):
  if "bounding_box_test" in location:
    os.kill(os.getpid(), signal.SIGKILL)
  check_image(data, location)

reid_common.check_image = check_or_die
prepare.prepare("market1501", manual_dir=sys.argv[1], data_dir=sys.argv[2])
"""


@pytest.mark.slow
def test_killed_prepare_leaves_nothing_loadable_and_the_next_cleans_up(tmp_path):
  manual, data_dir = fx.dummy_data("market1501"), tmp_path / "data"
  killed = subprocess.run(
    [sys.executable, "-c", KILL_IN_PREPARE, str(manual), str(data_dir)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  dataset_dir = data_dir / "market1501"
  unfinished = [p.name for p in dataset_dir.iterdir() if p.name.startswith("incomplete.")]
  assert len(unfinished) == 1 and unfinished[0].endswith("_1.0.0"), os.listdir(dataset_dir)
  assert list((dataset_dir / unfinished[0]).glob("*train.array_record*"))  # it was mid-way
  assert not sources.get_builder("market1501", data_dir=data_dir).is_prepared()
  with pytest.raises(FileNotFoundError, match=rf"market1501.*{re.escape(str(data_dir))}"):
    sources.load_split("market1501", "train", data_dir=data_dir)

  # The user's files next to it, even look-alikes, survive the next prepare.
  (dataset_dir / "notes.txt").write_text("mine")
  (dataset_dir / "incomplete.backup").mkdir()
  builder = fx.build("market1501", manual, data_dir)
  assert len(sources.load_split(builder, "gallery")) == 6
  assert sorted(p.name for p in dataset_dir.iterdir()) == [
    "1.0.0",
    "incomplete.backup",
    "notes.txt",
  ]
  assert (dataset_dir / "notes.txt").read_text() == "mine"
