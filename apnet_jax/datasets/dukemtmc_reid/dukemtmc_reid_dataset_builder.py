"""DukeMTMC-reID (Zheng et al., ICCV 2017) as an ArrayRecord TFDS dataset.

Same folder structure as Market-1501, 8 cameras. Its gallery also holds 408
identities that never appear as queries (distractor ids with ordinary pids).
Only the file names tell it from Market-1501 (``0001_c2_f0046182.jpg``: a
frame number, where Market has ``0002_c1s1_000451_03.jpg``), so Market-style
names are refused.
"""

from .. import reid_common

_ROOT = "DukeMTMC-reID"


class Builder(reid_common.MarketStyleBuilder):
  """DukeMTMC-reID: 702 train ids, 1,110 gallery ids, 8 cameras."""

  NUM_CAMERAS = 8
  LAYOUTS = (reid_common.market_style_layout(_ROOT),)
  FOREIGN_NAMES = (reid_common.MARKET1501_NAMES,)
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Place the archive {_ROOT}.zip, or the folder {_ROOT}/ extracted from it
  (holding bounding_box_train/, query/ and bounding_box_test/), in manual_dir.
  See README.md next to this builder.
  """
