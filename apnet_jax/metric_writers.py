"""Training logs: ``metrics.jsonl`` and TensorBoard event files (tensorboardX, no TensorFlow).

Every record goes to both: one JSON line (``kind``, ``step`` and the values)
and TensorBoard scalars tagged ``<kind>/<name>``. Pictures (`write_images`)
go to TensorBoard only.

A run resumed from the checkpoint at step S trains steps S+1, ... again, and
each step must be logged once. ``metrics.jsonl``'s lines past S are moved to
``discarded_after_step_<S>/metrics.jsonl`` (kept, not deleted). TensorBoard
gets its own mechanism: the new event file starts with a session-start event
at step S+1 (tensorboardX's ``purge_step``), and TensorBoard's readers then
drop the earlier files' events from S+1 on.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping

import numpy as np
import tensorboardX
from absl import logging

JSONL = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def set_aside_after(workdir: str, step: int) -> str | None:
  """Moves the lines of ``metrics.jsonl`` past ``step`` to ``discarded_after_step_<step>/``.

  A line cut short by a kill goes there too. The file is replaced only once
  its remainder is written. Returns the folder, or None when nothing lay past
  ``step``.
  """
  jsonl = os.path.join(workdir, JSONL)
  if not os.path.exists(jsonl):
    return None
  with open(jsonl) as f:
    lines = [line.rstrip("\n") + "\n" for line in f]
  keep, later = [], []
  for line in lines:
    logged = _jsonl_step(line)
    (keep if logged is not None and logged <= step else later).append(line)
  if not later:
    return None
  aside = os.path.join(workdir, f"discarded_after_step_{step}")
  os.makedirs(aside, exist_ok=True)
  with open(os.path.join(aside, JSONL), "a") as f:
    f.writelines(later)
  with open(jsonl + ".tmp", "w") as f:
    f.writelines(keep)
    f.flush()
    os.fsync(f.fileno())
  os.replace(jsonl + ".tmp", jsonl)
  return aside


def _jsonl_step(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):  # a line cut short by a kill
    return None


class MetricWriter:
  """Appends metric records to ``metrics.jsonl`` and TensorBoard.

  Only JAX process 0 writes; the others get a writer that does nothing. A
  writer of a run resumed at ``resume_step`` logs each step once (see the
  module docstring).
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    aside = set_aside_after(workdir, resume_step)
    if aside:
      logging.warning(
        "Resuming at step %d: the metrics.jsonl lines of later steps are moved to %s.",
        resume_step,
        aside,
      )
    self._jsonl = open(os.path.join(workdir, JSONL), "a", buffering=1)
    self._tensorboard = tensorboardX.SummaryWriter(
      os.path.join(workdir, TENSORBOARD),
      purge_step=resume_step + 1 if resume_step else None,
      # tensorboardX writes from a thread, to disk every flush_secs whatever
      # flush() says: soon enough to follow a run live.
      flush_secs=5,
      # Its own file even when another writer started in the same second.
      filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}",
    )

  def write(self, step: int, metrics: Mapping[str, float], *, kind: str = "train") -> None:
    """One JSON line (``kind``, ``step`` and the metrics) and one scalar per number."""
    if not self.enabled:
      return
    record = {"kind": kind, "step": int(step)}
    record.update({k: _jsonable(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    for name, value in metrics.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        self._tensorboard.add_scalar(f"{kind}/{name}", float(value), int(step))
    self._tensorboard.flush()

  def write_images(
    self, step: int, images: Mapping[str, np.ndarray], *, kind: str = "eval"
  ) -> None:
    """TensorBoard images ``<kind>/<name>``, each uint8 (H, W, 3)."""
    if not self.enabled:
      return
    for name, image in images.items():
      self._tensorboard.add_image(f"{kind}/{name}", np.asarray(image), int(step), dataformats="HWC")
    self._tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def _jsonable(value):
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them visible.
  return value
