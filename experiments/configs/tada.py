"""TADA: transferable local + global attention (classification, digits).

A reimplementation (no official code): local attention w = 1 - H(d̂) from
one region discriminator per position of the last conv map (K = 49), the
residual (1 + w) f, global attention 1 + H(d̂) on the attentive entropy,
objective L_y + γ L_h + λ (L_g + L_l) with GRLs, γ = 0.1, λ = 1.0.

Run:
  python -m experiments.tada --config=experiments/configs/tada.py
Variants (comma-separated, see classification_common): ``tiny``,
``mnist_m``, ``resnet50``, ``paper``, ``tllib``.
"""

from experiments.configs import classification_common


def get_config(variant: str = ""):
  c = classification_common.get_base_config()
  c.method = "tada"
  return classification_common.apply_variant(c, variant)
