"""CBST: class-balanced self-training (Zou et al., ECCV 2018) — TPLD's base.

Run:
  python -m experiments.cbst --config=experiments/configs/cbst.py
Variants: ``tiny``, ``paper`` (see tpld.py).
"""

from experiments.configs import tpld


def get_config(variant: str = ""):
  return tpld.get_config(",".join(["cbst"] + [v for v in variant.split(",")
                                              if v]))
