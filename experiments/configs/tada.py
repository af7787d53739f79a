"""TADA: transferable local + global attention (classification, digits).

A reimplementation (no official code): local attention w = 1 - H(d̂) from
one region discriminator per position of the last conv map (K = 49), the
residual (1 + w) f, global attention 1 + H(d̂) on the attentive entropy,
objective L_y + γ L_h + λ (L_g + L_l) with GRLs, γ = 0.1, λ = 1.0.

Run:
  python -m experiments.tada --config=experiments/configs/tada.py
Variants (comma-separated, see classification_common): ``tiny``,
``mnist_m``, ``resnet50``, ``paper``, ``tllib``.

``paper`` targets Office-31 88.4 % average accuracy (A->W 94.3, ResNet-50,
SECONDARY) and Office-Home 67.6 %, METHODS.md §14.4. ``paper`` on Office-31:
``--config.source.name=office31:amazon --config.target.name=office31:webcam``
with ``data_dir`` at the dataset root (layout: jaxda/data/office.py); ImageNet
init: ``--config.model.init_weights=DIR`` from ``experiments.import_weights
--arch=torchvision_resnet50 --drop=fc`` (torchvision's resnet50 file).
"""

from experiments.configs import classification_common


def get_config(variant: str = ""):
  c = classification_common.get_base_config()
  c.method = "tada"
  return classification_common.apply_variant(c, variant)
