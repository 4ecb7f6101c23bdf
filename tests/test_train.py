"""The training job end to end on the tiny synthetic dataset, and its failure paths."""

import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from apnet_jax import checkpointing, train
from configs.synthetic import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir, **train_overrides):
  config = get_config("tiny")
  config.data.data_dir = data_dir
  config.train.log_every_steps = 1
  for key, value in train_overrides.items():
    setattr(config.train, key, value)
  return config


def saved_state(workdir, step):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored["state"]


def test_restart_resumes_exactly(data_dir, tmp_path):
  """2N steps == N steps + restart + N steps, parameter for parameter."""
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  results = train.train_and_evaluate(tiny_config(data_dir, max_steps=4), straight)
  train.train_and_evaluate(tiny_config(data_dir, max_steps=2), split)
  train.train_and_evaluate(tiny_config(data_dir, max_steps=4), split)
  a, b = saved_state(straight, 4), saved_state(split, 4)
  leaves_a, leaves_b = ocp.tree.to_flat_dict(a), ocp.tree.to_flat_dict(b)
  assert leaves_a.keys() == leaves_b.keys() and len(leaves_a) > 100
  for key in leaves_a:
    np.testing.assert_array_equal(leaves_a[key], leaves_b[key], err_msg=str(key))

  # The run's records: config, metrics, TensorBoard, results.
  assert set(results) >= {"R1", "R5", "R10", "mAP", "mINP", "protocol"}
  assert 0 <= results["mAP"] <= 100
  with open(os.path.join(straight, "results.json")) as f:
    assert json.load(f)["step"] == 4
  with open(os.path.join(split, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train_steps = [r["step"] for r in records if r["kind"] == "train"]
  assert train_steps == [1, 2, 3, 4]  # the restart continued at step 3
  for key in ("loss", "ce", "triplet", "acc", "lr", "img_per_s", "grad_norm", "param_norm",
              "epoch"):
    assert key in records[0], key
  assert any(r["kind"] == "eval" and "mAP" in r for r in records)
  assert os.listdir(os.path.join(split, "tensorboard"))
  with open(os.path.join(split, "config.json")) as f:
    assert json.load(f)["train"]["max_steps"] == 4


def test_resume_refuses_another_model(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(data_dir, max_steps=1), workdir)
  other = tiny_config(data_dir, max_steps=2)
  other.model.level = 1
  with pytest.raises(ValueError, match=r"model.level: checkpoint 2, config 1"):
    train.train_and_evaluate(other, workdir)


def test_non_finite_loss_names_the_step():
  window = [{"loss": np.float32(1.0)}, {"loss": np.float32(np.nan)}]
  with pytest.raises(train.NonFiniteLossError, match="at step 8"):
    train._reduce_window(window, first_step=6)


def test_missing_imagenet_file_says_which_and_where(tmp_path):
  from flax import nnx
  from apnet_jax import build_model

  model = build_model(get_config("tiny").model, 4, rngs=nnx.Rngs(0))
  with pytest.raises(FileNotFoundError, match=r"nothere\.pth.*resnet50-19c8e357\.pth"):
    train.init_from_imagenet(model, str(tmp_path / "nothere.pth"))


def test_unprepared_benchmark_says_how_to_prepare(tmp_path):
  from configs.market1501 import get_config as market

  config = market()
  config.data.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"market1501 is not prepared.*manual_dir"):
    train.open_dataset(config.data)


def test_command_line_rejects_an_unknown_key():
  result = subprocess.run(
      [sys.executable, "run.py", "--config", "configs/synthetic.py",
       "--config.model.levle=3", "--mode", "summary"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "levle" in result.stderr and "level" in result.stderr
