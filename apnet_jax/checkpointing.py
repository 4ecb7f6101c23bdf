"""Orbax checkpoints of a training run: model, optimizer, step, data position.

A checkpoint holds the ``TrainState`` (parameters, BatchNorm statistics and
frozen biases, optimizer state, step), the input iterator's state, and a
small JSON record (seed, epoch, the model and data config it belongs to).
The RNG needs no saving: every random draw is a function of (seed, step).

Preservation keeps the latest checkpoint *and* the best ``keep_best`` by
mAP: a best-only policy would delete the newest one and break resuming.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


def make_manager(workdir: str, *, keep_best: int) -> ocp.CheckpointManager:
  """A manager of ``workdir/checkpoints`` with asynchronous saves."""
  policy = policies.AnyPreservationPolicy([
      policies.LatestN(n=1),
      policies.BestN(get_metric_fn=lambda metrics: metrics["mAP"], n=keep_best,
                     keep_checkpoints_without_metrics=False),
  ])
  # best_fn only makes Orbax write each checkpoint's metrics to disk (so the
  # ranking survives restarts); the policy above decides what is kept.
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=lambda metrics: metrics["mAP"], best_mode="max",
      enable_async_checkpointing=True, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         meta: dict[str, Any], *, metrics: dict[str, float] | None = None) -> None:
  """Starts an asynchronous save of ``step`` (returns before it is written)."""
  manager.save(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iterator),
          meta=ocp.args.JsonSave(meta)),
      metrics=metrics,
      force=True)


def abstract_like(state: Any) -> Any:
  """Shape, dtype and sharding of ``state``: the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def restore(manager: ocp.CheckpointManager, step: int, state: Any,
            data_iterator: Any | None) -> tuple[Any, dict[str, Any]]:
  """Restores ``step`` into the structure of ``state`` (and the iterator in place)."""
  items = dict(state=ocp.args.StandardRestore(abstract_like(state)),
               meta=ocp.args.JsonRestore())
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], restored["meta"]


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The JSON record of ``step`` alone (cheap; checked before the arrays)."""
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def best_step(manager: ocp.CheckpointManager) -> int | None:
  """The kept step with the highest mAP, or None if none has metrics."""
  scored = [(metrics["mAP"], step) for step in manager.all_steps()
            if (metrics := manager.metrics(step)) and "mAP" in metrics]
  return max(scored)[1] if scored else None


# Config keys a checkpoint's arrays depend on; the rest (paths, workers,
# evaluation feature, compute dtype) may change between runs.
_STATE_KEYS = {
    "model": ("depth", "width", "last_stride", "stem_relu", "level", "kind", "input_size"),
    "data": ("name", "config", "p", "k"),
}


def check_compatible(saved: dict[str, Any], current: dict[str, Any], workdir: str) -> None:
  """Refuses to resume a checkpoint of another model or dataset, naming the keys."""
  current = json.loads(json.dumps(current))  # tuples -> lists, as saved
  diffs = []
  for section, keys in _STATE_KEYS.items():
    for key in keys:
      old, new = saved.get(section, {}).get(key), current[section].get(key)
      if old != new:
        diffs.append(f"{section}.{key}: checkpoint {old!r}, config {new!r}")
  if saved.get("num_classes") != current.get("num_classes"):
    diffs.append(f"num_classes: checkpoint {saved.get('num_classes')}, "
                 f"dataset {current.get('num_classes')}")
  if diffs:
    raise ValueError(f"{workdir}/checkpoints belongs to another run: " + "; ".join(diffs)
                     + ". Use another --workdir.")
