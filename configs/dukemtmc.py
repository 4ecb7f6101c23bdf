"""DukeMTMC-reID with the official recipe (paper: Rank-1 90.4, mAP 81.5)."""

from configs import common


def get_config(arg=None):
  common.no_argument(arg, "configs/dukemtmc.py")
  config = common.get_config()
  config.data.name = "dukemtmc_reid"
  return config
