"""The official APNet recipe as defaults; every other config starts from it.

Facts from the official implementation (github.com/Gutianpei/APNet,
configs/default.yml and modeling/): see docs and the project GUIDE.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config. ``arg`` is unused here (kept for a uniform API)."""
  del arg
  config = ml_collections.ConfigDict()

  config.model = model = ml_collections.ConfigDict()
  model.depth = 50  # ResNet depth: 18, 34, 50 or 101.
  model.width = 1.0  # Channel multiplier; < 1 for small test/demo networks.
  model.last_stride = 1
  model.stem_relu = False  # The official stem has no ReLU after bn1.
  model.level = 2  # Attention pyramid level, 0..3 (0 = plain ResNet + BNNeck).
  model.kind = "channel"  # 'channel' (APNet-C) or 'spatial' (APNet-S).
  model.input_size = (384, 192)  # (height, width) of the network input.
  model.eval_feature = "bn"  # 'bn' (feat), 'global' (global_feat), 'logits'.
  model.dtype = "float32"  # Compute dtype: 'float32' or 'bfloat16'.
  model.init_from = ""  # Path to torchvision's resnet50-19c8e357.pth, or ''.
  model.num_classes = 751  # Replaced by the dataset's number of train ids.

  return config
