"""Source-only and target-oracle baselines: supervised segmentation.

Source-only never passes a target image through the network during training,
so target batches cannot leak into BatchNorm statistics (the AdaptSegNet
λ_adv = 0 trap, METHODS.md §3.6, §15.1). The oracle is the same step trained
on labelled target images: the upper bound every table needs.
"""

from __future__ import annotations

import jax

from jaxda.methods import base


def make_supervised_step(domain: str):
  """Builds the supervised step factory for ``domain`` ('source'/'target')."""

  def make_step(models: base.Models, config, tx, disc_tx=None):
    del disc_tx
    bn_mode = config.model.bn_mode
    lambda_aux = config.loss.lambda_seg_aux
    align = config.model.upsample_align_corners

    def step(state, batch, rng):
      del rng  # Deterministic step: no dropout, no augmentation in-graph.
      data = batch[domain]
      size = data["image"].shape[1:3]

      def loss_fn(params):
        outputs, stats = base.forward(models, params, state.batch_stats,
                                      data["image"], bn_mode=bn_mode,
                                      labelled=True)
        logits = base.upsample_outputs(outputs, size, align_corners=align)
        loss, metrics = base.segmentation_loss(logits, data["label"],
                                               lambda_aux=lambda_aux)
        return loss, (stats, metrics)

      (loss, (stats, metrics)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(state.params)
      params, opt_state = base.apply_updates(tx, grads, state.opt_state,
                                             state.params)
      new_state = state.replace(step=state.step + 1, params=params,
                                batch_stats=stats, opt_state=opt_state)
      metrics = dict(metrics, loss=loss, grad_norm=base.global_norm(grads))
      return new_state, metrics

    return step

  return make_step


SOURCE_ONLY = base.Method(
    name="source_only", make_step=make_supervised_step("source"),
    uses_target_images=False)
ORACLE = base.Method(
    name="oracle", make_step=make_supervised_step("target"),
    uses_target_images=True, uses_source_images=False,
    target_labels="ground_truth")
