"""Training and evaluation of APNet: the project's main job.

``train_and_evaluate(config, workdir)`` reads top to bottom: set up the mesh
and the workdir, open (or prepare) the dataset, build the model, optimizer and
train state, resume from the latest checkpoint, run the jitted step, log,
checkpoint and evaluate, then write ``results.json``. ``run.py`` and
notebooks call the same functions.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import jax
import ml_collections
import numpy as np
import PIL.Image
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from apnet_jax import checkpointing, config_check, optim, progress, train_step
from apnet_jax import workdir as workdir_lib
from apnet_jax.data import pipeline, prepare, sources
from apnet_jax.evaluation import evaluate, plots
from apnet_jax.evaluation.features import extract_features
from apnet_jax.metric_writers import MetricWriter
from apnet_jax.models import build_model
from apnet_jax.weights import detect_layout, load_torch_weights, read_state_dict


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the step."""


# Errors whose message alone tells the user what happened and what to do: a
# command line ends with it, without a traceback (run.py).
USER_ERRORS = (NonFiniteLossError, checkpointing.CheckpointReadError,
               checkpointing.CheckpointSaveError, workdir_lib.WorkdirBusyError)


def exit_with_error(error: BaseException) -> NoReturn:
  """Ends the process with status 1 and ``error`` (one of `USER_ERRORS`) as its last line.

  Orbax's and TensorStore's threads go on printing tracebacks of their own
  until the interpreter is gone, hundreds of lines that bury the error: they
  are silenced, the error is printed last, and the process ends at once (log
  files are line-buffered or flushed, so nothing written is lost).
  """
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  stderr = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  # On a line of its own: a thread may have been cut off mid-line.
  os.write(stderr, f"\n{type(error).__name__}: {error}\n".encode())
  os._exit(1)


# --- Data --------------------------------------------------------------------


def open_dataset(data_config: ml_collections.ConfigDict):
  """The dataset's TFDS builder, prepared first when it is not yet built.

  A dataset is prepared here when ``data.manual_dir`` is set (or needs no
  download, like ``synthetic_reid``); otherwise a missing dataset is an
  error that says how to prepare it. With several JAX processes, process 0
  opens (or prepares) it first and the others open it after: one writer for a
  shared ``data.data_dir``.
  """
  builder = _on_process_0_first(lambda: _open_or_prepare(data_config),
                                f"{data_config.name}: process 0 could not open the dataset")
  if jax.process_index() != 0:
    data_dir = os.path.expanduser(data_config.data_dir)
    builder = sources.get_builder(data_config.name, data_dir=data_dir,
                                  config=data_config.config or None)
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"{data_config.name}: process 0 has it, but process {jax.process_index()} finds "
          f"nothing in {data_dir}. Give all processes one shared --config.data.data_dir, or "
          "run --mode prepare on every host first.")
  return builder


def _on_process_0_first(fn: Callable[[], Any], failed: str) -> Any:
  """``fn()`` on process 0 alone (its result there, None elsewhere); every process waits.

  The barrier carries process 0's error, so that no process waits for what
  will not come: the others raise ``failed`` with its text.
  """
  if jax.process_count() == 1:
    return fn()
  failure, result = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except  (re-raised below)
      failure = e
  text = f"{type(failure).__name__}: {failure}" if failure is not None else ""
  sent = np.frombuffer(text.encode()[:_ERROR_BYTES].ljust(_ERROR_BYTES, b"\0"), np.uint8)
  received = bytes(np.asarray(multihost_utils.broadcast_one_to_all(sent))).rstrip(b"\0")
  if failure is not None:
    raise failure
  if received:
    raise RuntimeError(f"{failed}: {received.decode(errors='replace')}")
  return result


_ERROR_BYTES = 4096  # of process 0's error message, sent to the other processes


def _open_or_prepare(data_config: ml_collections.ConfigDict):
  data_dir = os.path.expanduser(data_config.data_dir)
  builder = sources.get_builder(data_config.name, data_dir=data_dir,
                                config=data_config.config or None)
  if builder.is_prepared():
    if data_config.manual_dir:
      prepare.check_same_source(builder, data_config.manual_dir)
    return builder
  if not builder.MANUAL_DOWNLOAD_INSTRUCTIONS or data_config.manual_dir:
    return prepare_dataset(data_config)
  raise FileNotFoundError(
      f"{data_config.name} is not prepared in {data_dir}. Download it as "
      f"apnet_jax/datasets/{data_config.name}/README.md says and run with "
      f"--config.data.manual_dir=<the folder holding it> (once; it is then kept in "
      f"{data_dir}).")


def prepare_dataset(data_config: ml_collections.ConfigDict):
  """Builds the dataset (a no-op when built) and prints its statistics table."""
  return prepare.prepare(data_config.name, manual_dir=data_config.manual_dir or None,
                         data_dir=os.path.expanduser(data_config.data_dir),
                         config=data_config.config or None)


# --- Model ---------------------------------------------------------------------


def init_from_imagenet(model: nnx.Module, path: str) -> None:
  """Loads torchvision's ImageNet ResNet into the backbone; refuses partial loads."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"model.init_from: {path} does not exist. The official recipe starts from "
        "torchvision's ImageNet ResNet-50, resnet50-19c8e357.pth "
        "(https://download.pytorch.org/models/resnet50-19c8e357.pth); put it there, "
        "point --config.model.init_from at it, or set it to '' to train from scratch.")
  state = read_state_dict(path)
  if detect_layout(state) != "torchvision":
    raise ValueError(f"model.init_from: {path} is a whole official APNet checkpoint, not an "
                     "ImageNet backbone; evaluate it with --config.eval.torch_checkpoint.")
  try:
    report = load_torch_weights(model, state)
  except ValueError as e:  # it names the keys; add the file
    raise ValueError(f"model.init_from: {path}: {e}") from e
  if report.missing:
    raise ValueError(f"model.init_from: {path} lacks backbone keys: {report.missing[:5]}")
  logging.info("Loaded %d ImageNet tensors from %s", len(report.loaded), path)


# --- Evaluation ------------------------------------------------------------------


def extract_eval_features(model: nnx.Module, builder, config: ml_collections.ConfigDict, *,
                          mesh: jax.sharding.Mesh | None = None) -> dict[str, dict[str, Any]]:
  """Query and gallery features (image + flip, summed), pids and camids."""
  features = {}
  for split in ("query", "gallery"):
    features[split] = extract_features(
        model, sources.load_split(builder, split), eval_feature=config.model.eval_feature,
        input_size=tuple(config.model.input_size), batch_size=config.eval.batch_size,
        mesh=mesh, num_workers=config.data.num_workers, desc=split)
    features[split]["index"] = np.arange(len(features[split]["pid"]))
  if config.eval.drop_distractors:
    keep = features["gallery"]["pid"] != 0
    features["gallery"] = {k: v[keep] for k, v in features["gallery"].items()}
  return features


def evaluate_features(features: dict[str, dict[str, Any]], builder,
                      config: ml_collections.ConfigDict) -> dict[str, Any]:
  """CMC, mAP and mINP of extracted features, with the protocol used.

  Returns a results dict: ``R1``, ``R5``, ``R10``, ``mAP``, ``mINP`` (in
  percent), ``cmc``, ``num_valid_queries``, the protocol, and the same under
  ``rerank`` when ``eval.rerank`` is set.
  """
  query, gallery = features["query"], features["gallery"]
  args = (query["features"], gallery["features"], query["pid"], gallery["pid"],
          query["camid"], gallery["camid"])
  results = _summary(evaluate(*args, max_rank=config.eval.max_rank))
  if config.eval.rerank:
    rerank = dict(k1=config.eval.rerank_k1, k2=config.eval.rerank_k2,
                  lambda_value=config.eval.rerank_lambda)
    results["rerank"] = _summary(evaluate(*args, max_rank=config.eval.max_rank, rerank=rerank))
  results["protocol"] = {
      "dataset": prepare.dataset_key(builder),
      "distractors": "dropped" if config.eval.drop_distractors else "kept (standard)",
      "eval_feature": config.model.eval_feature,
      "flip": "image + horizontal flip, summed, L2-normalized",
      "num_query": int(len(query["pid"])), "num_gallery": int(len(gallery["pid"])),
  }
  return results


def report_pictures(results: dict[str, Any], features: dict[str, dict[str, Any]], builder, *,
                    num_queries: int = 8) -> dict[str, np.ndarray]:
  """An evaluation's pictures, uint8 (H, W, 3): ``cmc`` and ``ranked_list``.

  The CMC curve (re-ranked too when asked), and ``num_queries`` queries spread
  over the query split beside their top 10 (true matches framed green).
  """
  curves = {"APNet": results["cmc"]}
  if "rerank" in results:
    curves["re-ranked"] = results["rerank"]["cmc"]
  query, gallery = features["query"], features["gallery"]
  picked = np.linspace(0, len(query["pid"]) - 1, min(num_queries, len(query["pid"]))).astype(int)
  order, matches = plots.ranked_lists(
      query["features"][picked], gallery["features"], query["pid"][picked], gallery["pid"],
      query["camid"][picked], gallery["camid"], top=min(10, len(gallery["pid"])))
  query_source = sources.load_split(builder, "query")
  gallery_source = sources.load_split(builder, "gallery")
  return {
      "cmc": plots.plot_cmc(curves, title=results["protocol"]["dataset"]),
      "ranked_list": plots.plot_ranked_lists(
          [plots.decode(query_source[int(query["index"][i])]["image"]) for i in picked],
          [[plots.decode(gallery_source[int(gallery["index"][j])]["image"]) for j in row]
           for row in order],
          matches, query_labels=[f"pid {query['pid'][i]}" for i in picked]),
  }


def write_report(workdir: str, results: dict[str, Any], pictures: dict[str, np.ndarray]) -> None:
  """Prints the table; writes results.json and ``<name>.png`` of each picture (process 0).

  Each file is written beside its place and renamed into it when complete.
  """
  if jax.process_index() != 0:
    return
  print(format_results(results))
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.replace_file(os.path.join(workdir, "results.json")) as path:
    with open(path, "w") as f:
      json.dump(results, f, indent=2, default=str)
  for name, picture in pictures.items():
    with workdir_lib.replace_file(os.path.join(workdir, f"{name}.png")) as path:
      PIL.Image.fromarray(picture).save(path)


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
  cmc = np.asarray(metrics["cmc"])
  out = {f"R{k}": 100 * float(cmc[k - 1]) for k in (1, 5, 10) if k <= len(cmc)}
  out.update(mAP=100 * float(metrics["mAP"]), mINP=100 * float(metrics["mINP"]),
             num_valid_queries=int(metrics["num_valid_queries"]), cmc=cmc.tolist())
  return out


def format_results(results: dict[str, Any]) -> str:
  """A small table of R1, R5, R10, mAP and mINP (and re-ranked, if any)."""
  names = ("R1", "R5", "R10", "mAP", "mINP")
  rows = [("", results)] + ([("re-ranked", results["rerank"])] if "rerank" in results else [])
  lines = [f"{'':<11}" + "".join(f"{n:>8}" for n in names)]
  for title, r in rows:
    lines.append(f"{title:<11}" + "".join(f"{r[n]:>8.2f}" for n in names if n in r))
  return "\n".join(lines)


# --- Training --------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict, mode: str) -> None:
  """Refuses every key ``mode`` uses that is out of range, before anything is run or written.

  Raises:
    config_check.ConfigError: naming each bad key, its value and what is allowed.
  """
  config_check.check(config, mode, num_devices=jax.device_count(),
                     datasets=tuple(sources.BUILDERS))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       eval_command: str | None = None) -> dict[str, Any]:
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
  check_config(config, "train")
  workdir = workdir_lib.ensure_workdir(workdir)
  if eval_command is None:
    eval_command = f"python run.py --config CONFIG --workdir {workdir} --mode eval"
  with _StopSignals() as stop:
    held = _on_process_0_first(lambda: workdir_lib.WorkdirLock.acquire(workdir, "training"),
                               f"{workdir}: process 0 could not take the workdir")
    try:
      return _train_and_evaluate_locked(config, workdir, stop, eval_command)
    finally:
      if held is not None:
        held.release()


def _train_and_evaluate_locked(config: ml_collections.ConfigDict, workdir: str,
                               stop: _StopSignals, eval_command: str) -> dict[str, Any]:
  """`train_and_evaluate` once the workdir (absolute, existing) is this run's."""
  # Setup: resolved config, mesh.
  is_main = jax.process_index() == 0
  logging.info("Config:\n%s", config)
  mesh = train_step.make_mesh()

  # Data: the train split's size, in identities and steps.
  builder = open_dataset(config.data)
  stop.exit_if_set("nothing trained yet")
  train_labels = sources.split_annotations(builder, "train").label
  num_classes = int(len(np.unique(train_labels)))
  steps_per_epoch = pipeline.steps_per_epoch(train_labels, p=config.data.p, k=config.data.k)
  total_steps = config.train.epochs * steps_per_epoch
  if config.train.max_steps > 0:
    total_steps = min(total_steps, config.train.max_steps)

  # The latest checkpoint, if any: its record is checked before any compute.
  meta = {"seed": config.train.seed, "num_classes": num_classes,
          "model": config.model.to_dict(), "data": config.data.to_dict()}
  # Looked at read-only: a refused workdir is left exactly as it was.
  manager = checkpointing.make_manager(workdir, keep_best=config.train.keep_best,
                                       read_only=True)
  start_step = manager.latest_step() or 0
  if start_step:
    _check_resumable(manager, start_step, meta, config, total_steps=total_steps,
                     steps_per_epoch=steps_per_epoch, workdir=workdir)
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
        sources.load_split(builder, "train"), train_labels, p=config.data.p, k=config.data.k,
        height=config.model.input_size[0], width=config.model.input_size[1],
        seed=config.train.seed, start_step=start_step, num_workers=config.data.num_workers)
    model = build_model(config.model, num_classes, rngs=nnx.Rngs(config.train.seed))
    if config.model.init_from:
      init_from_imagenet(model, config.model.init_from)
    tx, _ = optim.make_optimizer(config, steps_per_epoch)
    graphdef, state = train_step.create_train_state(model, tx)
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    if start_step:
      state, _ = checkpointing.restore(manager, start_step, state)
      logging.info("Resumed from step %d", start_step)
    if is_main:  # after the checks above: never overwrite another run's record
      workdir_lib.record_changes(workdir, recipe_changes, step=start_step)
      with workdir_lib.replace_file(os.path.join(workdir, workdir_lib.CONFIG_FILE)) as path:
        with open(path, "w") as f:
          f.write(config.to_json_best_effort(indent=2))

    # The loop. Device metrics are fetched only at logging steps.
    step_fn = train_step.make_train_step(graphdef, tx, num_classes=num_classes, config=config,
                                         mesh=mesh, seed=config.train.seed)
    writer = MetricWriter(workdir, enabled=is_main, resume_step=start_step)
    results: dict[str, Any] | None = None
    # Set when the last step was an evaluation epoch: the final report reuses them.
    final_features = final_pictures = None
    window, window_start, tick = [], start_step, time.time()
    with progress.bar(total_steps, "train", "step", initial=start_step) as bar:
      for step in range(start_step, total_steps):
        batch = next(loader)
        state, metrics = step_fn(state, train_step.shard_batch(
            {"image": batch["image"], "label": batch["label"]}, mesh))
        window.append(metrics)
        done = step + 1
        stop.poll(done)
        epoch_end = done % steps_per_epoch == 0
        epoch = done // steps_per_epoch
        last = done == total_steps
        if done % config.train.log_every_steps == 0 or epoch_end or last or stop.set:
          record = _reduce_window(window, window_start)
          record.update(epoch=done / steps_per_epoch,
                        img_per_s=len(window) * config.data.p * config.data.k
                        / max(time.time() - tick, 1e-9))
          writer.write(done, record)
          # Updated only here, after the sync: dispatch runs ahead of the device.
          bar.update(done - bar.n)
          bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.2f}")
          window, window_start, tick = [], done, time.time()

        evaluated = None
        if epoch_end and epoch in config.train.eval_epochs:
          try:
            features = extract_eval_features(nnx.merge(graphdef, state.params, state.model_state),
                                             builder, config, mesh=mesh)
            results = evaluate_features(features, builder, config)
          except BaseException:
            # The step is trained: keep it (without an mAP) whatever stopped the evaluation.
            checkpointing.save(manager, done, state, dict(meta, epoch=epoch))
            checkpointing.wait_until_finished(manager)
            raise
          evaluated = {"mAP": results["mAP"]}
          writer.write(done, {k: results[k] for k in ("R1", "R5", "R10", "mAP", "mINP")},
                       kind="eval")
          pictures = report_pictures(results, features, builder) if is_main else {}
          writer.write_images(done, pictures)
          if last:
            final_features, final_pictures = features, pictures
        if ((epoch_end and epoch % config.train.checkpoint_every_epochs == 0) or evaluated
            or last or stop.set):
          checkpointing.save(manager, done, state, dict(meta, epoch=epoch),
                             metrics=evaluated)
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
  stop.stop_at_once(f"the final evaluation was stopped; the final checkpoint (step "
                    f"{total_steps}) is saved in {workdir}; finish the evaluation with: "
                    f"{eval_command}")
  features, pictures = final_features, final_pictures
  if features is None:
    features = extract_eval_features(nnx.merge(graphdef, state.params, state.model_state), builder,
                                     config, mesh=mesh)
    results = evaluate_features(features, builder, config)
    writer.write(total_steps, {k: results[k] for k in ("R1", "R5", "R10", "mAP", "mINP")},
                 kind="eval")
    pictures = report_pictures(results, features, builder) if is_main else {}
    writer.write_images(total_steps, pictures)
  writer.close()
  results.update(step=int(total_steps), config=config.to_dict())
  write_report(workdir, results, pictures)
  return results


def _check_resumable(manager, step: int, meta: dict[str, Any],
                     config: ml_collections.ConfigDict, *, total_steps: int,
                     steps_per_epoch: int, workdir: str) -> None:
  """Refuses checkpoint ``step`` of another run or of a longer schedule."""
  try:
    saved = checkpointing.restore_meta(manager, step)
    checkpointing.check_compatible(saved, meta, workdir)
    if step > total_steps:
      # The loop would not run, and the results would carry this config's
      # schedule for a model that trained longer.
      if 0 < config.train.max_steps < config.train.epochs * steps_per_epoch:
        limit, fix = (f"config.train.max_steps={config.train.max_steps}",
                      f"config.train.max_steps to at least {step}")
      else:
        limit = (f"config.train.epochs={config.train.epochs} x {steps_per_epoch} steps per "
                 "epoch")
        fix = f"config.train.epochs to at least {-(-step // steps_per_epoch)}"
      raise ValueError(
          f"{workdir}/checkpoints holds step {step}, past this config's last step "
          f"{total_steps} ({limit}); nothing was changed. To continue that run, set {fix}; "
          "to score its checkpoint, use --mode eval; to train with these settings, use "
          "another --workdir.")
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
        "training stopped, the last checkpoint before it is kept.")
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


class _StopSignals:
  """SIGTERM and SIGINT as a flag the loop checks after each step (a context manager).

  Installed before anything compiles: a KeyboardInterrupt raised while XLA
  compiles can crash the process, a flag cannot. The first signal sets the flag
  and gives that signal its default action back, so that a second one (Ctrl-C
  twice) ends the process at once; Orbax commits a checkpoint by renaming it
  whole, so the last committed one stays intact. After `stop_at_once`, a signal
  ends the process with a message instead of setting the flag.

  With several processes, JAX's preemption service takes SIGTERM instead (a
  Python handler would hide it from the service) and names one step at which
  every process sees the flag, so that all save that step together; SIGINT is
  left alone there, as one process alone cannot stop them all at one step. On
  exit the previous handlers are back: after training returns (in a notebook,
  say), a signal must not just set a flag that nothing reads.
  """

  EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}

  def __init__(self):
    self.signum: int | None = None
    self._multihost = jax.process_count() > 1
    self._previous: dict[int, Any] = {}
    self._message: str | None = None

  @property
  def set(self) -> bool:
    return self.signum is not None

  def __enter__(self) -> _StopSignals:
    if not self._multihost:
      try:
        for signum in self.EXIT_CODES:
          self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread (e.g. some notebook kernels)
        pass
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      # None: a handler set outside Python, which cannot be put back; the default is closest.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}

  def poll(self, step: int) -> None:
    """Every process calls this after each step, from the same first step."""
    if self._multihost and multihost_utils.reached_preemption_sync_point(step):
      self.signum = signal.SIGTERM

  def exit_if_set(self, what_was_done: str) -> None:
    """Ends the process (SystemExit 143 or 130) if a signal came; logs what was done."""
    if self.set:
      logging.warning("%s: %s; stopped.", signal.Signals(self.signum).name, what_was_done)
      raise SystemExit(self.EXIT_CODES[self.signum])

  def stop_at_once(self, message: str) -> None:
    """From now on a signal ends the process with ``message`` (one line, on stderr)."""
    self._message = message
    if self.set:  # it came between the last check and now
      self._stop(self.signum)

  def _handle(self, signum, frame):
    del frame
    if self.signum is None:
      self.signum = signum
    if signum in self._previous:
      signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    if self._message is not None:
      self._stop(signum)

  def _stop(self, signum: int) -> None:
    print(f"{signal.Signals(signum).name}: {self._message}", file=sys.stderr, flush=True)
    raise SystemExit(self.EXIT_CODES[signum])


# --- Evaluating a finished (or running) training ------------------------------


def num_train_ids(data_config: ml_collections.ConfigDict) -> int:
  """Train identities: from the prepared dataset, else its published statistics."""
  builder = sources.get_builder(data_config.name, data_dir=os.path.expanduser(
      data_config.data_dir), config=data_config.config or None)
  if builder.is_prepared():
    return int(len(np.unique(sources.split_annotations(builder, "train").label)))
  known = prepare.STANDARD_STATISTICS.get(prepare.dataset_key(builder))
  if known is not None:
    return known["train"].ids
  return int(builder.builder_config.num_train_ids)


def restore_model(config: ml_collections.ConfigDict, workdir: str) -> tuple[nnx.Module, dict]:
  """The model to evaluate, export or run, and where it came from.

  ``eval.torch_checkpoint`` (an official PyTorch checkpoint) if set; else the
  Orbax checkpoint of ``workdir`` at ``eval.step``, or the best by mAP when
  ``eval.use_best``, or the latest. The model is in eval mode. A checkpoint
  is checked only on what evaluation depends on (`checkpointing.EVAL_KEYS`).
  """
  if config.eval.torch_checkpoint:
    path = config.eval.torch_checkpoint
    state_dict = read_state_dict(os.path.expanduser(path))
    if "classifier.weight" not in state_dict:
      raise ValueError(f"eval.torch_checkpoint: {path} has no classifier.weight; is it an "
                       "official APNet checkpoint?")
    num_classes = state_dict["classifier.weight"].shape[0]
    # Abstract: a complete checkpoint fills every variable (checked below).
    model = nnx.eval_shape(lambda: build_model(config.model, num_classes, rngs=nnx.Rngs(0)))
    try:
      report = load_torch_weights(model, state_dict)
    except ValueError as e:  # it names the keys; add the file
      raise ValueError(f"eval.torch_checkpoint: {path}: {e}") from e
    if report.layout != "official" or report.missing:
      raise ValueError(f"eval.torch_checkpoint: {path} is not a complete official APNet "
                       f"checkpoint for this model; missing: {report.missing[:5]}")
    if report.unexpected:
      # Weights left out would score another model than the checkpoint's
      # (a level-2 checkpoint under model.level=1 loses its finer split).
      raise ValueError(
          f"eval.torch_checkpoint: {path} holds {len(report.unexpected)} weights this model "
          f"does not use, e.g. {report.unexpected[:5]}; check that model.level "
          f"({config.model.level}) and model.kind ({config.model.kind!r}) are the "
          "checkpoint's.")
    source = {"torch_checkpoint": os.path.abspath(config.eval.torch_checkpoint)}
  else:
    manager = checkpointing.make_manager(workdir, keep_best=config.train.keep_best,
                                         read_only=True)  # the run may still be training
    try:
      model, step = _restore_checkpoint(manager, config, workdir)
    finally:
      manager.close()
    source = {"checkpoint_step": int(step)}
  model.eval()
  return model, source


def _restore_checkpoint(manager, config: ml_collections.ConfigDict,
                        workdir: str) -> tuple[nnx.Module, int]:
  """The model of the checkpoint ``config.eval`` picks, and its step."""
  if config.eval.step >= 0:
    step = config.eval.step
  elif config.eval.use_best:
    step = checkpointing.best_step(manager)
    if step is None and manager.all_steps():
      steps = list(manager.all_steps())
      raise FileNotFoundError(
          f"config.eval.use_best: no checkpoint in {workdir}/checkpoints was evaluated during "
          f"training (kept steps {steps} carry no mAP), so none is best. Evaluate the latest "
          f"(step {max(steps)}) by leaving eval.use_best unset, or pick one with "
          "--config.eval.step=N.")
  else:
    step = manager.latest_step()
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f"{workdir}/checkpoints has no checkpoint "
                            f"{'at step ' + str(step) if step is not None else 'to evaluate'}"
                            f" (it has: {list(manager.all_steps())}).")
  meta = checkpointing.restore_meta(manager, step)
  checkpointing.check_compatible(meta, dict(meta, model=config.model.to_dict(),
                                            data=config.data.to_dict()), workdir,
                                 keys=checkpointing.EVAL_KEYS)
  tx, _ = optim.make_optimizer(config, 1)
  # An abstract train state as the restore target: the checkpoint fills every array.
  graphdef, state = nnx.eval_shape(lambda: train_step.create_train_state(
      build_model(config.model, meta["num_classes"], rngs=nnx.Rngs(0)), tx))
  on_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device),
                       state)
  state, _ = checkpointing.restore(manager, step, state)
  return nnx.merge(graphdef, state.params, state.model_state), step


EVAL_FOLDER = "eval"  # --mode eval's report while a training holds the workdir


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """``--mode eval``: evaluates a checkpoint (see `restore_model`); writes the report.

  Writes nothing a training writes while one holds ``workdir``: the report
  (``results.json``, ``cmc.png``, ``ranked_list.png``) goes into ``workdir``
  itself when no training holds it (eval holds the lock while writing), and
  into ``workdir/eval/`` otherwise, a folder replaced whole at each evaluation.
  """
  check_config(config, "eval")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  mesh = train_step.make_mesh()
  builder = open_dataset(config.data)
  model, source = restore_model(config, workdir)
  features = extract_eval_features(model, builder, config, mesh=mesh)
  results = evaluate_features(features, builder, config)
  results.update(source, config=config.to_dict())
  if jax.process_index() != 0:
    return results
  pictures = report_pictures(results, features, builder)
  workdir = workdir_lib.ensure_workdir(workdir)  # new when evaluating eval.torch_checkpoint
  try:
    held = workdir_lib.WorkdirLock.acquire(workdir, "evaluation")
  except workdir_lib.WorkdirBusyError as e:
    with workdir_lib.replace_folder(os.path.join(workdir, EVAL_FOLDER)) as folder:
      write_report(folder, results, pictures)
    print(f"{workdir} is in use ({e.holder}): the report went to {workdir}/{EVAL_FOLDER}/, "
          "not beside the training's files.")
  else:
    with held:
      write_report(workdir, results, pictures)
  return results
