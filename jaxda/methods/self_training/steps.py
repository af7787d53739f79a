"""Self-training steps: CBST, CRST (MRKLD) and TPLD phases 1 and 2.

The pseudo labels are computed between rounds by
``jaxda.methods.self_training.rounds`` (the round driver) and arrive in the
target batch:

  ``batch['target']['pl_label']``   (B, H, W) uint8 class ids, IGNORE_LABEL
                                    (``jaxda.types``) = none
  ``batch['target']['pl_weight']``  (B, H, W) float32 per-pixel weight
  ``batch['target']['thresholds']`` (B, C) λ of the round (same every row)
  ``batch['target']['is_easy']``    (B,) bool, phase 2 only
  ``batch['target']['pl_soft']``    (B, H, W, C) float16 CRST-LRENT soft
                                    labels (``target_loss='lrent'``; all
                                    zero where ``pl_label`` is IGNORE_LABEL)

Phase 1 (CBST / CRST / TPLD-1): source CE + target term on the pseudo labels
(plain CE for CBST, soft CE on the LRENT soft labels for CRST-LRENT, the
TPLD bootstrapped term otherwise) + the MRKLD regulariser on
pseudo-labelled pixels (METHODS.md §6.2, §7.1, §7.2).

Phase 2 (TPLD-2, §7.3): easy images train on their full pseudo labels with
the bootstrapped term (per-pixel weights (p/λ)^γ below the threshold); hard
images are pushed towards easy ones by an entropy-map discriminator:
D learns easy = 1, hard = 0, the segmenter pushes hard maps towards 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxda import losses
from jaxda.methods import base
from jaxda.types import IGNORE_LABEL


def _target_term(logits, labels, thresholds, weights, *, kind, beta,
                 stop_gradient_prediction, apply_to="labeled", soft=None):
  """Target loss on pseudo labels for one output level."""
  if kind == "lrent":
    # CRST-LRENT: -sum_k soft_k log p_k, mean over the kept pixels.
    return losses.soft_cross_entropy(
        logits=logits, targets=jax.lax.stop_gradient(
            soft.astype(jnp.float32)), mask=labels != IGNORE_LABEL)
  if kind == "ce":
    return losses.softmax_cross_entropy(logits=logits, labels=labels,
                                        weights=weights)
  if kind == "bootstrap":
    return losses.tpld_bootstrap_loss(
        logits=logits, labels=labels, thresholds=thresholds, beta=beta,
        apply_to=apply_to,
        stop_gradient_prediction=stop_gradient_prediction, weights=weights)
  raise ValueError(f"unknown target loss {kind!r}; use 'ce', 'lrent' or"
                   " 'bootstrap'")


def _per_example_bce(d_out: jax.Array, target: float) -> jax.Array:
  """(B, h, w, 1) D logits -> (B,) mean BCE per example."""
  return jax.vmap(lambda d: losses.bce_with_logits(d, target))(d_out)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _source_term(models, config, params, stats, src, weight):
  """Weighted source CE: ``(weight * loss, metrics, batch_stats)``."""
  seg, metrics, stats, _ = base.supervised_pass(
      models, params, stats, src, bn_mode=config.model.bn_mode,
      align_corners=config.model.upsample_align_corners,
      lambda_aux=config.loss.lambda_seg_aux)
  return weight * seg, dict(metrics, seg_loss=seg), stats


def _self_training_loss(models, config, params, batch_stats, src, tgt, *,
                        source_weight, kind, mrkld_weight, prefix):
  """Source CE + pseudo-label term (+ MRKLD) over every output level.

  Returns:
    ``(total, metrics, batch_stats, target_logits)``.
  """
  st = config.self_training
  lambda_aux = config.loss.lambda_seg_aux
  labels = tgt["pl_label"].astype(jnp.int32)
  thresholds = tgt["thresholds"][0]
  metrics, total = {}, 0.0
  if source_weight:
    total, metrics, batch_stats = _source_term(models, config, params,
                                               batch_stats, src, source_weight)
  logits_t, batch_stats = base.target_pass(
      models, params, batch_stats, tgt["image"], bn_mode=config.model.bn_mode,
      align_corners=config.model.upsample_align_corners)
  for level, logit in logits_t.items():
    w = 1.0 if level == "main" else lambda_aux
    term = _target_term(
        logit, labels, thresholds, tgt["pl_weight"], kind=kind, beta=st.beta,
        stop_gradient_prediction=st.stop_gradient_prediction,
        apply_to=st.get("bootstrap_apply_to", "labeled"),
        soft=tgt.get("pl_soft"))
    metrics[f"{prefix}_{level}"] = term
    total = total + st.target_weight * w * term
    if mrkld_weight:
      reg = losses.mrkld_loss(logits=logit, mask=labels != IGNORE_LABEL)
      metrics[f"mrkld_{level}"] = reg
      total = total + mrkld_weight * w * reg
  return total, metrics, batch_stats, logits_t


def make_phase1_step(models: base.Models, config, tx, disc_tx=None):
  """CBST/CRST/TPLD phase-1 step (no discriminator update)."""
  del disc_tx
  st = config.self_training

  def step(state, batch, rng):
    del rng
    src, tgt = batch["source"], batch["target"]
    labelled = tgt["pl_label"] != IGNORE_LABEL

    def loss_fn(params):
      total, metrics, stats, _ = _self_training_loss(
          models, config, params, state.batch_stats, src, tgt,
          source_weight=st.source_weight, kind=st.target_loss,
          mrkld_weight=st.mrkld_weight, prefix="target")
      metrics["pl_density"] = jnp.mean(labelled.astype(jnp.float32))
      return total, (stats, metrics)

    return base.minimize(state, tx, loss_fn, base.frozen_regexes(config))

  return step


def make_phase2_step(models: base.Models, config, tx, disc_tx):
  """TPLD phase-2 step: easy full labels + hard→easy adversarial."""
  st = config.self_training
  disc = models.discriminator

  def step(state, batch, rng):
    del rng
    src, tgt = batch["source"], batch["target"]
    easy = tgt["is_easy"]
    hard = jnp.logical_not(easy)

    def loss_fn(params):
      # Easy images carry full labels weighted by (p/λ)^γ; hard images carry
      # what the driver gave them (none, or the phase-1 voted labels).
      total, metrics, stats, logits_t = _self_training_loss(
          models, config, params, state.batch_stats, src, tgt,
          source_weight=st.phase2_source_weight, kind="bootstrap",
          mrkld_weight=0.0, prefix="easy")
      ent = losses.weighted_self_information(
          jax.nn.softmax(logits_t["main"], axis=-1))
      d_out = disc.apply({"params": state.disc_params["main"]}, ent)
      adv = _masked_mean(_per_example_bce(d_out, 1.0), hard)
      metrics["adv_hard"] = adv
      total = total + st.lambda_adv * adv
      return total, (stats, metrics, ent)

    (loss, (stats, metrics, ent)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    ent = jax.lax.stop_gradient(ent)

    def disc_loss(disc_params):
      d_out = disc.apply({"params": disc_params["main"]}, ent)
      l_easy = _masked_mean(_per_example_bce(d_out, 1.0), easy)
      l_hard = _masked_mean(_per_example_bce(d_out, 0.0), hard)
      return l_easy + l_hard, {"disc_easy": l_easy, "disc_hard": l_hard}

    (_, d_metrics), d_grads = jax.value_and_grad(
        disc_loss, has_aux=True)(state.disc_params)
    new_state = base.update_segmenter(state, tx, grads, stats)
    new_state = base.update_discriminators(new_state, disc_tx, d_grads)
    metrics = dict(metrics, **d_metrics, loss=loss,
                   easy_fraction=jnp.mean(easy.astype(jnp.float32)),
                   grad_norm=base.trainable_norm(
                       grads, base.frozen_regexes(config)))
    return new_state, metrics

  return step


# Registry entries; ``jaxda.methods`` adds the round driver (and TPLD's
# phase-2 step and its main-output discriminator).
CBST = base.Method(name="cbst", make_step=make_phase1_step,
                   target_labels="pseudo", warm_starts_from_source_only=True)
CRST = base.Method(name="crst", make_step=make_phase1_step,
                   target_labels="pseudo", warm_starts_from_source_only=True)
TPLD = base.Method(name="tpld", make_step=make_phase1_step,
                   target_labels="pseudo", discriminator_inputs="entropy",
                   warm_starts_from_source_only=True)
