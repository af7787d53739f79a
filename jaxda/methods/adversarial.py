"""Output-space adversarial adaptation: the step AdaptSegNet and ADVENT share.

One iteration of the originals (METHODS.md §4.3): segmentation loss on the
source, adversarial loss on the target with D fixed, then D on detached
outputs, then the three optimiser steps. All three gradients are taken before
any parameter changes, so computing the generator gradient w.r.t. the
segmenter only and the D gradient w.r.t. D only on ``stop_gradient``-ed maps,
then applying both updates, is exactly the original update.

Label convention of the originals: source = 0, target = 1; the segmenter
pushes target outputs towards 0.

AdaptSegNet feeds D the softmax ``σ(up(P))``; ADVENT feeds the weighted
self-information map ``I(σ(up(P)))`` and always uses BCE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxda import losses
from jaxda.methods import base


def discriminator_input(logits: jax.Array, kind: str) -> jax.Array:
  """Maps upsampled logits (B, H, W, C) to what D sees (B, H, W, C)."""
  probs = jax.nn.softmax(logits, axis=-1)
  if kind == "softmax":
    return probs
  if kind == "entropy":
    return losses.weighted_self_information(probs)
  raise ValueError(f"unknown discriminator input {kind!r}")


def make_adversarial_step(disc_input: str):
  """Step factory for ``disc_input`` in {'softmax', 'entropy'}."""

  def make_step(models: base.Models, config, tx, disc_tx):
    levels = base.output_levels(config)
    bn_mode = config.model.bn_mode
    align = config.model.upsample_align_corners
    gan = config.adversarial.gan
    lambda_aux = config.loss.lambda_seg_aux
    lambda_adv = {"main": config.adversarial.lambda_adv_main,
                  "aux": config.adversarial.lambda_adv_aux}
    disc = models.discriminator

    def step(state, batch, rng):
      del rng
      src, tgt = batch["source"], batch["target"]

      def generator_loss(params):
        # Source pass, then target pass, in the originals' order: with
        # bn_mode='train' both update the running statistics in turn.
        seg, metrics, stats, logits_s = base.supervised_pass(
            models, params, state.batch_stats, src, bn_mode=bn_mode,
            align_corners=align, lambda_aux=lambda_aux)
        logits_t, stats = base.target_pass(models, params, stats,
                                           tgt["image"], bn_mode=bn_mode,
                                           align_corners=align)
        adv = 0.0
        d_inputs = {}
        for level in levels:
          d_in_s = discriminator_input(logits_s[level], disc_input)
          d_in_t = discriminator_input(logits_t[level], disc_input)
          d_out_t = disc.apply({"params": state.disc_params[level]}, d_in_t)
          adv_level = losses.generator_adv_loss(d_out=d_out_t, gan=gan)
          metrics[f"adv_{level}"] = adv_level
          adv = adv + lambda_adv[level] * adv_level
          d_inputs[level] = (d_in_s, d_in_t)
        metrics["seg_loss"] = seg
        return seg + adv, (stats, metrics, d_inputs)

      (loss, (stats, metrics, d_inputs)), grads = jax.value_and_grad(
          generator_loss, has_aux=True)(state.params)

      # Discriminators see the detached maps: no gradient reaches the
      # segmenter from L_D.
      d_inputs = jax.lax.stop_gradient(d_inputs)

      def disc_loss(disc_params):
        total = 0.0
        d_metrics = {}
        for level in levels:
          d_in_s, d_in_t = d_inputs[level]
          d_out_s = disc.apply({"params": disc_params[level]}, d_in_s)
          d_out_t = disc.apply({"params": disc_params[level]}, d_in_t)
          l_d = losses.discriminator_loss(d_out_source=d_out_s,
                                          d_out_target=d_out_t, gan=gan)
          d_metrics[f"disc_{level}"] = l_d
          # Accuracy of D at telling the domains apart (0.5 = confused).
          boundary = 0.5 if gan.lower() == "ls" else 0.0
          d_metrics[f"disc_acc_{level}"] = 0.5 * (
              jnp.mean(d_out_s < boundary) + jnp.mean(d_out_t >= boundary))
          total = total + l_d
        return total, d_metrics

      (_, d_metrics), d_grads = jax.value_and_grad(
          disc_loss, has_aux=True)(state.disc_params)
      new_state = base.update_segmenter(state, tx, grads, stats)
      new_state = base.update_discriminators(new_state, disc_tx, d_grads)
      metrics = dict(metrics, **d_metrics, loss=loss,
                     grad_norm=base.trainable_norm(
                         grads, base.frozen_regexes(config)))
      return new_state, metrics

    return step

  return make_step
