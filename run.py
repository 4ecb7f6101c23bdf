"""apnet-jax command line.

  python run.py --config configs/synthetic.py --workdir /tmp/apnet-demo
  python run.py --config configs/market1501.py --workdir DIR --mode eval
  python run.py --config configs/market1501.py --workdir DIR --mode extract \
      --config.extract.input_dir=MY_CROPS [--config.extract.gallery_dir=GALLERY]
  python run.py --config configs/market1501.py --workdir DIR --mode export
  python run.py --config configs/market1501.py --workdir DIR --mode visualize
  python run.py --config configs/msmt17.py --mode prepare --config.data.manual_dir=DIR
  python run.py --config configs/common.py --mode summary

Only parses flags and calls library functions (`apnet_jax.train`,
`apnet_jax.evaluate`, ...), so a notebook can make the same calls.
"""

import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py[:arg]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, results.json.")
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval", "extract", "export", "visualize", "prepare", "summary"],
  "train: prepare the data if needed, train, evaluate. eval: evaluate a checkpoint of "
  "--workdir. extract: features (and rankings) of your own images. export: write the "
  "feature extractor as a jax.export file. visualize: attention maps of query images "
  "(attention.png). prepare: build the dataset only. summary: "
  "print the model's parameter table, output shapes and FLOPs.",
)
flags.DEFINE_string(
  "coordinator_address",
  None,
  "Multi-host (all modes but prepare and summary): HOST:PORT of process 0's coordinator, the "
  "same on every process. Unset: JAX_COORDINATOR_ADDRESS, or detected on Cloud TPU, "
  "SLURM and Open MPI.",
)
flags.DEFINE_integer(
  "num_processes", None, "Multi-host: number of processes (unset: detected, as above)."
)
flags.DEFINE_integer(
  "process_id", None, "Multi-host: this process, 0..num_processes-1 (unset: detected)."
)
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS

# The modes that read or write a run directory, and run on every process.
_WORKDIR_MODES = ("train", "eval", "extract", "export", "visualize")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:  # Orbax and TFDS log every file at INFO.
    logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  if FLAGS.mode in _WORKDIR_MODES:
    if not FLAGS.workdir:
      raise app.UsageError(f"--mode {FLAGS.mode} needs --workdir")
    from apnet_jax import distributed  # before any JAX computation

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  # After flag parsing: importing JAX takes a moment.
  from apnet_jax import config_check, errors

  try:
    _run(config)
  except config_check.ConfigError as e:  # the user's settings: a message, not a traceback
    raise SystemExit(f"run.py: {e}") from None
  except errors.USER_ERRORS as e:
    errors.exit_with_error(e)  # its message is the last line, not Orbax's thread tracebacks


def _run(config):
  from apnet_jax import config_check, evaluate, inference, train, visualize
  from apnet_jax.data import opening
  from apnet_jax.models import summary

  if FLAGS.mode == "train":
    train.train_and_evaluate(config, FLAGS.workdir, eval_command=_eval_command())
  elif FLAGS.mode == "eval":
    evaluate.evaluate_workdir(config, FLAGS.workdir)
  elif FLAGS.mode == "extract":
    inference.extract_folder(config, FLAGS.workdir)
  elif FLAGS.mode == "export":
    inference.export_workdir(config, FLAGS.workdir)
  elif FLAGS.mode == "visualize":
    visualize.visualize_workdir(config, FLAGS.workdir)
  elif FLAGS.mode == "prepare":
    config_check.check_mode(config, "prepare")
    opening.prepare_data(config.data)
  else:
    config_check.check_mode(config, "summary")
    print(summary.describe(config.model, opening.num_train_ids(config.data)))


def _eval_command() -> str:
  """This command line in --mode eval: what finishes a final evaluation stopped by a signal."""
  args = sys.argv[1:]
  kept = [
    a
    for i, a in enumerate(args)
    if not a.startswith(("--mode=", "-mode="))
    and a not in ("--mode", "-mode")
    and (i == 0 or args[i - 1] not in ("--mode", "-mode"))
  ]
  return shlex.join(["python", "run.py", *kept, "--mode", "eval"])


if __name__ == "__main__":
  app.run(main)
