"""CRST-MRKLD: confidence-regularised self-training (Zou et al., ICCV 2019).

Run:
  python -m experiments.crst --config=experiments/configs/crst.py
Variants: ``tiny``, ``paper`` (see tpld.py).

``paper`` targets GTA5 -> Cityscapes 47.39 mIoU (CRST-MRKLD, R101, CRST README;
paper 47.1, UNVERIFIED), METHODS.md §14.1. Real data and weights for ``paper``:
experiments/configs/common.py.
"""

from experiments.configs import tpld


def get_config(variant: str = ""):
  return tpld.get_config(",".join(["crst"] + [v for v in variant.split(",")
                                              if v]))
