"""Source-only classification baseline: supervised on source, evaluated on
target (no target image touches training).

Run:
  python -m experiments.source_only_cls --config=experiments/configs/source_only_cls.py
Variants (comma-separated, see classification_common): ``tiny``,
``mnist_m``, ``resnet50``, ``paper``, ``tllib``.

``paper`` targets Office-31 76.1 % average accuracy (ResNet-50, ImageNet init;
tllib ERM 79.5), METHODS.md §14.4. ``paper`` on Office-31:
``--config.source.name=office31:amazon --config.target.name=office31:webcam``
with ``data_dir`` at the dataset root (layout: jaxda/data/office.py); ImageNet
init: ``--config.model.init_weights=DIR`` from ``experiments.import_weights
--arch=torchvision_resnet50 --drop=fc`` (torchvision's resnet50 file).
"""

from experiments.configs import classification_common


def get_config(variant: str = ""):
  c = classification_common.get_base_config()
  c.method = "source_only_cls"
  return classification_common.apply_variant(c, variant)
