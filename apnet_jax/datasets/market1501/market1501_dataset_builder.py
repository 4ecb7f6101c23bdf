"""Market-1501 (Zheng et al., ICCV 2015) as an ArrayRecord TFDS dataset.

Standard protocol: junk images (pid -1) are dropped; distractors (pid 0) stay
in the gallery (dropping them is an evaluation switch, not a data change).
DukeMTMC-reID-style names (``0001_c2_f0046182.jpg``) are refused: the two
benchmarks share their folder layout.
"""

from .. import reid_common

_ROOT = "Market-1501-v15.09.15"


class Builder(reid_common.MarketStyleBuilder):
  """Market-1501: 751 train ids, 750 test ids, 6 cameras."""

  NUM_CAMERAS = 6
  LAYOUTS = (reid_common.market_style_layout(_ROOT),)
  FOREIGN_NAMES = (reid_common.DUKEMTMC_REID_NAMES,)
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Place the official archive {_ROOT}.zip, or the folder {_ROOT}/ extracted
  from it (holding bounding_box_train/, query/ and bounding_box_test/), in
  manual_dir. See README.md next to this builder.
  """
