"""Target oracle: supervised on labelled target images (the upper bound).

Run:
  python -m experiments.oracle --config=experiments/configs/oracle.py
Variants: ``:tiny``, ``:paper``.
"""

from experiments.configs import common


def get_config(variant: str = ""):
  c = common.get_base_config()
  c.method = "oracle"
  return common.apply_variant(c, variant)
