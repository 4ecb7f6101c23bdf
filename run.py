"""apnet-jax command line.

  python run.py --config configs/common.py --mode summary

Only parses flags and calls library functions, so a notebook can make the
same calls.
"""

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_enum("mode", "summary", ["summary"],
                  "summary: build the model, print its parameter table, output shapes and FLOPs.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = FLAGS.config
  if FLAGS.mode == "summary":
    from apnet_jax.models.summary import describe

    print(describe(config.model, config.model.num_classes))


if __name__ == "__main__":
  app.run(main)
