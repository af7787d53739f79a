"""Target-oracle classification: supervised on labelled target train images,
evaluated on target val (the upper bound).

Run:
  python -m experiments.oracle_cls --config=experiments/configs/oracle_cls.py
Variants (comma-separated, see classification_common): ``tiny``,
``mnist_m``, ``resnet50``, ``paper``, ``tllib``.

``paper``: no published target-oracle accuracy (METHODS.md §14.4 lists none).
``paper`` on Office-31: ``--config.source.name=office31:amazon
--config.target.name=office31:webcam`` with ``data_dir`` at the dataset root
(layout: jaxda/data/office.py); ImageNet init:
``--config.model.init_weights=DIR`` from ``experiments.import_weights
--arch=torchvision_resnet50 --drop=fc`` (torchvision's resnet50 file).
"""

from experiments.configs import classification_common


def get_config(variant: str = ""):
  c = classification_common.get_base_config()
  c.method = "oracle_cls"
  return classification_common.apply_variant(c, variant)
