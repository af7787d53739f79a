"""DAM / GAM step: deep activation matching with a frozen source model.

Huang, Huang & Krähenbühl, ECCV 2018 (METHODS.md §10). ADDA-style two-model
set-up: the source network F_s (trained on source labels, then frozen) and a
target network F_t initialised from it. One iteration:

1. F_s (``state.source``, under ``stop_gradient``, BatchNorm running
   statistics, no matching) on the source batch gives A_i^s at every tapped
   layer i.
2. F_t on the target batch, with Gaussian i.i.d. matching at each tapped
   layer (batch statistics of this target batch mapped onto the stored
   source statistics, gradients through them as in BatchNorm), gives the
   matched Â_i^t; every later layer sees the matched activation.
3. Generator loss of F_t: ``Σ_i w_i · GAN(D_i(Â_i^t) → source)``
   ``+ λ · ‖θ_t − θ_s‖²`` (+ an optional source CE, off by default: ADDA and
   DAM train F_t without labels).
4. Each D_i on detached A_i^s (label 0) and Â_i^t (label 1).
5. Both updates, from gradients taken before any change (as the
   output-space adversarial step), and the running target statistics of
   every tapped layer move towards this batch's (BatchNorm-style average);
   inference matches with them.

Open choices (no segmentation code exists) are ``config.gam`` fields:
layers and their weights, drift weight and reduction, matching on/off,
discriminators on/off, GAN loss (``config.adversarial.gan``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxda import losses
from jaxda.methods import base
from jaxda.methods.gam import matching as am
from jaxda.methods.gam import taps as activation_taps
from jaxda.models import forward as forward_lib


def layer_weights(config) -> dict[str, float]:
  """``{layer key: adversarial weight}`` from ``config.gam``."""
  g = config.gam
  layers = tuple(g.layers)
  weights = tuple(g.layer_weights)
  if len(weights) != len(layers):
    raise ValueError(
        f"config.gam.layer_weights has {len(weights)} entries but"
        f" config.gam.layers has {len(layers)}; give one weight per layer")
  return {activation_taps.layer_key(p): float(w)
          for p, w in zip(layers, weights)}


def config_problems(config) -> list[str]:
  """Invalid ``config.gam`` values a user can fix, one line each."""
  g = config.gam
  problems = []
  if not g.layers:
    problems.append("config.gam.layers must name >= 1 layer")
  try:
    layer_weights(config)
  except ValueError as e:
    problems.append(str(e))
  if g.drift_reduction not in am.DRIFT_REDUCTIONS:
    problems.append(
        f"config.gam.drift_reduction must be one of {am.DRIFT_REDUCTIONS},"
        f" got {g.drift_reduction!r}")
  if not 0.0 <= g.stats_momentum < 1.0:
    problems.append("config.gam.stats_momentum must be in [0, 1)")
  return problems


def segmentation_source_loss(config):
  """``loss(outputs, images, labels) -> (loss, metrics)``: multi-level CE on
  upsampled logits (the optional source term of a segmentation run)."""
  align = config.model.upsample_align_corners
  lambda_aux = config.loss.lambda_seg_aux

  def loss(outputs, images, labels):
    logits = base.upsample_outputs(outputs, images.shape[1:3],
                                   align_corners=align)
    return base.segmentation_loss(logits, labels, lambda_aux=lambda_aux)

  return loss


def classification_source_loss(config):
  """``loss(outputs, images, labels)``: CE of a classifier's ``logits``."""
  del config

  def loss(outputs, images, labels):
    del images
    ce = losses.softmax_cross_entropy(logits=outputs["logits"],
                                      labels=labels)
    return ce, {"ce": ce}

  return loss


def make_step(models, config, tx, disc_tx, *,
              source_loss=segmentation_source_loss,
              frozen=base.frozen_regexes):
  """Builds the GAM step.

  Args:
    models: the task's models whose network (``segmenter`` or
      ``classifier``, ``taps.network_field``) is a
      ``jaxda.methods.gam.taps.ActivationTaps``; ``discriminator`` the
      per-layer activation discriminator (one parameter tree per layer key
      in ``state.disc_params``), or None for Gaussian matching only.
    config: the run config (``config.gam``, ``config.adversarial.gan``,
      ``config.model.bn_mode``).
    tx: optimiser of the target network.
    disc_tx: optimiser of the discriminators.
    source_loss: ``config -> loss(outputs, images, labels)``, the task's
      supervised loss (only with ``config.gam.source_weight`` > 0).
    frozen: ``config -> regexes`` of parameters the optimiser never updates
      (left out of ``grad_norm``).

  Returns:
    ``step(state, batch, rng) -> (state, metrics)`` over a
    ``jaxda.state.FrozenSourceTrainState``.
  """
  g = config.gam
  taps = getattr(models, activation_taps.network_field(models))
  disc = models.discriminator if g.discriminators else None
  weights = layer_weights(config)
  gan = config.adversarial.gan
  bn_mode = config.model.bn_mode
  supervised = source_loss(config) if g.source_weight else None
  match = "batch" if g.gaussian_matching else "none"
  boundary = 0.5 if gan.lower() == "ls" else 0.0

  def step(state, batch, rng):
    del rng
    src, tgt = batch["source"], batch["target"]
    source = jax.lax.stop_gradient(state.source)
    # The frozen source model: running BN statistics, no matching (its
    # activations on source data define the statistics matched to).
    _, source_taps, _ = taps.apply_with_taps(
        source, src["image"], train_bn=False, match="none")
    a_s = source_taps["raw"]

    def generator_loss(params):
      metrics = {}
      stats = state.batch_stats
      total = 0.0
      if g.source_weight:
        # Optional: source CE on the target network (without matching,
        # which is calibrated for target data).
        labelled_bn = forward_lib.uses_batch_statistics(bn_mode, True)
        outputs, _, stats = taps.apply_with_taps(
            {"params": params, "batch_stats": stats}, src["image"],
            train_bn=labelled_bn, match="none")
        seg, seg_metrics = supervised(outputs, src["image"], src["label"])
        metrics.update(seg_metrics, seg_loss=seg)
        total = total + g.source_weight * seg
      _, target_taps, stats = taps.apply_with_taps(
          {"params": params, "batch_stats": stats}, tgt["image"],
          train_bn=bn_mode == "train", match=match)
      a_t = target_taps["matched"]
      if disc is not None:
        for key, w in weights.items():
          d_out = disc.apply({"params": state.disc_params[key]}, a_t[key])
          adv = losses.generator_adv_loss(d_out=d_out, gan=gan)
          metrics[f"adv_{key}"] = adv
          total = total + w * adv
      drift = am.weight_drift(params, source["params"],
                              reduction=g.drift_reduction)
      metrics["drift"] = drift
      total = total + g.drift_weight * drift
      return total, (stats, metrics, a_t, target_taps["raw"])

    (loss, (stats, metrics, a_t, raw_t)), grads = jax.value_and_grad(
        generator_loss, has_aux=True)(state.params)

    # Running target statistics (inference-time matching) and per-layer
    # moment gaps of this batch, before matching, in source std units.
    model_stats, act = activation_taps.split_stats(stats)
    batch_t = am.channel_stats(jax.lax.stop_gradient(raw_t))
    src_stats = activation_taps.source_stats(act)
    running = am.ema_stats(activation_taps.target_stats(act), batch_t,
                           g.stats_momentum)
    stats = dict(model_stats, **{activation_taps.STATS_KEY:
                                 activation_taps.pack_stats(src_stats,
                                                            running)})
    for key, gap in am.stats_gap(batch_t, src_stats).items():
      metrics[f"mean_gap_{key}"] = gap["mean_gap"]
      metrics[f"std_gap_{key}"] = gap["std_gap"]

    new_state = base.update_segmenter(state, tx, grads, stats)
    if disc is not None:
      a_t = jax.lax.stop_gradient(a_t)

      def disc_loss(disc_params):
        total = 0.0
        d_metrics = {}
        for key in weights:
          d_s = disc.apply({"params": disc_params[key]}, a_s[key])
          d_t = disc.apply({"params": disc_params[key]}, a_t[key])
          l_d = losses.discriminator_loss(d_out_source=d_s, d_out_target=d_t,
                                          gan=gan)
          d_metrics[f"disc_{key}"] = l_d
          # 0.5 = D cannot tell the domains apart at this layer.
          d_metrics[f"disc_acc_{key}"] = 0.5 * (
              jnp.mean(d_s < boundary) + jnp.mean(d_t >= boundary))
          total = total + l_d
        return total, d_metrics

      (_, d_metrics), d_grads = jax.value_and_grad(
          disc_loss, has_aux=True)(state.disc_params)
      new_state = base.update_discriminators(new_state, disc_tx, d_grads)
      metrics.update(d_metrics)
    metrics.update(loss=loss, grad_norm=base.trainable_norm(
        grads, frozen(config)))
    return new_state, metrics

  return step


def make_classification_step(models, config, tx, disc_tx):
  """The GAM step of a classifier (DAM's digits setting, METHODS.md §10)."""
  return make_step(models, config, tx, disc_tx,
                   source_loss=classification_source_loss,
                   frozen=lambda c: list(c.optim.frozen_regexes))


GAM = base.Method(name="gam", make_step=make_step,
                  discriminator_inputs="activations",
                  config_problems=config_problems, single_process=True,
                  warm_starts_from_source_only=True)
# DAM's released digits setting: LeNet, fc3 / fc4 discriminators.
GAM_CLS = base.Method(name="gam_cls", make_step=make_classification_step,
                      task="classification",
                      discriminator_inputs="activations",
                      config_problems=config_problems, single_process=True,
                      warm_starts_from_source_only=True)
