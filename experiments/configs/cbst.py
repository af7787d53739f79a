"""CBST: class-balanced self-training (Zou et al., ECCV 2018) — TPLD's base.

Run:
  python -m experiments.cbst --config=experiments/configs/cbst.py
Variants (``VARIANTS``): ``tiny``, ``paper`` (CRST's PyTorch recipe, 3
rounds, plain CE, no MRKLD; see tpld.py), ``vgg`` (DeepLab-v2 VGG-16; no
published CBST number with it). ``cbst:V`` equals ``tpld:cbst,V``.

``paper`` targets GTA5 -> Cityscapes 46.47 mIoU (CBST, R101, CRST's PyTorch re-
run; paper 45.9, UNVERIFIED), METHODS.md §14.1. Real data and weights for
``paper``: experiments/configs/common.py.
"""

from experiments.configs import common
from experiments.configs import tpld

VARIANTS = tpld.CBST_VARIANTS
PUBLISHED = {"paper": "46.47 (CRST re-run)", "paper,vgg": "— (none published)"}


def get_config(variant: str = ""):
  return common.apply_variant(tpld.base_config("cbst"), variant, VARIANTS)
