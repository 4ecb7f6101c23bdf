"""MSMT17 (paper: Rank-1 83.7, mAP 63.5).

`configs/msmt17.py` evaluates with the classifier logits as the feature, as the
authors' MSMT17 config does (CHENGY12/APNet, configs/msmt.yml);
`configs/msmt17.py:bn` uses the BNNeck feature like the other benchmarks.
"""

from configs import common


def get_config(arg=None):
  feature = common.choose(arg, ("logits", "bn"), "configs/msmt17.py")
  config = common.get_config()
  config.data.name = "msmt17"
  config.data.config = "train"  # list_train only; 'trainval' adds list_val.
  config.model.eval_feature = feature
  return config
