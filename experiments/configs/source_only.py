"""Source-only baseline: supervised on source, evaluated on target.

Run:
  python -m experiments.source_only --config=experiments/configs/source_only.py
Variants (``VARIANTS``; comma-separated, any order): ``tiny``, ``paper``
(DeepLab-v2 R101, GTA5 720x1280, BN frozen), ``synthia``.

``paper`` targets GTA5 -> Cityscapes 36.6 mIoU (DeepLab-v2 R101, ImageNet+COCO
init; CRST's re-run: 33.35), METHODS.md §14.1. Real data and weights for
``paper``: experiments/configs/common.py.
"""

from experiments.configs import common

VARIANTS = common.variants(synthia=common.SYNTHIA)
PUBLISHED = {"paper": "36.6 (CRST re-run 33.35)"}


def get_config(variant: str = ""):
  c = common.get_base_config()
  c.method = "source_only"
  return common.apply_variant(c, variant, VARIANTS)
