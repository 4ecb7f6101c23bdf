"""Orbax checkpoints of a training run: model, optimizer and step.

A checkpoint holds the ``TrainState`` (parameters, BatchNorm statistics and
frozen biases, optimizer state, step) and a small JSON record (seed, epoch,
the model and data config it belongs to). Neither the RNG nor the input
pipeline's position needs saving: every random draw and every batch is a
function of (seed, step), so a resumed run rebuilds both from the step, with
any number of data workers. (Checkpoints of earlier versions may also hold
Grain's iterator state as an item ``data``, which is not read, or the model
state under the field's former name ``rest``, which `restore` still reads.)

Preservation keeps the latest checkpoint *and* the best ``keep_best`` by
mAP: a best-only policy would delete the newest one and break resuming.

A save is atomic: Orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it
to ``<step>`` only when everything is written, and an older checkpoint is
deleted only after that. A run killed mid-save therefore keeps its previous
checkpoint; the next training run deletes the unfinished folder. A failed
write (a full disk) raises `CheckpointSaveError` naming the step and folder;
an unreadable checkpoint raises `CheckpointReadError`, and nothing is deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from orbax.checkpoint import checkpoint_managers as policies

from apnet_jax import progress
from apnet_jax.data import sources
from apnet_jax.platform import cpu


class _DropNoMetricsWarning(logging.Filter):
  """Drops Orbax's warning for a save without metrics.

  Saves between evaluations carry no mAP by design (LatestN keeps them), but
  Orbax warns at each one, in the middle of the progress bar.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


NO_METRICS_FILTER = _DropNoMetricsWarning()
absl_logging.get_absl_logger().addFilter(NO_METRICS_FILTER)

# Orbax's notice that a jax.Array type handler was replaced: the replacement is
# ours (`apnet_jax.platform.cpu.save_replicas_whole`) and deliberate, so it tells a
# user nothing.
progress.quiet_log_lines("Type handler registry type")


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed; the message names the step and the folder."""


class CheckpointReadError(RuntimeError):
  """Reading a checkpoint failed; the message names the step, the folder, what to do."""


def make_manager(workdir: str, *, keep_best: int, read_only: bool = False) -> ocp.CheckpointManager:
  """A manager of ``workdir/checkpoints`` with asynchronous saves.

  The training (writing) manager first deletes the temporary folders of saves
  that a killed run left unfinished. A ``read_only`` manager (evaluation,
  export; never given to `save`) creates and deletes nothing, so it may look
  at a run that is still training. (Orbax's own read-only mode would log a
  warning at every use.)
  """
  cpu.save_replicas_whole(jax.devices())
  policy = policies.AnyPreservationPolicy(
    [
      policies.LatestN(n=1),
      policies.BestN(
        get_metric_fn=lambda metrics: metrics["mAP"],
        n=keep_best,
        keep_checkpoints_without_metrics=False,
      ),
    ]
  )
  # best_fn only makes Orbax write each checkpoint's metrics to disk (so the
  # ranking survives restarts); the policy above decides what is kept.
  options = ocp.CheckpointManagerOptions(
    preservation_policy=policy,
    best_fn=lambda metrics: metrics["mAP"],
    best_mode="max",
    enable_async_checkpointing=True,
    create=not read_only,
    cleanup_tmp_directories=not read_only,
  )
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  meta: dict[str, Any],
  *,
  metrics: dict[str, float] | None = None,
) -> None:
  """Starts an asynchronous save of ``step`` (returns before it is written).

  Waits for the previous save first. Raises `CheckpointSaveError` if that one
  or this one cannot be written.
  """
  wait_until_finished(manager)
  try:
    manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      metrics=metrics,
      force=True,
    )
  except Exception as e:
    raise _save_error(manager, step, e) from e


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
  """Waits for the save in flight; raises `CheckpointSaveError` if it failed."""
  in_flight = manager.latest_step()  # the newest step is the one being written
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise _save_error(manager, in_flight, e) from e


def close_quietly(manager: ocp.CheckpointManager) -> None:
  """Closes ``manager`` on the way out of a failure, whose error matters more than close's."""
  try:
    manager.close()
  except Exception:  # pylint: disable=broad-except
    absl_logging.warning("closing the checkpoint manager failed as well", exc_info=True)


def _save_error(
  manager: ocp.CheckpointManager, step: int | None, error: Exception
) -> CheckpointSaveError:
  # Python writes raise OSError; TensorStore's array writes carry the text.
  disk_full = getattr(error, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(
    error
  )
  try:
    manager.reload()  # forget the failed step; list what is on disk
    kept = list(manager.all_steps())
  except Exception:  # pylint: disable=broad-except  (the save's error matters more)
    kept = None
  message = (
    f"Could not write the checkpoint of step {step} to {manager.directory}"
    f"{' (the disk is full)' if disk_full else ''}: {str(error).rstrip('.')}."
  )
  if kept:
    message += f" The checkpoints written before are intact (steps {kept})"
    # Rerunning helps when the disk failed, not when the state cannot be saved.
    if disk_full or isinstance(error, OSError):
      message += (
        f"; rerun the same command{' after freeing space' if disk_full else ''} "
        f"to resume from step {kept[-1]}"
      )
    message += "."
  elif kept is not None:
    message += " No earlier checkpoint exists to resume from."
  return CheckpointSaveError(message)


def abstract_like(state: Any) -> Any:
  """Shape, dtype and sharding of ``state``: the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


# Fields of the train state that earlier versions saved under another name:
# current name -> saved name.
FORMER_FIELD_NAMES = {"model_state": "rest"}


def restore(manager: ocp.CheckpointManager, step: int, state: Any) -> tuple[Any, dict[str, Any]]:
  """Restores ``step`` into the structure of ``state``; returns it and its record.

  A dataclass ``state`` (the `TrainState`) also restores from a checkpoint
  that saved some of its fields under their `FORMER_FIELD_NAMES`.

  Raises `CheckpointReadError` naming the step and folder if it cannot be read.
  """
  target = abstract_like(state)
  try:
    return _restore(manager, step, target)
  except Exception as e:  # pylint: disable=broad-except
    error = e
  # Then the former names: Orbax refuses a tree of other field names before it
  # reads any array, so the current layout costs nothing and an earlier one a
  # metadata read. If this fails too, the first error is the one to report.
  former = _with_former_names(target)
  if former is not None:
    with contextlib.suppress(Exception):
      restored, meta = _restore(manager, step, former)
      return type(state)(
        **{
          f.name: restored[FORMER_FIELD_NAMES.get(f.name, f.name)]
          for f in dataclasses.fields(state)
        }
      ), meta
  raise _read_error(manager, step, error) from error


def _restore(manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
  restored = manager.restore(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
  )
  return restored["state"], restored["meta"]


def _with_former_names(target: Any) -> dict[str, Any] | None:
  """``target``'s fields as a dict under their former names; None if none was renamed."""
  if not dataclasses.is_dataclass(target):
    return None
  names = [f.name for f in dataclasses.fields(target)]
  if not set(names) & set(FORMER_FIELD_NAMES):
    return None
  return {FORMER_FIELD_NAMES.get(name, name): getattr(target, name) for name in names}


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The JSON record of ``step`` alone (cheap; checked before the arrays)."""
  try:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:
    raise _read_error(manager, step, e) from e


def _read_error(manager: ocp.CheckpointManager, step: int, error: Exception) -> CheckpointReadError:
  # Orbax's errors (a missing item, broken JSON, a truncated array) name
  # neither the step nor the folder, nor what the user can do about them.
  folder = os.path.join(str(manager.directory), str(step))
  # KeyError's str() is the repr of its text, quotes and escapes included;
  # TensorStore appends its whole JSON spec, which names nothing new.
  text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
  text = text.split(" [tensorstore_spec", 1)[0]
  try:
    others = [s for s in manager.all_steps() if s != step]
  except Exception:  # pylint: disable=broad-except  (the read's error matters more)
    others = None
  message = (
    f"Cannot read the checkpoint of step {step} in {folder} "
    f"({type(error).__name__}: {text.rstrip('.')}). Nothing was deleted. "
    f"If it is damaged, move {folder} out of {manager.directory} and rerun"
  )
  if others:
    message += (
      f": the run then uses step {max(others)}, the latest of the other kept steps {others}."
    )
  elif others is not None:
    message += "; no other step is kept, so training would start over from step 0."
  else:
    message += "."
  return CheckpointReadError(message)


def best_step(manager: ocp.CheckpointManager) -> int | None:
  """The kept step with the highest mAP, or None if none has metrics."""
  scored = [
    (metrics["mAP"], step)
    for step in manager.all_steps()
    if (metrics := manager.metrics(step)) and "mAP" in metrics
  ]
  return max(scored)[1] if scored else None


# Config keys a checkpoint's arrays depend on; the rest (paths, workers,
# evaluation feature, compute dtype) may change between runs.
_STATE_KEYS = {
  "model": ("depth", "width", "last_stride", "stem_relu", "level", "kind", "input_size"),
  "data": ("name", "config", "p", "k"),
}


# What evaluating a checkpoint depends on: its arrays' shapes and the dataset
# (the number of classes is the checkpoint's own); not the batch's P x K.
EVAL_KEYS = {
  "model": _STATE_KEYS["model"],
  "data": ("name", "config"),
}


def check_compatible(
  saved: dict[str, Any],
  current: dict[str, Any],
  workdir: str,
  *,
  keys: dict[str, tuple[str, ...]] = _STATE_KEYS,
) -> None:
  """Refuses a checkpoint of another model, dataset or seed, naming the keys.

  ``keys``: the config keys compared, by section (by default, those training
  depends on; `EVAL_KEYS` for evaluation).
  """
  current = json.loads(json.dumps(current))  # tuples -> lists, as saved
  # One list of datasets spelled another way (msmt17, msmt17:train) is the same data.
  same_data = sources.same_training_data(saved.get("data", {}), current.get("data", {}))
  diffs = []
  for section, section_keys in keys.items():
    for key in section_keys:
      old, new = saved.get(section, {}).get(key), current[section].get(key)
      if old != new and not (same_data and section == "data" and key in ("name", "config")):
        diffs.append(f"{section}.{key}: checkpoint {old!r}, config {new!r}")
  if saved.get("num_classes") != current.get("num_classes"):
    diffs.append(
      f"num_classes: checkpoint {saved.get('num_classes')}, dataset {current.get('num_classes')}"
    )
  # Every random draw is a function of (seed, step): another seed would splice
  # two runs together. A record without it is let through.
  if "seed" in saved and saved["seed"] != current.get("seed"):
    diffs.append(f"train.seed: checkpoint {saved.get('seed')!r}, config {current.get('seed')!r}")
  if diffs:
    raise ValueError(
      f"{workdir}/checkpoints belongs to another run: "
      + "; ".join(diffs)
      + ". Use another --workdir, or set these back to the checkpoint's values."
    )
