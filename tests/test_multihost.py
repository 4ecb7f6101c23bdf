"""Multi-host training: two JAX processes on localhost against one, bit for bit.

Each run is ``run.py`` in its own subprocess on the CPU backend: a pair of
processes (2 CPU devices each) joined through ``--coordinator_address``,
``--num_processes 2``, ``--process_id``, and a reference of one process with
4 CPU devices. Both train 3 steps of the tiny synthetic config on the same
global batches and evaluate; then the pair evaluates its checkpoint again
(``--mode eval``, the model restored on each process). The model is ResNet-18 at 1/4 width, 128x64,
without the attention pyramid (level 0): the three runs compile it at once on
two cores, and level 2 costs half as much CPU again for no extra
cross-device code (its BatchNorms reduce over the batch like the backbone's).

The reference joins a 1-process distributed runtime too
(``--num_processes 1``), so that its cross-device sums go through gloo, JAX's
CPU collectives, as the pair's do. Without it JAX sums in-process, in another
order, and the runs differ by rounding (measured: ``grad_norm`` 5e-5 relative
after one step, train-mode BatchNorm on a 16-image batch amplifying it); a
tolerance wide enough for that is wide enough to miss a small error. With
the same collectives the pair must reproduce the reference bit for bit.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from apnet_jax.data import opening
from configs.synthetic import get_config

# Every test here starts processes; the two-process runs are the slowest of the suite.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
# Generous (a run takes ~30 s alone): it only turns a hang into a failure.
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# XLA:CPU sizes a process's thread pool by the core count, or by the device
# count where that is larger, and its kernels split work by the pool: on 2
# cores a step on one device of a 4-device process rounds differently from
# the same step in a 2-device process (measured on an AMD EPYC: parameters
# 1e-8 apart after one step; the pair and the reference then differ). One
# pool size for every process (PJRT_NPROC, XLA's knob for it) makes the
# rounding the same (as it would be on a machine of 4 cores or more).
_POOL_SIZE = "4"


def _env(num_devices: int) -> dict[str, str]:
  # No cluster variables (JAX would detect SLURM or Open MPI), no inherited XLA
  # flags; the suite's compilation cache is kept (tests/conftest.py).
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "OMPI_", "JAX_", "XLA_", "TPU_"))
    or k.startswith(("JAX_COMPILATION_CACHE_", "JAX_PERSISTENT_CACHE_"))
  }
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(num_devices), PJRT_NPROC=_POOL_SIZE)
  return env


def _run_all(commands: list[tuple[list[str], dict[str, str], str]]) -> list[str]:
  """Runs the commands at once; returns their outputs. One failing or all hanging
  kills the rest: a process left alone would wait for its peer in a collective."""
  procs, logs = [], []
  try:
    for args, env, log in commands:
      logs.append(log)
      with open(log, "w") as out:
        procs.append(
          subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        )
    deadline = time.monotonic() + TIMEOUT_S
    while any(proc.poll() is None for proc in procs):
      if any(proc.returncode for proc in procs):
        break
      if time.monotonic() > deadline:
        pytest.fail(f"still running after {TIMEOUT_S} s; logs: {logs}")
      time.sleep(0.5)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  outputs = []
  for log in logs:
    with open(log) as f:
      outputs.append(f.read())
  for proc, log, out in zip(procs, logs, outputs):
    assert proc.returncode == 0, f"{log} exited {proc.returncode}:\n{out[-4000:]}"
  return outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs, results and outputs of the pair and the reference."""
  tmp = tmp_path_factory.mktemp("multihost")
  data_dir = str(tmp / "tfds")
  config = get_config("tiny")
  config.data.data_dir = data_dir
  opening.prepare_data(config.data)  # once, before the runs read it
  flags = [
    sys.executable,
    "run.py",
    "--config",
    "configs/synthetic.py:tiny",
    f"--config.data.data_dir={data_dir}",
    f"--config.train.max_steps={STEPS}",
    "--config.train.log_every_steps=1",
    "--config.train.checkpoint_every_epochs=100",
    "--config.model.input_size=(128,64)",
    "--config.model.level=0",
  ]
  pair, reference = str(tmp / "pair"), str(tmp / "reference")
  pair_address, reference_address = f"localhost:{_free_port()}", f"localhost:{_free_port()}"
  commands = [
    (
      flags
      + [
        "--workdir",
        pair,
        "--coordinator_address",
        pair_address,
        "--num_processes",
        "2",
        "--process_id",
        str(i),
      ],
      _env(2),
      str(tmp / f"pair_{i}.log"),
    )
    for i in range(2)
  ]
  commands.append(
    (
      flags
      + [
        "--workdir",
        reference,
        "--coordinator_address",
        reference_address,
        "--num_processes",
        "1",
        "--process_id",
        "0",
      ],
      _env(4),
      str(tmp / "reference.log"),
    )
  )
  train_outputs = _run_all(commands)
  results = {
    "pair_train": _read_json(os.path.join(pair, "results.json")),
    "reference": _read_json(os.path.join(reference, "results.json")),
  }
  os.remove(os.path.join(pair, "results.json"))  # --mode eval writes it again
  eval_address = f"localhost:{_free_port()}"
  eval_outputs = _run_all(
    [
      (
        flags
        + [
          "--workdir",
          pair,
          "--mode",
          "eval",
          "--coordinator_address",
          eval_address,
          "--num_processes",
          "2",
          "--process_id",
          str(i),
        ],
        _env(2),
        str(tmp / f"pair_eval_{i}.log"),
      )
      for i in range(2)
    ]
  )
  results["pair_eval"] = _read_json(os.path.join(pair, "results.json"))
  return {
    "pair": pair,
    "reference": reference,
    "results": results,
    "pair_outputs": train_outputs[:2],
    "pair_eval_outputs": eval_outputs,
  }


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _state(workdir, step):
  """The saved train state as numpy arrays (this process has other devices)."""
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(
    lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
    checkpointer.metadata(path).item_metadata.tree,
  )
  return ocp.tree.to_flat_dict(checkpointer.restore(path, restore_args=as_numpy))


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_processes_train_and_evaluate_as_one(runs):
  pair, reference = _state(runs["pair"], STEPS), _state(runs["reference"], STEPS)
  assert pair.keys() == reference.keys() and len(pair) > 100
  for key in pair:
    np.testing.assert_array_equal(pair[key], reference[key], err_msg=str(key))
  assert int(pair[("step",)]) == STEPS

  # The logged losses and the evaluation (features gathered from both processes).
  timing = ("img_per_s",)

  def strip(records):
    return [{k: v for k, v in r.items() if k not in timing} for r in records]

  assert strip(_records(runs["pair"])) == strip(_records(runs["reference"]))
  results = runs["results"]
  reference = results["reference"]
  assert reference["protocol"]["num_gallery"] == 28  # every gallery image, once
  for name in ("pair_train", "pair_eval"):
    for key in ("R1", "R5", "R10", "mAP", "mINP", "cmc", "num_valid_queries", "protocol"):
      assert results[name][key] == reference[key], (name, key)
  assert results["pair_eval"]["checkpoint_step"] == STEPS


def test_only_process_0_writes_logs_and_results(runs):
  pair = runs["pair"]
  records = _records(pair)
  # Both processes appending would double every line.
  assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
  assert [r["step"] for r in records if r["kind"] == "eval"] == [3]
  assert len(os.listdir(os.path.join(pair, "tensorboard"))) == 1
  assert (
    sorted(os.listdir(pair))
    == sorted(os.listdir(runs["reference"]))
    == [
      ".lock",
      "checkpoints",
      "cmc.png",
      "config.json",
      "metrics.jsonl",
      "ranked_list.png",
      "results.json",
      "tensorboard",
    ]
  )
  # The results table and the progress bar: process 0 only.
  table = "     mAP    mINP"
  (train_0, train_1), (eval_0, eval_1) = runs["pair_outputs"], runs["pair_eval_outputs"]
  assert table in train_0 and "train:" in train_0 and table in eval_0
  assert table not in train_1 and "train:" not in train_1 and table not in eval_1
  # The evaluation's bars count images (the tiny set: 24 queries, 28 gallery
  # images), on process 0; process 1 draws no bar at all.
  for out in (train_0, eval_0):
    assert re.search(r"query: 100%\|[^|]*\| 24/24 \[", out), out[-3000:]
    assert re.search(r"gallery: 100%\|[^|]*\| 28/28 \[", out), out[-3000:]
  assert "%|" not in train_1 and "%|" not in eval_1
  # Orbax's notice of our jax.Array handler is hidden at the default verbosity.
  for out in (train_0, train_1, eval_0, eval_1):
    assert "Type handler registry" not in out
  # One checkpoint, written together: one state and one record (the input
  # position is the step, so no process saves its own).
  step_dir = os.path.join(pair, "checkpoints", str(STEPS))
  assert sorted(os.listdir(step_dir)) == [
    "_CHECKPOINT_METADATA",
    "commit_success.txt",
    "meta",
    "state",
  ]


_PROBE = """
import os
import signal
import numpy as np
from apnet_jax import distributed
assert distributed.initialize()  # no settings: JAX reads SLURM's variables
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from apnet_jax import preemption, sharding
from apnet_jax.data import opening

i = jax.process_index()
rows = np.arange(2 * i, 2 * i + 2, dtype=np.int32)  # this process's 2 of the 4 rows
batch = sharding.shard_batch({"row": rows}, sharding.make_mesh())
assert [d.process_index for d in sharding.make_mesh().devices] == [0, 1]
gathered = jax.jit(lambda x: x, out_shardings=sharding.replicated_sharding(
    sharding.make_mesh()))(batch["row"])
assert np.asarray(gathered).tolist() == [0, 1, 2, 3], gathered
reversed_mesh = Mesh(np.array(jax.devices()[::-1]), ("data",))
try:
  sharding.shard_batch({"row": rows}, reversed_mesh)
except ValueError as e:
  print("REFUSED:", e)

# A dataset process 0 cannot open stops every process, with its message.
from configs import market1501
data_config = market1501.get_config().data
data_config.data_dir = "/nonexistent/apnet-multihost-test"
try:
  opening.open_dataset(data_config)
except Exception as e:
  print("DATASET:", type(e).__name__, str(e).splitlines()[0][:300])

# SIGTERM to process 1 alone: both stop at one step (the train loop's flag).
preempted = preemption.StopSignals()
for step in range(1, 1000):
  multihost_utils.sync_global_devices("step")  # what a train step's collectives do
  if i == 1 and step == 5:
    os.kill(os.getpid(), signal.SIGTERM)
  preempted.poll(step)
  if preempted.set:
    print("STOPPED AT", step)
    break
"""


def _slurm_env(process_id: int, port: int) -> dict[str, str]:
  """What ``srun --ntasks=2`` on one node sets, as far as JAX reads it."""
  return dict(
    _env(1),
    SLURM_JOB_ID="1",
    SLURM_STEP_NODELIST="localhost",
    SLURM_NTASKS="2",
    SLURM_PROCID=str(process_id),
    SLURM_LOCALID=str(process_id),
    JAX_COORDINATOR_PORT=str(port),
  )


def test_slurm_processes_meet_share_batches_and_preemption(tmp_path):
  """Processes started as by srun find each other; make_mesh puts process i's rows
  at block i (a mesh that does not is refused); SIGTERM to one stops all at one step."""
  port = _free_port()
  outputs = _run_all(
    [
      ([sys.executable, "-c", _PROBE], _slurm_env(i, port), str(tmp_path / f"probe_{i}.log"))
      for i in range(2)
    ]
  )
  for i, out in enumerate(outputs):
    assert f"REFUSED: shard_batch: process {i} loads block {i}" in out, out[-2000:]
    assert "sharding.make_mesh()" in out
    assert "DATASET:" in out and "market1501" in out, out[-2000:]
  assert "process 0 could not open the dataset" in outputs[1]
  stops = [[line for line in out.splitlines() if line.startswith("STOPPED AT")] for out in outputs]
  assert len(stops[0]) == 1 and stops[0] == stops[1], stops
  assert int(stops[0][0].split()[-1]) > 5


def test_initialize_alone_is_a_single_process_run_and_half_settings_fail():
  code = """
from apnet_jax import distributed
try:
  distributed.initialize(num_processes=2, process_id=1)
except ValueError as e:
  print("REFUSED:", e)
assert distributed.initialize() is False
import jax
assert jax.process_count() == 1 and not jax.distributed.is_initialized()
print("SINGLE")
"""
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "SINGLE" in result.stdout
  assert "REFUSED: multi-host setup: coordinator_address should be defined" in result.stdout
  assert "--coordinator_address=HOST:PORT" in result.stdout


def test_a_single_slurm_task_keeps_all_its_devices():
  """`srun --ntasks=1` is a plain run (JAX's SLURM setup would keep one local GPU)."""
  code = """
from apnet_jax import distributed
assert distributed.initialize() is False
import jax
assert not jax.distributed.is_initialized()
print("DEVICES", jax.local_device_count())
"""
  env = dict(
    _env(4),
    SLURM_JOB_ID="1",
    SLURM_STEP_NODELIST="localhost",
    SLURM_NTASKS="1",
    SLURM_PROCID="0",
    SLURM_LOCALID="0",
    SLURM_NODEID="0",
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "DEVICES 4" in result.stdout
