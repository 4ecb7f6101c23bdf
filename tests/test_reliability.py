"""A run survives being killed: determinism, exact resume, kills inside a save, a full disk,
a damaged checkpoint; checkpoints of earlier layouts still restore.

The training runs are real `run.py` processes on the tiny synthetic config at
128x64 (8 steps, a checkpoint every 2). They share the suite's XLA
compilation cache (tests/conftest.py), so only the first run compiles; every
run is still its own process, with its own Python hash seed, data loader and
restored state.
"""

import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from apnet_jax import checkpointing, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8  # 4 epochs of 2 steps; a checkpoint at the end of each epoch
TIMEOUT = 300  # seconds for one process; a hang fails instead of stalling CI
TMP = ".orbax-checkpoint-tmp"

# Run as `python -c KILL_IN_SAVE run.py-args`: run.py, except that the process
# SIGKILLs itself when Orbax is about to commit checkpoint KILL_IN_SAVE_OF_STEP
# (its data is written into <step>.orbax-checkpoint-tmp, not yet renamed).
KILL_IN_SAVE = """
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity

commit = atomicity.AtomicRenameTemporaryPath.finalize

async def commit_or_die(self):
  if self.get_final().name == os.environ["KILL_IN_SAVE_OF_STEP"]:
    os.kill(os.getpid(), signal.SIGKILL)
  return await commit(self)

atomicity.AtomicRenameTemporaryPath.finalize = commit_or_die
sys.argv = ["run.py"] + sys.argv[1:]
runpy.run_path("run.py", run_name="__main__")
"""


class Runner:
  """Starts `run.py` training processes in workdirs under one folder."""

  def __init__(self, root, data_dir):
    self.root = root
    self.data_dir = data_dir
    self.env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")

  def start(self, workdir, *, kill_in_save_of_step=None):
    args = [
      "run.py",
      "--config",
      "configs/synthetic.py:tiny",
      "--workdir",
      str(workdir),
      f"--config.data.data_dir={self.data_dir}",
      "--config.model.input_size=(128,64)",
      f"--config.train.epochs={STEPS // 2}",
      "--config.train.eval_epochs=()",
      "--config.train.log_every_steps=1",
    ]
    env = self.env
    if kill_in_save_of_step is not None:
      args = ["-c", KILL_IN_SAVE] + args[1:]
      env = dict(env, KILL_IN_SAVE_OF_STEP=str(kill_in_save_of_step))
    with open(log_path(workdir), "ab") as log:  # a file, not a pipe: a pipe could fill up
      return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
      )

  def finish(self, process, workdir, *, returncode=0):
    try:
      process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
    assert process.returncode == returncode, output_tail(workdir)

  def train(self, workdir):
    self.finish(self.start(workdir), workdir)
    return workdir


def log_path(workdir):
  return workdir.parent / f"{workdir.name}.log"


def output_tail(workdir):
  return log_path(workdir).read_bytes()[-3000:].decode(errors="replace")


def train_steps(workdir):
  """The steps in metrics.jsonl's train records, in order (a half-written last line skipped)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  steps = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if record["kind"] == "train":
      steps.append(record["step"])
  return steps


def finished_checkpoints(workdir):
  folder = workdir / "checkpoints"
  if not folder.exists():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def folder_digest(folder):
  """{relative path: sha256} of every file under ``folder``."""
  return {
    str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  }


def final_state(workdir):
  """Every leaf of the saved train state at the last step."""
  manager = checkpointing.make_manager(str(workdir), keep_best=1, read_only=True)
  assert manager.latest_step() == STEPS
  state = manager.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return {k: np.asarray(v) for k, v in ocp.tree.to_flat_dict(state["state"]).items()}


def assert_bitwise_equal(leaves_a, leaves_b):
  assert leaves_a.keys() == leaves_b.keys() and len(leaves_a) > 100
  for key in leaves_a:
    np.testing.assert_array_equal(leaves_a[key], leaves_b[key], err_msg=str(key), strict=True)


@pytest.fixture(scope="module")
def runner(tmp_path_factory, tiny_data_dir):
  return Runner(tmp_path_factory.mktemp("reliability"), tiny_data_dir)


@pytest.fixture(scope="module")
def uninterrupted(runner):
  """The reference: 8 steps in one process."""
  return final_state(runner.train(runner.root / "uninterrupted"))


@pytest.mark.slow
def test_same_seed_and_devices_give_bitwise_identical_runs(runner, uninterrupted):
  again = final_state(runner.train(runner.root / "again"))
  assert int(again[("step",)]) == STEPS
  assert_bitwise_equal(uninterrupted, again)


@pytest.fixture(scope="module")
def interrupted(runner):
  """One workdir killed twice, then finished.

  1. SIGKILL at a random point: after a seeded random step (3-5) is logged
     and at least one checkpoint is finished, whatever the process is doing.
  2. Restarted; the process kills itself while its first checkpoint is being
     saved asynchronously (written, not yet committed).
  3. Restarted; runs to the end.
  """
  workdir = runner.root / "interrupted"
  record = {"kill_after_step": random.Random(8).randint(3, 5)}

  process = runner.start(workdir)
  deadline = time.time() + TIMEOUT
  try:
    while not (
      train_steps(workdir)
      and train_steps(workdir)[-1] >= record["kill_after_step"]
      and finished_checkpoints(workdir)
    ):
      assert process.poll() is None, output_tail(workdir)
      assert time.time() < deadline, output_tail(workdir)
      time.sleep(0.05)
  finally:  # on a failed wait too: no training process may outlive the test
    process.send_signal(signal.SIGKILL)
  runner.finish(process, workdir, returncode=-signal.SIGKILL)
  record["after_sigkill"] = finished_checkpoints(workdir)
  previous = record["after_sigkill"][-1]
  assert previous < STEPS, "the run finished before it was killed"
  record["previous"] = previous
  record["previous_digest"] = folder_digest(workdir / "checkpoints" / str(previous))

  record["killed_save"] = killed = previous + 2
  runner.finish(
    runner.start(workdir, kill_in_save_of_step=killed), workdir, returncode=-signal.SIGKILL
  )
  record["after_kill_in_save"] = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  record["after_kill_in_save_digest"] = folder_digest(workdir / "checkpoints" / str(previous))
  reader = checkpointing.make_manager(str(workdir), keep_best=1, read_only=True)
  record["steps_seen_after_kill_in_save"] = list(reader.all_steps())
  record["meta_after_kill_in_save"] = checkpointing.restore_meta(reader, previous)

  runner.train(workdir)
  record["steps_at_end"] = train_steps(workdir)
  # Each resume moved the killed runs' steps past the checkpoint aside.
  record["set_aside"] = train_steps(workdir / f"discarded_after_step_{previous}")
  record["at_end"] = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  return workdir, record


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_restart_ends_bitwise_identical(uninterrupted, interrupted):
  workdir, record = interrupted
  assert record["after_sigkill"], record  # it was killed after a checkpoint existed
  # The log holds each step once: the last run resumed at previous + 1.
  assert record["steps_at_end"] == list(range(1, STEPS + 1)), record
  assert record["set_aside"] and min(record["set_aside"]) == record["previous"] + 1, record
  assert_bitwise_equal(uninterrupted, final_state(workdir))


def test_kill_inside_an_async_save_keeps_the_previous_checkpoint(interrupted):
  _, record = interrupted
  previous, killed = record["previous"], record["killed_save"]
  # The kill hit the save: its folder was written but never committed.
  assert f"{killed}{TMP}" in record["after_kill_in_save"], record
  assert str(killed) not in record["after_kill_in_save"], record
  # The previous checkpoint is byte for byte what it was, and the only one seen.
  assert record["after_kill_in_save_digest"] == record["previous_digest"]
  assert any(name.startswith("state/") for name in record["previous_digest"])
  assert record["steps_seen_after_kill_in_save"] == [previous]
  assert record["meta_after_kill_in_save"]["epoch"] == previous // 2
  # The restart resumed from it (the killed save's steps set aside) and removed the
  # partial save.
  assert killed in record["set_aside"], record
  assert record["at_end"] == [str(STEPS)], record


# --- A full disk while saving (simulated), checked on the checkpoint functions ----------


@pytest.fixture
def saved_once(tmp_path):
  """A workdir with the user's files and a finished checkpoint at step 2."""
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "notes.txt").write_text("my notes")
  manager = checkpointing.make_manager(str(tmp_path), keep_best=1)
  state = {"w": jnp.arange(16.0).reshape(4, 4), "step": jnp.asarray(2)}
  checkpointing.save(manager, 2, state, {"epoch": 1})
  checkpointing.wait_until_finished(manager)
  return tmp_path, manager, state


def fill_disk_for(monkeypatch, path):
  """Python writes of the file ``path`` fail with ENOSPC."""
  real_open = io.open

  def open_(file, mode="r", *args, **kwargs):
    if str(file) == str(path) and "w" in mode:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr(io, "open", open_)  # pathlib writes
  monkeypatch.setattr("builtins.open", open_)


@pytest.mark.parametrize(
  "file_name",
  [
    # The first write of a save and the last (once all data is written).
    # Both happen in Orbax's background thread: save() returns first.
    f"4{TMP}/_CHECKPOINT_METADATA",
    f"4{TMP}/commit_success.txt",
  ],
)
def test_full_disk_names_the_step_and_folder_and_keeps_the_last_checkpoint(
  saved_once, monkeypatch, file_name
):
  workdir, manager, state = saved_once
  fill_disk_for(monkeypatch, workdir / "checkpoints" / file_name)
  expected = (
    rf"step 4\b.*{re.escape(str(workdir / 'checkpoints'))}.*\[Errno 28\].*\[2\]"
    r".*step 2\b"
  )
  checkpointing.save(manager, 4, state, {"epoch": 2})  # returns; writes go on
  with pytest.raises(checkpointing.CheckpointSaveError, match=expected):
    checkpointing.save(manager, 6, state, {"epoch": 3})  # waits for step 4 first
  monkeypatch.undo()

  assert (workdir / "notes.txt").read_text() == "my notes"
  assert (workdir / "config.json").read_text() == "{}"
  assert (workdir / "checkpoints" / f"4{TMP}").exists()  # left for the next run to delete
  reader = checkpointing.make_manager(str(workdir), keep_best=1, read_only=True)
  assert reader.all_steps() == [2]
  restored, meta = checkpointing.restore(reader, 2, state)
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert meta == {"epoch": 1}


def test_a_state_that_cannot_be_saved_is_not_called_a_disk_problem(saved_once):
  _, manager, state = saved_once
  with pytest.raises(checkpointing.CheckpointSaveError, match=r"step 4\b.*\[2\]\)\.$") as caught:
    checkpointing.save(manager, 4, dict(state, bad=object()), {"epoch": 2})
  assert "rerun" not in str(caught.value) and ".." not in str(caught.value)


def test_saves_between_evaluations_do_not_warn(saved_once):
  """Orbax warns at every save without metrics; our filter keeps that off the terminal."""
  import logging  # pylint: disable=g-import-not-at-top

  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  _, manager, state = saved_once
  seen = []
  handler = logging.Handler()
  handler.emit = lambda record: seen.append(record.getMessage())
  absl = absl_logging.get_absl_logger()
  absl.addHandler(handler)
  try:
    absl.removeFilter(checkpointing.NO_METRICS_FILTER)  # Orbax does warn without it
    checkpointing.save(manager, 4, state, {"epoch": 2})
    assert any("did not provide metrics" in message for message in seen), seen
    seen.clear()
    absl.addFilter(checkpointing.NO_METRICS_FILTER)
    checkpointing.save(manager, 6, state, {"epoch": 3})
    checkpointing.wait_until_finished(manager)
    assert not any("did not provide metrics" in message for message in seen), seen
    checkpointing.save(manager, 8, state, {"epoch": 4}, metrics={"mAP": 0.5})
    checkpointing.wait_until_finished(manager)
  finally:
    absl.removeHandler(handler)
    absl.addFilter(checkpointing.NO_METRICS_FILTER)
  assert manager.all_steps()[-1] == 8


# --- A damaged checkpoint: named, with what to do, and never deleted ------------------------


def _truncate_arrays(folder):
  for p in folder.rglob("*"):
    if p.is_file() and "metadata" not in p.name.lower() and p.name != "commit_success.txt":
      p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGES = {
  "meta_missing": lambda step: shutil.rmtree(step / "meta"),
  "state_missing": lambda step: shutil.rmtree(step / "state"),
  "meta_not_json": lambda step: (step / "meta" / "metadata").write_text("{not json"),
  "arrays_truncated": lambda step: _truncate_arrays(step / "state"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_named_and_kept(tmp_path, damage):
  (tmp_path / "notes.txt").write_text("my notes")
  manager = checkpointing.make_manager(str(tmp_path), keep_best=1)
  state = {"w": jnp.arange(16.0).reshape(4, 4), "step": jnp.asarray(2)}
  checkpointing.save(manager, 2, state, {"epoch": 1}, metrics={"mAP": 0.5})
  checkpointing.save(manager, 4, state, {"epoch": 2})
  checkpointing.wait_until_finished(manager)
  manager.close()
  checkpoints = tmp_path / "checkpoints"
  DAMAGES[damage](checkpoints / "4")
  before = folder_digest(tmp_path)

  # The training manager: the one that may delete (unfinished saves only).
  manager = checkpointing.make_manager(str(tmp_path), keep_best=1)
  folder = re.escape(str(checkpoints / "4"))
  expected = (
    rf"step 4\b.*{folder} \(\w+: .+\).*{folder}.*{re.escape(str(checkpoints))}"
    r".*step 2\b.*\[2\]"
  )
  # restore reads the record and the arrays: every damage is named.
  with pytest.raises(checkpointing.CheckpointReadError, match=expected) as caught:
    checkpointing.restore(manager, 4, state)
  # restore_meta, which a resume calls first, reads the record alone.
  if damage.startswith("meta"):
    with pytest.raises(checkpointing.CheckpointReadError, match=expected):
      checkpointing.restore_meta(manager, 4)
  else:
    assert checkpointing.restore_meta(manager, 4) == {"epoch": 2}
  manager.close()
  assert "tensorstore_spec" not in str(caught.value)  # a screenful of JSON, naming nothing new
  assert folder_digest(tmp_path) == before


def test_a_damaged_only_checkpoint_says_training_starts_over(saved_once):
  workdir, manager, state = saved_once
  shutil.rmtree(workdir / "checkpoints" / "2" / "state")
  with pytest.raises(
    checkpointing.CheckpointReadError, match=r"step 2\b.*KeyError.*\"state\".*step 0\b"
  ):
    checkpointing.restore(manager, 2, state)
  assert (workdir / "checkpoints" / "2" / "meta").exists()
  assert (workdir / "notes.txt").read_text() == "my notes"


def test_only_the_training_manager_removes_unfinished_saves(tmp_path):
  checkpoints = tmp_path / "checkpoints"
  partial = checkpoints / f"6{TMP}" / "state"
  partial.mkdir(parents=True)
  (partial / "chunk").write_bytes(b"half")
  (checkpoints / "README").write_text("the user's")
  # Evaluation may watch a run that is saving right now: it must not touch the folder.
  reader = checkpointing.make_manager(str(tmp_path), keep_best=1, read_only=True)
  assert reader.all_steps() == [] and partial.exists()
  assert not checkpointing.make_manager(
    str(tmp_path / "other"), keep_best=1, read_only=True
  ).all_steps()
  assert not (tmp_path / "other").exists()  # a reader creates nothing
  checkpointing.make_manager(str(tmp_path), keep_best=1)
  deadline = time.time() + 30  # Orbax cleans up in a background thread
  while partial.parent.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert sorted(p.name for p in checkpoints.iterdir()) == ["README"]


def test_a_checkpoint_with_the_old_data_item_still_restores(tmp_path):
  # Checkpoints written before 2026-12-02 also held Grain's iterator state.
  manager = checkpointing.make_manager(str(tmp_path), keep_best=1)
  state = {"w": jnp.arange(4.0)}
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  next(iterator)
  manager.save(
    2,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(iterator),
      meta=ocp.args.JsonSave({"epoch": 1}),
    ),
    force=True,
  )
  manager.wait_until_finished()
  assert (tmp_path / "checkpoints" / "2" / "data").is_dir()
  restored, meta = checkpointing.restore(manager, 2, state)
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert meta == {"epoch": 1}
  manager.close()


# A checkpoint written before the train state's `rest` became `model_state`
# (tests/fixtures/checkpoint_rest_layout/README.md: field k's float leaf j
# holds 1000 * (k + 1) + j, its integer leaf j 100 * (k + 1) + j).
REST_LAYOUT = os.path.join(ROOT, "tests", "fixtures", "checkpoint_rest_layout", "workdir")


def rest_layout_config():
  from configs.synthetic import get_config

  config = get_config("tiny")
  config.model.level = 0
  return config


def assert_field_pattern(tree, k):
  for j, leaf in enumerate(jax.tree.leaves(tree)):
    base = 1000 if jnp.issubdtype(leaf.dtype, jnp.floating) else 100
    np.testing.assert_array_equal(
      np.asarray(leaf), np.full(leaf.shape, base * (k + 1) + j), err_msg=f"field {k}, leaf {j}"
    )


def test_a_checkpoint_with_the_former_rest_field_resumes(tmp_path):
  from flax import nnx

  from apnet_jax import build_model, optim, sharding, train_step

  shutil.copytree(REST_LAYOUT, tmp_path / "run")
  config = rest_layout_config()
  tx, _ = optim.make_optimizer(config, 1)
  _, state = train_step.create_train_state(build_model(config.model, 8, rngs=nnx.Rngs(1)), tx)
  replicated = sharding.replicated_sharding(sharding.make_mesh())
  state = jax.device_put(state, replicated)
  manager = checkpointing.make_manager(str(tmp_path / "run"), keep_best=1)
  assert list(manager.all_steps()) == [400]
  restored, meta = checkpointing.restore(manager, 400, state)
  manager.close()
  assert isinstance(restored, train_step.TrainState) and meta["num_classes"] == 8
  for k, field in enumerate(("params", "model_state", "opt_state", "step")):
    assert_field_pattern(getattr(restored, field), k)
  assert all(x.sharding.is_equivalent_to(replicated, x.ndim) for x in jax.tree.leaves(restored))
  # BatchNorm statistics are where the former `rest` went.
  assert jax.tree.leaves(nnx.state(restored.model_state, nnx.BatchStat))


def test_a_checkpoint_with_the_former_rest_field_evaluates(tmp_path):
  from flax import nnx

  from apnet_jax import restore

  shutil.copytree(REST_LAYOUT, tmp_path / "run")
  model, source = restore.restore_model(rest_layout_config(), str(tmp_path / "run"))
  assert source == {"checkpoint_step": 400}
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  assert_field_pattern(params, 0)
  assert_field_pattern(model_state, 1)


def test_a_new_checkpoint_saves_the_model_state_under_its_name(tmp_path):
  from apnet_jax import train_step

  state = train_step.TrainState(
    params={"w": jnp.ones(2)}, model_state={"mean": jnp.zeros(2)}, opt_state={}, step=jnp.asarray(3)
  )
  manager = checkpointing.make_manager(str(tmp_path), keep_best=1)
  checkpointing.save(manager, 3, state, {"epoch": 1})
  checkpointing.wait_until_finished(manager)
  assert set(manager.item_metadata(3)["state"].tree) == {
    "params",
    "model_state",
    "opt_state",
    "step",
  }
  restored, _ = checkpointing.restore(manager, 3, state)
  np.testing.assert_array_equal(restored.model_state["mean"], np.zeros(2))
  manager.close()


# --- Loader workers die with their parent -------------------------------------------------

# Run as `python -c STARTS_WORKERS`: a train loader with 2 Grain workers, one
# batch read, then it waits to be killed.
STARTS_WORKERS = r"""
import io, time
import numpy as np
from PIL import Image
from apnet_jax.data import pipeline

buffer = io.BytesIO()
Image.fromarray(np.zeros((8, 4, 3), np.uint8)).save(buffer, format="PNG")
records = [{"image": buffer.getvalue(), "pid": i // 4, "camid": 0, "label": i // 4,
            "filename": f"{i}.png"} for i in range(16)]
loader = pipeline.train_loader(records, [r["label"] for r in records], p=2, k=2, height=8,
                               width=4, seed=0, num_workers=2, process_index=0,
                               process_count=1)
next(loader), next(loader)  # batches are dealt round-robin: both workers are up
print("ready", flush=True)
time.sleep(600)
"""


def _children(pid):
  found = set()
  for task in os.listdir(f"/proc/{pid}/task"):
    with open(f"/proc/{pid}/task/{task}/children") as f:
      found.update(int(c) for c in f.read().split())
  return found


def _running(pid):
  """False once ``pid`` has exited (a zombie nobody reaped counts as exited)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
  except FileNotFoundError:
    return False


@pytest.mark.slow
def test_loader_workers_exit_when_their_parent_is_killed():
  parent = subprocess.Popen(
    [sys.executable, "-c", STARTS_WORKERS],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  try:
    assert parent.stdout.readline().strip() == "ready"
    workers = _children(parent.pid)
    assert len(workers) >= 2, workers  # the 2 workers (and perhaps a resource tracker)
  finally:
    parent.kill()
    parent.wait(timeout=30)
  deadline = time.time() + 20  # a loaded machine is slow to schedule them
  while time.time() < deadline and any(_running(w) for w in workers):
    time.sleep(0.2)
  left = [w for w in workers if _running(w)]
  for w in left:  # do not leave them to the next test
    os.kill(w, signal.SIGKILL)
  assert not left, f"workers {left} outlived their SIGKILLed parent by 20 s"


# --- One run per workdir; outputs replaced whole -------------------------------------------


def test_a_held_workdir_is_refused_naming_it_and_the_holder(tmp_path):
  held = workdir.WorkdirLock.acquire(str(tmp_path), "training")
  try:
    with pytest.raises(
      workdir.WorkdirBusyError, match=rf"{re.escape(str(tmp_path))}.*training.*pid {os.getpid()}"
    ):
      workdir.WorkdirLock.acquire(str(tmp_path), "training")
  finally:
    held.release()
  workdir.WorkdirLock.acquire(str(tmp_path), "training").release()  # free again


def test_the_lock_of_a_killed_process_is_free(tmp_path):
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time; from apnet_jax import workdir; "
      "workdir.WorkdirLock.acquire(sys.argv[1], 'training'); print('held', flush=True); "
      "time.sleep(600)",
      str(tmp_path),
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir.WorkdirBusyError, match=rf"pid {holder.pid}"):
      workdir.WorkdirLock.acquire(str(tmp_path), "training")
  finally:
    holder.kill()
    holder.wait(timeout=30)
  workdir.WorkdirLock.acquire(str(tmp_path), "training").release()


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  (tmp_path / "run").write_text("notes")
  with pytest.raises(NotADirectoryError, match=re.escape(str(tmp_path / "run"))):
    workdir.ensure_workdir(str(tmp_path / "run"))
  assert (tmp_path / "run").read_text() == "notes"


def test_a_replaced_folder_holds_one_invocation_and_survives_a_failed_one(tmp_path):
  out = tmp_path / "extract"
  with workdir.replace_folder(str(out)) as staging:
    for name in ("features.npy", "ranking.json"):
      open(os.path.join(staging, name), "w").write("first")
  with workdir.replace_folder(str(out)) as staging:
    open(os.path.join(staging, "features.npy"), "w").write("second")
  assert sorted(p.name for p in out.iterdir()) == ["features.npy"]  # no stale ranking.json
  with pytest.raises(RuntimeError, match="killed"):
    with workdir.replace_folder(str(out)) as staging:
      open(os.path.join(staging, "features.npy"), "w").write("third")
      raise RuntimeError("killed mid-write")
  assert (out / "features.npy").read_text() == "second"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["extract"]  # no staging left


@pytest.mark.slow
def test_a_damaged_checkpoint_ends_the_command_line_with_the_projects_error(runner, uninterrupted):
  """Orbax's and TensorStore's thread tracebacks must not bury the error (run.py)."""
  del uninterrupted  # its workdir, copied
  workdir = runner.root / "damaged"
  shutil.copytree(runner.root / "uninterrupted", workdir)
  _truncate_arrays(workdir / "checkpoints" / str(STEPS) / "state")
  runner.finish(runner.start(workdir), workdir, returncode=1)
  last = log_path(workdir).read_text(errors="replace").rstrip().splitlines()[-1]
  assert re.fullmatch(
    rf"CheckpointReadError: Cannot read the checkpoint of step {STEPS} in "
    rf"{re.escape(str(workdir / 'checkpoints' / str(STEPS)))} .*",
    last,
  ), last
