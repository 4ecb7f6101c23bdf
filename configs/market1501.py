"""Market-1501 with the official recipe (paper: Rank-1 96.2, mAP 90.5)."""

from configs import common


def get_config(arg=None):
  common.no_argument(arg, "configs/market1501.py")
  config = common.get_config()
  config.data.name = "market1501"
  return config
