"""Target-oracle classification: supervised on labelled target train images,
evaluated on target val (the upper bound).

Run:
  python -m experiments.oracle_cls --config=experiments/configs/oracle_cls.py
Variants (comma-separated, see classification_common): ``tiny``,
``mnist_m``, ``resnet50``, ``paper``, ``tllib``.
"""

from experiments.configs import classification_common


def get_config(variant: str = ""):
  c = classification_common.get_base_config()
  c.method = "oracle_cls"
  return classification_common.apply_variant(c, variant)
