"""CUHK03, 767/700 protocol: `configs/cuhk03.py:labeled` (default) or `:detected`.

The authors quote Rank-1 87.4, mAP 85.3 on the labeled split.
"""

from configs import common


def get_config(arg=None):
  split = common.choose(arg, ("labeled", "detected"), "configs/cuhk03.py")
  config = common.get_config()
  config.data.name = "cuhk03"
  config.data.config = split
  return config
