"""Anchor tasks: multi-task domain adaptation with a cheap aligned task.

Li et al., WACV 2021 (METHODS.md §11). A main dense task (here depth) is
labelled only in the source; an anchor task (semantic segmentation) that is
inexpensive, shared and pixel-aligned with it is labelled in both domains.
One step minimises the weighted sum of three terms,

  w_sm * L_main(source) + w_sa * L_anchor(source) + w_ta * L_anchor(target)

with the weights choosing the variant (jaxda's names; the paper's are
UNVERIFIED): ``mtl_src`` (w_ta = 0), ``mtl_smta`` (w_sa = 0) and ``mtl_a``
(all three). HeadFreeze is the same step in a second phase whose optimiser
freezes the late layers (an ``optax.partition`` label, built by the driver,
``jaxda.methods.anchor.headfreeze``); the step also keeps the frozen part's
BatchNorm statistics unchanged there. An optional output-space discriminator (AdaptSegNet-style,
``anchor.lambda_adv > 0``) on the main, anchor or both outputs adds the
"blind" adversarial alignment the paper discusses.

BatchNorm: every pass that carries labels is a training pass (batch
statistics, running statistics updated). When the target is labelled (anchor
labels), source and target go through one forward pass together, so the
training batch statistics and the running ones describe the same mixture;
an unlabelled target pass (adversarial only) uses and keeps the running
statistics, as ``bn_mode='source'`` does everywhere in jaxda.

Batch contract: ``{'source': {'image', 'label' (anchor), 'depth' or
'normals'}, 'target': {'image', 'label' (anchor)}}``; the target's main
labels never enter a step.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from jaxda import losses
from jaxda import optim
from jaxda.methods import adversarial
from jaxda.methods import base
from jaxda.tasks import depth as depth_task
from jaxda.tasks import normals as normals_task

MAIN = depth_task.DEPTH_HEAD
ANCHOR = depth_task.SEG_HEAD
TERMS = ("source_main", "source_anchor", "target_anchor")
ADV_INPUTS = ("main", "anchor", "both")


def task_weights(config: ml_collections.ConfigDict,
                 phase: int) -> dict[str, float]:
  """The loss weights of ``phase`` (1, or 2 = HeadFreeze's second phase)."""
  group = config.anchor.weights if phase == 1 else config.anchor.phase2_weights
  weights = {t: float(group[t]) for t in TERMS}
  if any(w < 0 for w in weights.values()) or not any(weights.values()):
    raise ValueError(f"anchor weights of phase {phase} must be >= 0 and not"
                     f" all zero, got {weights}")
  return weights


def uses_target(config: ml_collections.ConfigDict, phase: int) -> bool:
  """Whether the phase's step reads target images (anchor labels or D)."""
  return (task_weights(config, phase)["target_anchor"] > 0
          or config.anchor.lambda_adv > 0)


def discriminator_input(outputs: dict[str, jax.Array], kind: str,
                        main_head: str = MAIN) -> jax.Array:
  """What D sees: the main output (log-depth, normals), anchor softmax, or
  both, (B, H, W, C_d)."""
  parts = []
  if kind in ("main", "both"):
    parts.append(outputs[main_head])
  if kind in ("anchor", "both"):
    parts.append(adversarial.discriminator_input(outputs[ANCHOR], "softmax"))
  if not parts:
    raise ValueError(f"anchor.adv_input must be one of {ADV_INPUTS}, got"
                     f" {kind!r}")
  return jnp.concatenate(parts, axis=-1)


discriminator_channels = depth_task.discriminator_channels


def keep_frozen_stats(new_stats: Any, old_stats: Any,
                      frozen_regexes: Sequence[str]) -> Any:
  """BatchNorm statistics of frozen modules stay as they were.

  The mask comes from parameter paths (``optim.path_mask``) and is static,
  so this selects whole leaves at trace time.
  """
  if not frozen_regexes:
    return new_stats
  mask = optim.path_mask(old_stats, frozen_regexes)
  return jax.tree.map(lambda m, new, old: old if m else new, mask, new_stats,
                      old_stats)


def make_step(models: base.Models, config: ml_collections.ConfigDict, tx,
              disc_tx=None, *, phase: int = 1,
              frozen_regexes: Sequence[str] = (),
              main: depth_task.MainTask = depth_task.MAIN) -> base.StepFn:
  """Builds the multi-task step of ``phase``.

  Args:
    models: ``segmenter`` = ``MultiTaskNet`` with heads ``depth`` and ``seg``;
      ``discriminator`` when ``config.anchor.lambda_adv > 0``.
    config: run config (``anchor.*``, ``model.*``, ``adversarial.*``).
    tx: the segmenter optimiser of this phase (phase 2: late layers frozen
      through ``optax.partition``).
    disc_tx: the discriminator optimiser (adversarial only).
    phase: 1 or 2; picks the loss weights.
    frozen_regexes: parameter-path regexes frozen in this phase; the
      BatchNorm statistics under them are not updated either.
    main: the main task (head, batch key, loss): depth or normals.

  Returns:
    ``step(state, batch, rng) -> (state, metrics)``.
  """
  weights = task_weights(config, phase)
  bn_mode = config.model.bn_mode
  align = config.model.upsample_align_corners
  lambda_adv = float(config.anchor.lambda_adv)
  adv_kind = config.anchor.adv_input
  gan = config.adversarial.gan
  use_adv = lambda_adv > 0
  if use_adv and models.discriminator is None:
    raise ValueError("anchor.lambda_adv > 0 needs a discriminator")
  target_labelled = weights["target_anchor"] > 0
  disc = models.discriminator
  # What this phase's optimiser leaves alone (for the grad_norm metric).
  frozen = base.frozen_regexes(config) + list(frozen_regexes)

  def outputs_of(params, stats, src, tgt):
    """Upsampled outputs per domain and the new BatchNorm statistics."""
    size = src["image"].shape[1:3]
    up = lambda out: base.upsample_outputs(out, size, align_corners=align)
    if target_labelled:
      b = src["image"].shape[0]
      images = jnp.concatenate([src["image"], tgt["image"]], axis=0)
      out, stats = base.forward(models, params, stats, images,
                                bn_mode=bn_mode, labelled=True)
      out = up(out)
      return ({k: v[:b] for k, v in out.items()},
              {k: v[b:] for k, v in out.items()}, stats)
    out_s, stats = base.forward(models, params, stats, src["image"],
                                bn_mode=bn_mode, labelled=True)
    out_t = None
    if use_adv:
      out_t, stats = base.forward(models, params, stats, tgt["image"],
                                  bn_mode=bn_mode, labelled=False)
      out_t = up(out_t)
    return up(out_s), out_t, stats

  def step(state, batch, rng):
    del rng  # Deterministic: no dropout, augmentation is host-side.
    src, tgt = batch["source"], batch.get("target")

    def loss_fn(params):
      out_s, out_t, stats = outputs_of(params, state.batch_stats, src, tgt)
      terms = {}
      if weights["source_main"]:
        terms["source_main"] = main.loss(out_s[main.head],
                                         src[main.label_key])
      if weights["source_anchor"]:
        terms["source_anchor"] = losses.softmax_cross_entropy(
            logits=out_s[ANCHOR], labels=src["label"])
      if weights["target_anchor"]:
        terms["target_anchor"] = losses.softmax_cross_entropy(
            logits=out_t[ANCHOR], labels=tgt["label"])
      total = sum(weights[k] * v for k, v in terms.items())
      metrics = dict(terms)
      d_inputs = None
      if use_adv:
        d_in_s = discriminator_input(out_s, adv_kind, main.head)
        d_in_t = discriminator_input(out_t, adv_kind, main.head)
        d_out_t = disc.apply({"params": state.disc_params["main"]}, d_in_t)
        adv = losses.generator_adv_loss(d_out=d_out_t, gan=gan)
        metrics["adv"] = adv
        total = total + lambda_adv * adv
        d_inputs = (d_in_s, d_in_t)
      return total, (stats, metrics, d_inputs)

    (loss, (stats, metrics, d_inputs)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    stats = keep_frozen_stats(stats, state.batch_stats, frozen_regexes)
    new_state = base.update_segmenter(state, tx, grads, stats)
    if use_adv:
      # D learns on detached maps: no gradient reaches the network from L_D.
      d_in_s, d_in_t = jax.lax.stop_gradient(d_inputs)

      def disc_loss(disc_params):
        d_out_s = disc.apply({"params": disc_params["main"]}, d_in_s)
        d_out_t = disc.apply({"params": disc_params["main"]}, d_in_t)
        return losses.discriminator_loss(d_out_source=d_out_s,
                                         d_out_target=d_out_t, gan=gan)

      l_d, d_grads = jax.value_and_grad(disc_loss)(state.disc_params)
      new_state = base.update_discriminators(new_state, disc_tx, d_grads)
      metrics["disc"] = l_d
    return new_state, dict(metrics, loss=loss,
                           grad_norm=base.trainable_norm(
                               grads, frozen))

  return step


def make_normals_step(models, config, tx, disc_tx=None, **kwargs):
  """``make_step`` with surface normals as the main task."""
  return make_step(models, config, tx, disc_tx, main=normals_task.MAIN,
                   **kwargs)


ANCHOR_TASKS = base.Method(
    name="anchor", make_step=make_step, task="depth",
    uses_target_images=True, target_labels="anchor", single_process=True)
# The paper's main task: surface normals (``experiments/configs/anchor.py:
# normals``).
ANCHOR_NORMALS = base.Method(
    name="anchor_normals", make_step=make_normals_step, task="normals",
    uses_target_images=True, target_labels="anchor", single_process=True)

# Main task of each anchor method, for its driver.
MAIN_TASKS = {ANCHOR_TASKS.name: depth_task.MAIN,
              ANCHOR_NORMALS.name: normals_task.MAIN}
