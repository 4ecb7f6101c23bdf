"""Market-1501, DukeMTMC-reID and MSMT17 trained jointly with the official recipe.

One classifier over the 751 + 702 + 1,041 = 2,494 train identities of the
three (kept apart: each dataset's labels follow the ones before it), P x K
batches drawn over all of them, and each dataset's test set evaluated on its
own. ``msmt17:train`` is the standard MSMT17 train split (list_train.txt);
``msmt17:trainval`` would add list_val.txt. Prepare each dataset first with
its own config, into the same data.data_dir, e.g.

    python run.py --config configs/dukemtmc.py --mode prepare --config.data.manual_dir=DIR
"""

from configs import common


def get_config(arg=None):
  common.no_argument(arg, "configs/joint.py")
  config = common.get_config()
  config.data.name = "market1501+dukemtmc_reid+msmt17:train"
  config.data.config = ""  # Each entry of data.name carries its own.
  return config
