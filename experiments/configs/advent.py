"""ADVENT: adversarial entropy minimisation (AdvEnt), or MinEnt.

Run:
  python -m experiments.advent --config=experiments/configs/advent.py
  python -m experiments.advent --config=experiments/configs/advent.py:minent
Variants (comma-separated): ``tiny``, ``paper``, ``minent``.

``paper`` targets GTA5 -> Cityscapes 43.8 mIoU (AdvEnt, R101); ``paper,minent``
42.3 (UNVERIFIED); SYNTHIA -> Cityscapes 40.8 / 47.6 (16 / 13 classes,
UNVERIFIED). The published 45.5 is an AdvEnt + MinEnt ensemble, not one run.
METHODS.md §14.1, §14.3. Real data and weights for ``paper``:
experiments/configs/common.py.
"""

from experiments.configs import common


def _minent(c):
  c.method = "minent"


def get_config(variant: str = ""):
  c = common.get_base_config()
  c.method = "advent"
  c.adversarial.gan = "vanilla"  # AdvEnt always uses BCE
  return common.apply_variant(c, variant, {"minent": _minent})
