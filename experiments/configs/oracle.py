"""Target oracle: supervised on labelled target images (the upper bound).

Run:
  python -m experiments.oracle --config=experiments/configs/oracle.py
Variants (``VARIANTS``): ``tiny``, ``paper`` (DeepLab-v2 R101 on Cityscapes
512x1024).

``paper`` targets Cityscapes val 65.1 mIoU (AdaptSegNet's oracle, DeepLab-v2
R101; tllib: 70.5), METHODS.md §14.1. Real data and weights for ``paper``:
experiments/configs/common.py.
"""

from experiments.configs import common


def _paper(c):
  common.COMMON["paper"].apply(c)
  c.source.height = c.source.width = 0  # No source images are read.


VARIANTS = common.variants(
    paper=common.Variant(_paper, common.COMMON["paper"].doc, common.PROTOCOL))
PUBLISHED = {"paper": "65.1"}


def get_config(variant: str = ""):
  c = common.get_base_config()
  c.method = "oracle"
  return common.apply_variant(c, variant, VARIANTS)
