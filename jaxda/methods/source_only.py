"""Source-only and target-oracle baselines: supervised segmentation.

Source-only never passes a target image through the network during training,
so target batches cannot leak into BatchNorm statistics (the AdaptSegNet
λ_adv = 0 trap, METHODS.md §3.6, §15.1). The oracle is the same step trained
on labelled target images: the upper bound every table needs.
"""

from __future__ import annotations

from jaxda.methods import base


def make_supervised_step(domain: str):
  """Builds the supervised step factory for ``domain`` ('source'/'target')."""

  def make_step(models: base.Models, config, tx, disc_tx=None):
    del disc_tx
    frozen = base.frozen_regexes(config)
    kwargs = dict(bn_mode=config.model.bn_mode,
                  align_corners=config.model.upsample_align_corners,
                  lambda_aux=config.loss.lambda_seg_aux)

    def step(state, batch, rng):
      del rng  # Deterministic step: no dropout, no augmentation in-graph.

      def loss_fn(params):
        loss, metrics, stats, _ = base.supervised_pass(
            models, params, state.batch_stats, batch[domain], **kwargs)
        return loss, (stats, metrics)

      return base.minimize(state, tx, loss_fn, frozen)

    return step

  return make_step


SOURCE_ONLY = base.Method(
    name="source_only", make_step=make_supervised_step("source"),
    uses_target_images=False)
ORACLE = base.Method(
    name="oracle", make_step=make_supervised_step("target"),
    uses_target_images=True, uses_source_images=False,
    target_labels="ground_truth")
