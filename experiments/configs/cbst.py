"""CBST: class-balanced self-training (Zou et al., ECCV 2018) — TPLD's base.

Run:
  python -m experiments.cbst --config=experiments/configs/cbst.py
Variants: ``tiny``, ``paper`` (see tpld.py).

``paper`` targets GTA5 -> Cityscapes 46.47 mIoU (CBST, R101, CRST's PyTorch re-
run; paper 45.9, UNVERIFIED), METHODS.md §14.1. Real data and weights for
``paper``: experiments/configs/common.py.
"""

from experiments.configs import tpld


def get_config(variant: str = ""):
  return tpld.get_config(",".join(["cbst"] + [v for v in variant.split(",")
                                              if v]))
