"""Source-only classification baseline: supervised on source, evaluated on
target (no target image touches training).

Run:
  python -m experiments.source_only_cls --config=experiments/configs/source_only_cls.py
Variants (comma-separated, see classification_common): ``tiny``,
``mnist_m``, ``resnet50``, ``paper``, ``tllib``.
"""

from experiments.configs import classification_common


def get_config(variant: str = ""):
  c = classification_common.get_base_config()
  c.method = "source_only_cls"
  return classification_common.apply_variant(c, variant)
