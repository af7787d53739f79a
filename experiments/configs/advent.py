"""ADVENT: adversarial entropy minimisation (AdvEnt), or MinEnt.

Run:
  python -m experiments.advent --config=experiments/configs/advent.py
  python -m experiments.advent --config=experiments/configs/advent.py:minent
Variants (comma-separated): ``tiny``, ``paper``, ``minent``.
"""

from experiments.configs import common


def _minent(c):
  c.method = "minent"


def get_config(variant: str = ""):
  c = common.get_base_config()
  c.method = "advent"
  c.adversarial.gan = "vanilla"  # AdvEnt always uses BCE
  return common.apply_variant(c, variant, {"minent": _minent})
