"""metrics.jsonl and TensorBoard events, read back with TensorBoard's own reader."""

import glob
import json
import math
import os
import time

import numpy as np
from tensorboard.backend.event_processing import event_accumulator, event_file_loader

from apnet_jax import metric_writers


def tensorboard_view(folder):
  """What TensorBoard shows of ``folder``: {scalar tag: [(step, value)]} and image steps."""
  accumulator = event_accumulator.EventAccumulator(
    str(folder), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
  )
  accumulator.Reload()
  tags = accumulator.Tags()
  scalars = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in tags["scalars"]}
  images = {
    tag: [(e.step, e.width, e.height) for e in accumulator.Images(tag)] for tag in tags["images"]
  }
  return scalars, images


def raw_scalar_steps(folder):
  """Every scalar event on disk, purged or not: {(tag, step): count}."""
  counts = {}
  for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
    for event in event_file_loader.EventFileLoader(path).Load():
      for value in event.summary.value:
        counts[value.tag, event.step] = counts.get((value.tag, event.step), 0) + 1
  return counts


def test_writer_writes_jsonl_and_tensorboard_scalars_and_images(tmp_path):
  writer = metric_writers.MetricWriter(str(tmp_path))
  writer.write(10, {"loss": 1.5, "acc": 0.25})
  writer.write(20, {"mAP": 80.0, "bad": float("nan")}, kind="eval")
  writer.write_images(20, {"cmc": np.zeros((12, 34, 3), np.uint8)})
  writer.close()
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert lines[0] == {"kind": "train", "step": 10, "loss": 1.5, "acc": 0.25}
  assert lines[1]["kind"] == "eval" and lines[1]["mAP"] == 80.0 and lines[1]["bad"] == "nan"
  scalars, images = tensorboard_view(tmp_path / "tensorboard")
  assert scalars["train/loss"] == [(10, 1.5)] and scalars["train/acc"] == [(10, 0.25)]
  assert scalars["eval/mAP"] == [(20, 80.0)]
  assert math.isnan(scalars["eval/bad"][0][1])
  assert images == {"eval/cmc": [(20, 34, 12)]}


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metric_writers.MetricWriter(str(tmp_path / "run"), enabled=False)
  writer.write(1, {"loss": 1.0})
  writer.write_images(1, {"cmc": np.zeros((2, 2, 3), np.uint8)})
  writer.close()
  assert not os.path.exists(tmp_path / "run")


def test_a_resumed_writer_logs_each_step_once(tmp_path):
  writer = metric_writers.MetricWriter(str(tmp_path))
  for step in range(1, 6):
    writer.write(step, {"loss": float(step)})
  writer.write(4, {"mAP": 50.0}, kind="eval")
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"kind": "train", "st')  # a line cut short by a kill
  time.sleep(1.1)  # event files are ordered by the second they were started in

  resumed = metric_writers.MetricWriter(str(tmp_path), resume_step=3)
  for step in (4, 5):
    resumed.write(step, {"loss": 10.0 * step})
  resumed.close()
  kept = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["loss"]) for r in kept] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50)]
  scalars, _ = tensorboard_view(tmp_path / "tensorboard")
  assert scalars["train/loss"] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50)]
  assert scalars.get("eval/mAP", []) == []  # the killed run's evaluation at step 4
  # Nothing is lost: the killed run's lines are set aside, its events stay on disk.
  aside = tmp_path / "discarded_after_step_3"
  lines = (aside / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines[:3]] == [4, 5, 4]
  assert lines[3] == '{"kind": "train", "st'
  assert raw_scalar_steps(tmp_path / "tensorboard")[("train/loss", 4)] == 2

  metric_writers.MetricWriter(str(tmp_path), resume_step=5).close()  # nothing past 5
  assert (aside / "metrics.jsonl").read_text().count("\n") == 4
  assert len(glob.glob(str(tmp_path / "discarded_after_step_*"))) == 1
