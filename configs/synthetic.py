"""The embedded default: a small APNet on the procedurally drawn `synthetic_reid`.

Needs no download; prepares its dataset (seconds), trains and evaluates on a
2-core CPU in a few minutes. `configs/synthetic.py:tiny` is the test-sized
variant (8 train ids; a smoke run, not a benchmark).
"""

from configs import common


def get_config(arg=None):
  size = common.choose(arg, ("small", "tiny"), "configs/synthetic.py")
  config = common.get_config()
  config.data.name = "synthetic_reid"
  config.data.config = size
  config.data.p, config.data.k = 16, 4
  config.data.num_workers = 0  # 128x64 PNG/JPEG decodes faster than IPC.

  config.model.depth = 18
  config.model.width = 0.5
  config.model.input_size = (128, 64)
  config.model.init_from = ""  # from scratch: no ImageNet weights needed

  config.augment.pad = 4  # the official 10 px at 384x192, scaled to 128x64

  config.optim.base_lr = 1e-3
  config.optim.warmup_epochs = 2
  config.optim.milestones = (10, 14)
  config.train.epochs = 16
  config.train.log_every_steps = 18
  config.train.checkpoint_every_epochs = 4
  config.train.eval_epochs = (16,)
  config.eval.batch_size = 128

  if size == "tiny":
    config.data.p, config.data.k = 4, 4
    config.model.width = 0.25
    config.model.input_size = (64, 32)
    config.augment.pad = 2
    config.train.epochs = 2
    config.optim.milestones = ()  # the small run's decays lie past these 2 epochs
    config.train.eval_epochs = (2,)
    config.train.checkpoint_every_epochs = 1
    config.eval.batch_size = 32
  return config
