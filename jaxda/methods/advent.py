"""ADVENT (Vu et al., CVPR 2019): AdvEnt and MinEnt.

AdvEnt is the AdaptSegNet step with the weighted self-information map as the
discriminator input and BCE as the GAN loss. MinEnt replaces the adversary by
a direct entropy penalty on target predictions:
``L = CE_src + λ_main · L_ent(main) + λ_aux · L_ent(aux)``.
"""

from __future__ import annotations

import jax

from jaxda import losses
from jaxda.methods import adversarial
from jaxda.methods import base

ADVENT = base.Method(
    name="advent",
    make_step=adversarial.make_adversarial_step("entropy"),
    discriminator_inputs="entropy")


def make_minent_step(models: base.Models, config, tx, disc_tx=None):
  """MinEnt step: source CE plus weighted target entropy per level."""
  del disc_tx
  levels = base.output_levels(config)
  bn_mode = config.model.bn_mode
  align = config.model.upsample_align_corners
  lambda_aux = config.loss.lambda_seg_aux
  lambda_ent = {"main": config.minent.lambda_ent_main,
                "aux": config.minent.lambda_ent_aux}

  def step(state, batch, rng):
    del rng
    src, tgt = batch["source"], batch["target"]

    def loss_fn(params):
      seg, metrics, stats, _ = base.supervised_pass(
          models, params, state.batch_stats, src, bn_mode=bn_mode,
          align_corners=align, lambda_aux=lambda_aux)
      logits_t, stats = base.target_pass(models, params, stats, tgt["image"],
                                         bn_mode=bn_mode, align_corners=align)
      ent_total = 0.0
      for level in levels:
        ent = losses.minent_loss(jax.nn.softmax(logits_t[level], axis=-1))
        metrics[f"ent_{level}"] = ent
        ent_total = ent_total + lambda_ent[level] * ent
      metrics["seg_loss"] = seg
      return seg + ent_total, (stats, metrics)

    return base.minimize(state, tx, loss_fn, base.frozen_regexes(config))

  return step


MINENT = base.Method(name="minent", make_step=make_minent_step)
