"""DANN: gradient reversal + MLP domain discriminator (classification).

The paper's GRL ramp 2/(1 + exp(-10 p)) - 1 and LR annealing
0.01 / (1 + 10 p)^0.75; the discriminator sees the bottleneck features.

Run:
  python -m experiments.dann --config=experiments/configs/dann.py
Variants (comma-separated, see classification_common): ``tiny``,
``mnist_m``, ``resnet50``, ``paper``, ``tllib``.
"""

from experiments.configs import classification_common


def get_config(variant: str = ""):
  c = classification_common.get_base_config()
  c.method = "dann"
  return classification_common.apply_variant(c, variant)
