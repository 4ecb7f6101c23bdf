"""Training APNet: the loop, from an empty (or interrupted) workdir to ``results.json``.

``train_and_evaluate(config, workdir)`` reads top to bottom: take the workdir,
open the datasets (training's and the evaluator's), check a checkpoint to
resume from, build the model, optimizer and train state, then the loop: the
jitted step, logs, checkpoints and the evaluations at ``train.eval_epochs``,
and at the end the report of the one re-ID evaluator
(`apnet_jax.evaluation.evaluator`). ``run.py`` and notebooks call the same
function.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from apnet_jax import (
  checkpointing,
  config_check,
  distributed,
  optim,
  progress,
  restore,
  sharding,
  train_step,
)
from apnet_jax import workdir as workdir_lib
from apnet_jax.data import opening, pipeline
from apnet_jax.errors import NonFiniteLossError
from apnet_jax.evaluation import evaluator as evaluator_lib
from apnet_jax.metric_writers import MetricWriter
from apnet_jax.models import build_model
from apnet_jax.preemption import StopSignals


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, eval_command: str | None = None
) -> dict[str, Any]:
  """Trains APNet as ``config`` says, resuming from ``workdir``; returns the results.

  Writes ``workdir/config.json``, ``metrics.jsonl``, TensorBoard events,
  ``checkpoints/`` and, at the end, ``results.json``. On a resume from step S,
  log records past S (the killed run's steps that are trained again) are moved
  to ``workdir/discarded_after_step_S/``.

  A workdir whose latest checkpoint lies past this config's last step (a rerun
  with fewer epochs or a smaller ``max_steps``) is refused rather than reported
  as a run of these settings; one exactly at the last step is evaluated again.

  One training writes a workdir at a time: it holds the workdir's lock
  (`apnet_jax.workdir.WorkdirLock`; process 0 takes it for all processes)
  from before its first look at the workdir until it returns. A workdir whose
  ``config.json`` records another recipe (`apnet_jax.workdir.check_recipe`),
  with or without checkpoints, is refused unless ``train.allow_changes``
  lists the changed keys; accepted changes go to ``config_changes.jsonl``.

  SIGTERM and SIGINT (single process) stop the run at the next step: that step
  is saved, then the process exits 143 or 130; a signal during the final save
  waits for it. A signal during the final evaluation stops it and says that
  ``eval_command`` (default: the ``--mode eval`` command line) finishes it.

  Raises:
    config_check.ConfigError: settings out of range (before anything is
      computed or written).
    ValueError: a ``workdir`` checkpoint or record of another run or seed, or
      of a longer run (before any compute).
    NotADirectoryError: ``workdir`` is a file.
    apnet_jax.workdir.WorkdirBusyError: another process holds ``workdir``.
    checkpointing.CheckpointReadError: the latest checkpoint cannot be read.
  """
  config_check.check_mode(config, "train")
  workdir = workdir_lib.ensure_workdir(workdir)
  if eval_command is None:
    eval_command = f"python run.py --config CONFIG --workdir {workdir} --mode eval"
  with StopSignals() as stop:
    held = distributed.on_process_0_first(
      lambda: workdir_lib.WorkdirLock.acquire(workdir, "training"),
      f"{workdir}: process 0 could not take the workdir",
    )
    try:
      return _train_and_evaluate_locked(config, workdir, stop, eval_command)
    finally:
      if held is not None:
        held.release()


def _train_and_evaluate_locked(
  config: ml_collections.ConfigDict, workdir: str, stop: StopSignals, eval_command: str
) -> dict[str, Any]:
  """`train_and_evaluate` once the workdir (absolute, existing) is this run's."""
  # Setup: resolved config, mesh.
  is_main = jax.process_index() == 0
  logging.info("Config:\n%s", config)
  mesh = sharding.make_mesh()

  # Data: the train split's size, in identities and steps; every dataset the
  # evaluator will need, opened now so that a missing one stops the run before step 1.
  train_split = opening.open_train_split(config.data)
  evaluator = evaluator_lib.ReidEvaluator(
    config, evaluator_lib.open_eval_datasets(config), mesh=mesh
  )
  stop.exit_if_set("nothing trained yet")
  num_classes = train_split.num_classes
  steps_per_epoch = pipeline.steps_per_epoch(train_split.labels, p=config.data.p, k=config.data.k)
  total_steps = config.train.epochs * steps_per_epoch
  if config.train.max_steps > 0:
    total_steps = min(total_steps, config.train.max_steps)

  # The latest checkpoint, if any: its record is checked before any compute.
  meta = {
    "seed": config.train.seed,
    "num_classes": num_classes,
    "model": config.model.to_dict(),
    "data": config.data.to_dict(),
  }
  # Looked at read-only: a refused workdir is left exactly as it was.
  manager = checkpointing.make_manager(workdir, keep_best=config.train.keep_best, read_only=True)
  start_step = manager.latest_step() or 0
  if start_step:
    _check_resumable(
      manager,
      start_step,
      meta,
      config,
      total_steps=total_steps,
      steps_per_epoch=steps_per_epoch,
      workdir=workdir,
    )
  manager.close()
  # The logs (config.json, metrics, TensorBoard) continue only the same recipe,
  # checkpoint or not: another run's would be mixed into them.
  recipe_changes = workdir_lib.check_recipe(config, workdir)
  manager = checkpointing.make_manager(workdir, keep_best=config.train.keep_best)
  # On any failure (and SIGTERM's exit) the manager is closed before the error
  # leaves: its threads would fail at interpreter exit and bury the error.
  try:
    # The identity-balanced loader (from the resumed step: batches are a
    # function of (seed, step)), model, optimizer and train state (resumed).
    loader = pipeline.train_loader(
      train_split.source,
      train_split.labels,
      p=config.data.p,
      k=config.data.k,
      height=config.model.input_size[0],
      width=config.model.input_size[1],
      seed=config.train.seed,
      start_step=start_step,
      num_workers=config.data.num_workers,
    )
    model = build_model(config.model, num_classes, rngs=nnx.Rngs(config.train.seed))
    if config.model.init_from:
      restore.init_from_imagenet(model, config.model.init_from)
    tx, _ = optim.make_optimizer(config, steps_per_epoch)
    graphdef, state = train_step.create_train_state(model, tx)
    state = jax.device_put(state, sharding.replicated_sharding(mesh))
    if start_step:
      state, _ = checkpointing.restore(manager, start_step, state)
      logging.info("Resumed from step %d", start_step)
    if is_main:  # after the checks above: never overwrite another run's record
      workdir_lib.record_changes(workdir, recipe_changes, step=start_step)
      with workdir_lib.replace_file(os.path.join(workdir, workdir_lib.CONFIG_FILE)) as path:
        with open(path, "w") as f:
          f.write(config.to_json_best_effort(indent=2))

    # The loop. Device metrics are fetched only at logging steps.
    step_fn = train_step.make_train_step(
      graphdef, tx, num_classes=num_classes, config=config, mesh=mesh, seed=config.train.seed
    )
    writer = MetricWriter(workdir, enabled=is_main, resume_step=start_step)
    # Set when the last step was an evaluation epoch: the final report reuses it.
    final_report = final_pictures = None
    window, window_start, tick = [], start_step, time.time()
    with progress.bar(total_steps, "train", "step", initial=start_step) as bar:
      for step in range(start_step, total_steps):
        batch = next(loader)
        state, metrics = step_fn(
          state, sharding.shard_batch({"image": batch["image"], "label": batch["label"]}, mesh)
        )
        window.append(metrics)
        done = step + 1
        stop.poll(done)
        epoch_end = done % steps_per_epoch == 0
        epoch = done // steps_per_epoch
        last = done == total_steps
        if done % config.train.log_every_steps == 0 or epoch_end or last or stop.set:
          record = _reduce_window(window, window_start)
          record.update(
            epoch=done / steps_per_epoch,
            img_per_s=len(window) * config.data.p * config.data.k / max(time.time() - tick, 1e-9),
          )
          writer.write(done, record)
          # Updated only here, after the sync: dispatch runs ahead of the device.
          bar.update(done - bar.n)
          bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.2f}")
          window, window_start, tick = [], done, time.time()

        evaluated = None
        if epoch_end and epoch in config.train.eval_epochs:
          try:
            report = evaluator.run(nnx.merge(graphdef, state.params, state.model_state))
          except BaseException:
            # The step is trained: keep it (without an mAP) whatever stopped the evaluation.
            checkpointing.save(manager, done, state, dict(meta, epoch=epoch))
            checkpointing.wait_until_finished(manager)
            raise
          evaluated = {"mAP": report.selection_map}  # the best checkpoint's measure
          writer.write(done, report.scalars(), kind="eval")
          pictures = evaluator.pictures(report) if is_main else {}
          writer.write_images(done, pictures)
          if last:
            final_report, final_pictures = report, pictures
        if (
          (epoch_end and epoch % config.train.checkpoint_every_epochs == 0)
          or evaluated
          or last
          or stop.set
        ):
          checkpointing.save(manager, done, state, dict(meta, epoch=epoch), metrics=evaluated)
        if stop.set and not last:
          checkpointing.wait_until_finished(manager)  # closed on the way out, below
          writer.close()
          stop.exit_if_set(f"saved step {done}")
    # Signals stay flags until the final checkpoint is committed.
    checkpointing.wait_until_finished(manager)
  except BaseException:
    checkpointing.close_quietly(manager)
    raise
  manager.close()  # its threads would outlive the call (in a notebook, say)
  if stop.set:
    writer.close()
    stop.exit_if_set(f"saved the final step {total_steps}")

  # Final evaluation (reused when the last epoch was evaluated), results and pictures.
  # From here on a signal ends the evaluation at once: the checkpoint is complete.
  stop.stop_at_once(
    f"the final evaluation was stopped; the final checkpoint (step "
    f"{total_steps}) is saved in {workdir}; finish the evaluation with: "
    f"{eval_command}"
  )
  report, pictures = final_report, final_pictures
  if report is None:
    report = evaluator.run(nnx.merge(graphdef, state.params, state.model_state))
    writer.write(total_steps, report.scalars(), kind="eval")
    pictures = evaluator.pictures(report) if is_main else {}
    writer.write_images(total_steps, pictures)
  writer.close()
  results = dict(report.results, step=int(total_steps), config=config.to_dict())
  evaluator_lib.write_report(workdir, results, pictures)
  return results


def _check_resumable(
  manager,
  step: int,
  meta: dict[str, Any],
  config: ml_collections.ConfigDict,
  *,
  total_steps: int,
  steps_per_epoch: int,
  workdir: str,
) -> None:
  """Refuses checkpoint ``step`` of another run or of a longer schedule."""
  try:
    saved = checkpointing.restore_meta(manager, step)
    checkpointing.check_compatible(saved, meta, workdir)
    if step > total_steps:
      # The loop would not run, and the results would carry this config's
      # schedule for a model that trained longer.
      if 0 < config.train.max_steps < config.train.epochs * steps_per_epoch:
        limit, fix = (
          f"config.train.max_steps={config.train.max_steps}",
          f"config.train.max_steps to at least {step}",
        )
      else:
        limit = f"config.train.epochs={config.train.epochs} x {steps_per_epoch} steps per epoch"
        fix = f"config.train.epochs to at least {-(-step // steps_per_epoch)}"
      raise ValueError(
        f"{workdir}/checkpoints holds step {step}, past this config's last step "
        f"{total_steps} ({limit}); nothing was changed. To continue that run, set {fix}; "
        "to score its checkpoint, use --mode eval; to train with these settings, use "
        "another --workdir."
      )
  except Exception:
    manager.close()  # its threads would outlive the refusal (in a notebook, say)
    raise


def _reduce_window(window: list[dict[str, Any]], first_step: int) -> dict[str, float]:
  """Means of the window's metrics; a non-finite loss names its step."""
  host = jax.device_get(window)
  losses_ = np.array([m["loss"] for m in host], np.float64)
  bad = np.flatnonzero(~np.isfinite(losses_))
  if bad.size:
    raise NonFiniteLossError(
      f"the loss became {losses_[bad[0]]} at step {first_step + int(bad[0]) + 1}; "
      "training stopped, the last checkpoint before it is kept."
    )
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}
