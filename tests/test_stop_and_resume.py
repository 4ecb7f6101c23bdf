"""Signals and kills around the saves: the final checkpoint is kept, the logs agree with it.

Each test starts `run.py` on the tiny synthetic config (2 epochs of 2 steps, a
checkpoint each epoch) through HOOKED_RUN, which times a signal or a kill at an
exact point of the run from inside the process.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
from test_metric_writers import tensorboard_view

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # seconds for one process; a hang fails instead of stalling CI

# `python -c HOOKED_RUN run.py-args`: run.py, with the HOOK of the environment.
HOOKED_RUN = """
import os, runpy, signal, sys, time

hook = os.environ.get("HOOK", "")
if hook == "signal_in_final_save":  # while Orbax commits the last step
  from orbax.checkpoint._src.path import atomicity

  commit = atomicity.AtomicRenameTemporaryPath.finalize

  async def signal_then_commit(self):
    if self.get_final().name == os.environ["FINAL_STEP"]:
      os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
      time.sleep(2)  # the main thread meets the signal before the commit ends
    return await commit(self)

  atomicity.AtomicRenameTemporaryPath.finalize = signal_then_commit
elif hook == "signal_in_final_evaluation":
  from apnet_jax.evaluation import evaluator

  run = evaluator.ReidEvaluator.run

  def signal_then_run(*args, **kwargs):
    os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
    return run(*args, **kwargs)

  evaluator.ReidEvaluator.run = signal_then_run
elif hook == "kill_after_logging":  # a step logged past the last committed checkpoint
  from apnet_jax import metric_writers

  write = metric_writers.MetricWriter.write

  def write_then_die(self, step, metrics, **kwargs):
    write(self, step, metrics, **kwargs)
    if step == int(os.environ["KILL_AFTER_STEP"]):
      committed = os.path.join(sys.argv[sys.argv.index("--workdir") + 1], "checkpoints",
                               str(step - 1))
      deadline = time.time() + 60
      while not os.path.isdir(committed) and time.time() < deadline:
        time.sleep(0.05)
      os.kill(os.getpid(), signal.SIGKILL)

  metric_writers.MetricWriter.write = write_then_die
sys.argv = ["run.py"] + sys.argv[1:]
runpy.run_path("run.py", run_name="__main__")
"""


def run(workdir, data_dir, *extra, **hook):
  """Runs the tiny config to its end or its stop: (returncode, output)."""
  log = workdir.parent / f"{workdir.name}.log"
  env = dict(os.environ, **{k.upper(): str(v) for k, v in hook.items()})
  with open(log, "ab") as out:  # a file, not a pipe: a full pipe would block the run
    process = subprocess.Popen(
      [
        sys.executable,
        "-c",
        HOOKED_RUN,
        "--config",
        "configs/synthetic.py:tiny",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        "--config.train.log_every_steps=1",
        *extra,
      ],
      cwd=ROOT,
      env=env,
      stdout=out,
      stderr=subprocess.STDOUT,
    )
  try:
    process.wait(timeout=TIMEOUT)
  finally:  # a hang fails the test; no training process outlives it
    if process.poll() is None:
      process.kill()
      process.wait()
  return process.returncode, log.read_text(errors="replace")


def committed_steps(workdir):
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_a_signal_during_the_final_save_waits_for_it(tiny_data_dir, tmp_path):
  workdir = tmp_path / "run"
  returncode, output = run(
    workdir, tiny_data_dir, hook="signal_in_final_save", final_step=4, signal="SIGTERM"
  )
  assert returncode == 143, output[-3000:]
  assert committed_steps(workdir)[-1] == 4  # the final step is saved whole
  assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
  assert "SIGTERM: saved the final step 4; stopped." in output


@pytest.mark.slow
def test_a_signal_during_the_final_evaluation_says_how_to_finish_it(tiny_data_dir, tmp_path):
  workdir = tmp_path / "run"
  returncode, output = run(
    workdir,
    tiny_data_dir,
    "--config.train.eval_epochs=()",
    hook="signal_in_final_evaluation",
    signal="SIGINT",
  )
  assert returncode == 130, output[-3000:]
  assert committed_steps(workdir)[-1] == 4
  assert not (workdir / "results.json").exists()
  last = output.strip().splitlines()[-1]
  assert last.startswith(
    f"SIGINT: the final evaluation was stopped; the final checkpoint (step 4) is saved in {workdir}"
  ), output[-3000:]
  assert last.endswith(
    f"--workdir {workdir} --config.data.data_dir={tiny_data_dir} "
    "--config.train.log_every_steps=1 '--config.train.eval_epochs=()' "
    "--mode eval"
  )
  assert "Traceback" not in output


@pytest.mark.slow
def test_a_resumed_run_logs_each_step_once(tiny_data_dir, tmp_path):
  workdir = tmp_path / "run"
  returncode, output = run(workdir, tiny_data_dir, hook="kill_after_logging", kill_after_step=3)
  assert returncode == -signal.SIGKILL, output[-3000:]
  assert committed_steps(workdir) == [2]  # step 3 was logged, not saved
  returncode, output = run(workdir, tiny_data_dir)
  assert returncode == 0, output[-3000:]

  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [(r["kind"], r["step"]) for r in rows] == [
    ("train", 1),
    ("train", 2),
    ("train", 3),
    ("train", 4),
    ("eval", 4),
  ]
  scalars, _ = tensorboard_view(workdir / "tensorboard")  # as TensorBoard shows them
  assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
  assert [step for step, _ in scalars["eval/mAP"]] == [4]

  # The killed run's step 3 is moved aside, named, not lost.
  aside = workdir / "discarded_after_step_2"
  moved = [json.loads(line) for line in (aside / "metrics.jsonl").read_text().splitlines()]
  assert [(r["kind"], r["step"]) for r in moved] == [("train", 3)]
