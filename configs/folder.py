"""One's own dataset (`reid_folder`) with the official recipe.

    python run.py --config configs/folder.py --workdir W \
        --config.data.manual_dir=DIR --config.data.config=NAME

prepares DIR (train/, query/, gallery/; see
apnet_jax/datasets/reid_folder/README.md) as NAME in data.data_dir on the
first run, then trains and evaluates on it. The recipe is Market-1501's:
384x192 inputs, P x K = 20 x 4 (identities with fewer than 4 images are
sampled with replacement), 160 epochs from ImageNet ResNet-50.
"""

from configs import common


def get_config(arg=None):
  config = common.get_config(arg)
  config.data.name = "reid_folder"
  config.data.config = "default"  # The prepared copy's name: one per folder.
  return config
