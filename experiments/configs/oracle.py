"""Target oracle: supervised on labelled target images (the upper bound).

Run:
  python -m experiments.oracle --config=experiments/configs/oracle.py
Variants: ``:tiny``, ``:paper``.

``paper`` targets Cityscapes val 65.1 mIoU (AdaptSegNet's oracle, DeepLab-v2
R101; tllib: 70.5), METHODS.md §14.1. Real data and weights for ``paper``:
experiments/configs/common.py.
"""

from experiments.configs import common


def get_config(variant: str = ""):
  c = common.get_base_config()
  c.method = "oracle"
  return common.apply_variant(c, variant)
