"""CRST-MRKLD: confidence-regularised self-training (Zou et al., ICCV 2019).

Run:
  python -m experiments.crst --config=experiments/configs/crst.py
Variants: ``tiny``, ``paper`` (see tpld.py).
"""

from experiments.configs import tpld


def get_config(variant: str = ""):
  return tpld.get_config(",".join(["crst"] + [v for v in variant.split(",")
                                              if v]))
