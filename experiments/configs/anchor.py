"""Anchor tasks (Li et al., WACV 2021): MTL variants and HeadFreeze.

Main task: per-pixel depth (default) or surface normals (``normals``), labelled in the source only (target depth is
read by evaluation alone). Anchor task: semantic segmentation, labelled in
both domains.

Run:
  python -m experiments.anchor --config=experiments/configs/anchor.py
The default is MTL-a + HeadFreeze (phase 1 already MTL-a: jaxda's
schedule, kept as the default; ``seed_schedule`` is the seed's). Variants (comma-separated):
  ``mtl_src``   main + anchor on the source only
  ``mtl_smta``  main on the source, anchor on the target only
  ``mtl_a``     main + anchor on the source, anchor on the target
  ``freeze``    the 1000-step MTL run, then 200 HeadFreeze steps (decoder +
                heads frozen, fresh poly schedule from 1e-4)
  ``no_freeze`` one phase of ``num_steps`` (the plain MTL variant)
  ``seed_schedule`` HeadFreeze as the seed describes it: phase 1 = Eq. 4
                (source main + anchor, no target) for 1000 steps, phase 2 =
                Eq. 6 (+ target anchor) for 500 steps on a fresh poly
                schedule from 1e-3 with decoder + heads frozen (not with
                ``mtl_*``, which set both phases' weights)
  ``unfrozen``  phase 2 trains every layer: the compute-matched control of
                ``freeze`` / ``seed_schedule``
  ``target_phase2`` phase 2 on the target anchor loss alone (no source
                terms): what the frozen decoder and heads preserve
  ``adversarial`` + output-space discriminator on the main output
  ``normals``   surface normals as the main task (the paper's), cosine loss;
                summary ``target``: ``mean_angle_error``,
                ``median_angle_error`` (degrees), ``within_11_25``,
                ``within_22_5``, ``within_30`` (%) and the anchor mIoU.
                Data: the embedded benchmark's normals (from its scene
                geometry) or a folder data set with
                ``DIR/{train,val}/normals/<stem>.npy`` (H, W, 3) unit
                vectors (zero = none), e.g. SUNCG / NYUv2 exports
  ``tiny``      a few steps on small images (tests)
e.g. ``:mtl_a,no_freeze`` or ``:mtl_src,freeze,tiny``.

No ``paper`` variant: the paper's numbers were not obtained and its setting
(SUNCG -> NYUv2 surface normals) has no jaxda reader (METHODS.md §11, §14.6).
"""

import ml_collections

from experiments.configs import common

# Phase 1 is the full MTL run (its poly schedule ends at 0); HeadFreeze adds
# _PHASE2_STEPS steps on a fresh schedule from _PHASE2_LR (README: against
# carving phase 2 out of the 1000 steps).
_PHASE1_STEPS = 1000
_PHASE2_STEPS = 200
_PHASE2_LR = 1e-4


def _weights(source_main, source_anchor, target_anchor):
  w = ml_collections.ConfigDict()
  w.source_main = source_main  # weight of the depth loss on source
  w.source_anchor = source_anchor  # weight of the anchor CE on source
  w.target_anchor = target_anchor  # weight of the anchor CE on target
  return w


def _set_variant(c, name, source_anchor, target_anchor):
  c.anchor.name = name
  c.anchor.weights.source_anchor = source_anchor
  c.anchor.weights.target_anchor = target_anchor
  c.anchor.phase2_weights.source_anchor = source_anchor
  c.anchor.phase2_weights.target_anchor = target_anchor


def _mtl_src(c):
  _set_variant(c, "mtl_src", 1.0, 0.0)


def _mtl_smta(c):
  _set_variant(c, "mtl_smta", 0.0, 1.0)


def _mtl_a(c):
  _set_variant(c, "mtl_a", 1.0, 1.0)


def _freeze(c):
  c.num_steps = _PHASE1_STEPS + _PHASE2_STEPS
  c.anchor.phase2_steps = _PHASE2_STEPS
  c.anchor.phase2_learning_rate = _PHASE2_LR


# The seed's schedule: phase 2 must learn the target anchor through the
# early layers alone, so it is longer and starts at the base LR.
_SEED_PHASE2_STEPS = 500
_SEED_PHASE2_LR = 1e-3


def _seed_schedule(c):
  c.anchor.name = "seed_schedule"
  c.num_steps = _PHASE1_STEPS + _SEED_PHASE2_STEPS
  c.anchor.weights = _weights(1.0, 1.0, 0.0)  # Eq. 4: source only
  c.anchor.phase2_weights = _weights(1.0, 1.0, 1.0)  # Eq. 6
  c.anchor.phase2_steps = _SEED_PHASE2_STEPS
  c.anchor.phase2_learning_rate = _SEED_PHASE2_LR


def _unfrozen(c):
  c.anchor.phase2_freeze = False


def _target_phase2(c):
  c.anchor.phase2_weights = _weights(0.0, 0.0, 1.0)


def _no_freeze(c):
  c.num_steps = _PHASE1_STEPS
  c.anchor.phase2_steps = 0
  c.anchor.phase2_learning_rate = -1.0


def _adversarial(c):
  c.anchor.lambda_adv = 0.001
  c.anchor.adv_input = "main"


def _normals(c):
  c.method = "anchor_normals"
  c.task = "normals"


def _tiny(c):
  common.apply_variant(c, "tiny")
  c.num_steps = 4
  c.anchor.decoder_features = 16
  if c.anchor.phase2_steps:
    c.anchor.phase2_steps = 2


def get_config(variant: str = ""):
  tokens = {t.strip() for t in (variant or "").split(",")}
  clash = sorted(tokens & {"mtl_src", "mtl_smta", "mtl_a", "no_freeze",
                           "target_phase2"})
  if "seed_schedule" in tokens and clash:
    raise ValueError(f"config variant 'seed_schedule' sets both phases'"
                     f" weights and steps; drop {clash[0]!r}")
  c = common.get_base_config()
  c.method = "anchor"
  c.task = "depth"  # depth main task + segmentation anchor (jaxda.tasks.depth)
  c.num_steps = _PHASE1_STEPS + _PHASE2_STEPS  # both phases
  c.optim.optimizer = "adam"  # from-scratch multi-task net: Adam is robust
  c.optim.learning_rate = 1e-3  # Adam LR (poly decay over phase 1)
  c.optim.weight_decay = 0.0  # no coupled L2 with Adam
  c.optim.head_lr_mult = 1.0  # task heads at the base LR

  c.anchor = ml_collections.ConfigDict()
  c.anchor.name = "mtl_a"  # variant label written to the summary
  c.anchor.weights = _weights(1.0, 1.0, 1.0)  # phase-1 (or only) weights
  c.anchor.phase2_weights = _weights(1.0, 1.0, 1.0)  # HeadFreeze phase 2
  c.anchor.phase2_steps = _PHASE2_STEPS  # HeadFreeze steps (last); 0 = off
  c.anchor.late_regexes = (r"^decoder/", r"^head_")  # frozen in phase 2
  c.anchor.phase2_freeze = True  # False: phase 2 trains all (the control)
  c.anchor.phase2_learning_rate = _PHASE2_LR  # <0: continue global schedule
  c.anchor.phase2_carry_moments = False  # keep early layers' Adam moments
  c.anchor.lambda_adv = 0.0  # output-space adversarial weight; 0 = off
  c.anchor.adv_input = "main"  # D input: 'main' | 'anchor' | 'both'
  c.anchor.max_depth = 40.0  # clip of predicted depth in evaluation
  c.anchor.decoder_features = 64  # channels of the shared decoder convs
  return common.apply_variant(c, variant, {
      "mtl_src": _mtl_src, "mtl_smta": _mtl_smta, "mtl_a": _mtl_a,
      "freeze": _freeze, "no_freeze": _no_freeze,
      "adversarial": _adversarial, "normals": _normals, "tiny": _tiny,
      "seed_schedule": _seed_schedule, "unfrozen": _unfrozen,
      "target_phase2": _target_phase2})
