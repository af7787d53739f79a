"""TADA: transferable local + global attention (classification, digits).

A reimplementation (no official code): local attention w = 1 - H(d̂) from
one region discriminator per position of the last conv map (K = 49), the
residual (1 + w) f, global attention 1 + H(d̂) on the attentive entropy,
objective L_y + γ L_h + λ (L_g + L_l) with GRLs, γ = 0.1, λ = 1.0.

Run:
  python -m experiments.tada --config=experiments/configs/tada.py
Variants (comma-separated, see classification_common): ``tiny``,
``mnist_m``, ``resnet50``, ``paper``, ``tllib``; and the ablations
(``ABLATIONS``, at most one, in any position; the full method is the
default):

* ``local_only``: region discriminators + local attention + L_h with m = 1;
  no global adversarial gradient (``tada.lambda_global = 0``: the global D
  still trains on the features as a probe, nothing flows back) and no
  global attention (``tada.global_attention = False``).
* ``global_only``: the global discriminator + global attention + L_h; no
  region discriminators, no local attention (``lambda_local = 0``,
  ``local_attention_form = 'none'``).
* ``entropy_only``: L_y + γ·mean H(p) alone (both of the above off; the
  global D is only a probe).

``paper`` targets Office-31 88.4 % average accuracy (A->W 94.3, ResNet-50,
SECONDARY) and Office-Home 67.6 %, METHODS.md §14.4. ``paper`` on Office-31:
``--config.source.name=office31:amazon --config.target.name=office31:webcam``
with ``data_dir`` at the dataset root (layout: jaxda/data/office.py); ImageNet
init: ``--config.model.init_weights=DIR`` from ``experiments.import_weights
--arch=torchvision_resnet50 --drop=fc`` (torchvision's resnet50 file).
"""

from experiments.configs import classification_common


def _no_global(c):
  c.tada.lambda_global = 0.0
  c.tada.global_attention = False


def _no_local(c):
  c.tada.lambda_local = 0.0
  c.tada.local_attention_form = "none"


def _entropy_only(c):
  _no_global(c)
  _no_local(c)


# Ablations of the full method: they set only ``tada.*`` fields that no
# classification_common variant touches, so their position does not matter.
ABLATIONS = {"local_only": _no_global, "global_only": _no_local,
             "entropy_only": _entropy_only}


def get_config(variant: str = ""):
  c = classification_common.get_base_config()
  c.method = "tada"
  tokens = [t.strip() for t in (variant or "").split(",") if t.strip()]
  ablations = [t for t in tokens if t in ABLATIONS]
  if len(ablations) > 1:
    raise ValueError(f"config variants {ablations[0]!r} and {ablations[1]!r}"
                     " conflict (TADA ablations); pick one")
  known = set(classification_common.VARIANTS) | set(ABLATIONS)
  unknown = [t for t in tokens if t not in known]
  if unknown:
    raise ValueError(f"unknown config variant {unknown[0]!r}; known: "
                     + ", ".join(sorted(known)))
  for t in ablations:
    ABLATIONS[t](c)
  return classification_common.apply_variant(
      c, ",".join(t for t in tokens if t not in ABLATIONS))
