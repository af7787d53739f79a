"""DANN: gradient reversal + MLP domain discriminator (classification).

The paper's GRL ramp 2/(1 + exp(-10 p)) - 1 and LR annealing
0.01 / (1 + 10 p)^0.75; the discriminator sees the bottleneck features.

Run:
  python -m experiments.dann --config=experiments/configs/dann.py
Variants (comma-separated, see classification_common): ``tiny``,
``mnist_m``, ``resnet50``, ``paper``, ``tllib``.

G_d sees the bottleneck features (thuml/tllib, and TADA's global D);
``--config.adversarial.dann_features=pooled`` gives it the flattened conv
features instead (the DANN paper's digits placement).

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
  # G_d on the bottleneck (classification_common's default). Chosen on the
  # digits development shift `mnist_m` at the 4500-step default: seeds 0, 1
  # gave 65.9 / 72.9 on the bottleneck and 61.5 / 40.6 on the conv features
  # (results/digits_dann_bottleneck_4500_steps, digits_shifts_4500_steps);
  # at 1500 steps the conv features had won (README).
  c.adversarial.dann_features = "bottleneck"
  return classification_common.apply_variant(c, variant)
