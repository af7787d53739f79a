"""CRST-MRKLD: confidence-regularised self-training (Zou et al., ICCV 2019).

Run:
  python -m experiments.crst --config=experiments/configs/crst.py
Variants (``VARIANTS``): ``tiny``, ``paper`` (CRST's recipe, 3 rounds,
the paper's MRKLD α = 0.1; see tpld.py), ``code`` (the released code's
effective 0.01, which produced the README's 47.39), ``lrent`` (CRST-LRENT:
soft pseudo labels with α = 0.25 instead of MRKLD; with ``paper`` it
targets the CRST re-run's 46.51). ``crst:V`` equals ``tpld:crst,V`` (but
``lrent``, which TPLD does not offer).

``paper,code`` targets GTA5 -> Cityscapes 47.39 mIoU (CRST-MRKLD, R101, CRST
README); ``paper`` the paper's 47.1 (UNVERIFIED), METHODS.md §14.1, §6.2.
Real data and weights for ``paper``: experiments/configs/common.py.
"""

from experiments.configs import common
from experiments.configs import tpld

VARIANTS = tpld.CRST_VARIANTS
PUBLISHED = {"paper": "47.1 (UNVERIFIED)", "paper,code": "47.39",
             "paper,lrent": "46.51 (CRST re-run)"}


def get_config(variant: str = ""):
  return common.apply_variant(tpld.base_config("crst"), variant, VARIANTS)
