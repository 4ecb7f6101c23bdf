"""The official APNet recipe as defaults; every other config starts from it.

The allowed values of every key are in `apnet_jax.config_check.RULES`.

Values from the official implementation (github.com/Gutianpei/APNet,
configs/default.yml, modeling/ and solver/). Each dataset config changes only
what differs.
"""

import ml_collections
from ml_collections import config_dict


def choose(arg: str | None, options: tuple[str, ...], config_file: str) -> str:
  """The variant a config file's ``:arg`` picks; the first option by default."""
  if arg is None or arg == "":
    return options[0]
  if arg not in options:
    raise ValueError(f"{config_file} takes {' or '.join(repr(o) for o in options)}, got {arg!r}")
  return arg


def no_argument(arg: str | None, config_file: str) -> None:
  """Refuses a ``:arg`` given to a config file that takes none (a typo would pass unseen)."""
  if arg is not None and arg != "":
    raise ValueError(
      f"{config_file} takes no argument, got {arg!r}; use {config_file} alone "
      "and change settings with --config.section.key=value."
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the official recipe; takes no argument."""
  no_argument(arg, "configs/common.py")
  config = ml_collections.ConfigDict()

  config.model = model = ml_collections.ConfigDict()
  model.depth = 50  # ResNet depth: 18, 34, 50 or 101.
  model.width = 1.0  # Channel multiplier; < 1 for small test/demo networks.
  model.last_stride = 1
  model.stem_relu = False  # The official stem has no ReLU after bn1.
  model.level = 2  # Attention pyramid level, 0..3 (0 = plain ResNet + BNNeck).
  model.kind = "channel"  # 'channel' (APNet-C) or 'spatial' (APNet-S).
  model.input_size = (384, 192)  # (height, width) of train and test images.
  model.eval_feature = "bn"  # 'bn' (feat), 'global' (global_feat), 'logits'.
  model.dtype = "float32"  # Compute dtype: 'float32' or 'bfloat16'.
  # torchvision's ImageNet ResNet-50, the file the official code starts from;
  # '' trains from scratch.
  model.init_from = "~/.cache/torch/hub/checkpoints/resnet50-19c8e357.pth"

  config.data = data = ml_collections.ConfigDict()
  data.name = "market1501"  # A builder of apnet_jax.data.sources.BUILDERS.
  data.config = ""  # Builder config ('' = its default), e.g. 'labeled'.
  data.data_dir = "~/tensorflow_datasets"  # Where prepared datasets live.
  data.manual_dir = ""  # Downloaded files; set it to prepare a dataset.
  data.p = 20  # Identities per batch ...
  data.k = 4  # ... and images per identity: 80 images.
  data.num_workers = 2  # Grain worker processes decoding and resizing.

  config.augment = augment = ml_collections.ConfigDict()
  augment.pad = 10
  augment.flip_p = 0.5
  augment.erase_p = 0.5

  config.loss = loss = ml_collections.ConfigDict()
  loss.margin = 0.3  # Batch-hard triplet margin, on global_feat.
  loss.label_smoothing = 0.1  # Over the real number of train ids.

  config.optim = optim = ml_collections.ConfigDict()
  optim.base_lr = 4e-4
  optim.weight_decay = 1e-3  # Coupled, as torch.optim.Adam applies it.
  optim.bias_lr_factor = 1.0
  # Unset (None): the biases decay by weight_decay, as in the official recipe
  # (both 1e-3). A typed placeholder, so --config.optim.weight_decay_bias=X works.
  optim.weight_decay_bias = config_dict.placeholder(float)
  optim.betas = (0.9, 0.999)
  optim.warmup_factor = 0.01
  optim.warmup_epochs = 10
  optim.milestones = (40, 80, 120)
  optim.gamma = 0.1

  config.train = train = ml_collections.ConfigDict()
  train.epochs = 160
  train.max_steps = -1  # -1: the whole schedule; >= 1 stops after that many steps (smoke tests).
  train.seed = 0
  train.log_every_steps = 50
  train.checkpoint_every_epochs = 10
  train.keep_best = 1  # Best checkpoints by mAP kept besides the latest.
  train.eval_epochs = (120, 160)  # Evaluate after these epochs.
  # Resuming: recipe keys (dotted, comma-separated, e.g. 'optim.base_lr') whose
  # change from the workdir's config.json is accepted and recorded; others are refused.
  train.allow_changes = ""

  config.eval = ev = ml_collections.ConfigDict()
  # The datasets the evaluator scores: comma-separated name[:config] entries
  # (e.g. 'dukemtmc_reid,msmt17:train'); '' = the training dataset(s).
  ev.datasets = ""
  ev.batch_size = 128  # Images per forward pass (padded; sharded over devices).
  ev.step = -1  # Checkpoint step for --mode eval; -1 = latest.
  ev.use_best = False  # --mode eval: restore the best checkpoint by mAP instead.
  ev.torch_checkpoint = ""  # Evaluate an official PyTorch checkpoint instead.
  ev.drop_distractors = False  # Market: the Gutianpei code's easier gallery.
  ev.rerank = False  # Also report k-reciprocal re-ranking.
  ev.rerank_k1 = 20
  ev.rerank_k2 = 6
  ev.rerank_lambda = 0.3
  # Also report alpha query expansion (fast-reid's AQE): each feature becomes
  # the mean of its k nearest, weighted by similarity**alpha.
  ev.query_expansion = False
  ev.query_expansion_k = 5
  ev.query_expansion_alpha = 3.0
  ev.max_rank = 50

  config.extract = extract = ml_collections.ConfigDict()
  extract.input_dir = ""  # --mode extract: images to describe (recursively).
  extract.gallery_dir = ""  # Optionally rank each of them against these.
  extract.top = 10  # Gallery images listed per image in ranking.json.
  extract.num_pictures = 8  # Rows of ranked_list.png.

  config.visualize = visualize = ml_collections.ConfigDict()
  visualize.num_queries = 8  # --mode visualize: query images in attention.png.

  return config
