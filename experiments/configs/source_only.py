"""Source-only baseline: supervised on source, evaluated on target.

Run:
  python -m experiments.source_only --config=experiments/configs/source_only.py
Variants: ``:tiny`` (smoke test), ``:paper`` (DeepLab-v2 R101, 512x1024).
"""

from experiments.configs import common


def get_config(variant: str = ""):
  c = common.get_base_config()
  c.method = "source_only"
  return common.apply_variant(c, variant)
