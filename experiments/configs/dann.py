"""DANN: gradient reversal + MLP domain discriminator (classification).

The paper's GRL ramp 2/(1 + exp(-10 p)) - 1 and LR annealing
0.01 / (1 + 10 p)^0.75; the discriminator sees the bottleneck features.

Run:
  python -m experiments.dann --config=experiments/configs/dann.py
Variants (comma-separated, see classification_common): ``tiny``,
``mnist_m``, ``resnet50``, ``paper``, ``tllib``.

G_d sees the flattened conv features on the digits networks (the DANN
paper's placement) and the bottleneck on ResNet-50 (``resnet50``,
``paper``: thuml/tllib).

``paper`` targets Office-31 82.2 % average accuracy (original DANN, ResNet-50;
A->W 82.0; tllib's recipe 86.1), METHODS.md §14.4. ``paper`` on Office-31:
``--config.source.name=office31:amazon --config.target.name=office31:webcam``
with ``data_dir`` at the dataset root (layout: jaxda/data/office.py); ImageNet
init: ``--config.model.init_weights=DIR`` from ``experiments.import_weights
--arch=torchvision_resnet50 --drop=fc`` (torchvision's resnet50 file).
"""

from experiments.configs import classification_common


def get_config(variant: str = ""):
  c = classification_common.get_base_config()
  c.method = "dann"
  # G_d on the flattened conv features, where the DANN paper attaches it in
  # its digits networks (the ResNet variants switch to the bottleneck, as
  # thuml/tllib). Chosen on the digits development shift `mnist_m` (seeds
  # 0, 1: 58.6 / 65.5 vs 44.6 / 58.5 on the bottleneck; README).
  c.adversarial.dann_features = "pooled"
  return classification_common.apply_variant(c, variant)
