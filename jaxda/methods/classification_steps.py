"""Classification steps: shared passes, source-only and target-oracle.

The classification counterpart of ``jaxda.methods.base``: the batch is the
same paired contract ``{'source': {'image', 'label'}, 'target': {'image'}}``
with (B,) image labels. BatchNorm follows ``config.model.bn_mode`` exactly
as in segmentation (``base.BN_MODES``); the digits network has no BatchNorm.

Source-only never passes a target image through the network during
training; the oracle trains on labelled target images (the upper bound).
DANN and TADA (``dann.py``, ``tada.py``) build on the helpers here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxda import losses
from jaxda.methods import base
from jaxda.models import forward


# The modules and their forward passes live with the models (the task's
# evaluation runs them too); steps use these names.
ClassificationModels = forward.ClassificationModels
extract_features = forward.extract_features
classify = forward.classify


def extract_both(models: ClassificationModels, params, batch_stats,
                 source_images: jax.Array, target_images: jax.Array, *,
                 bn_mode: str, joint: bool = False):
  """Source then target pass of G_f (adversarial steps), BN as configured.

  Separate passes so BatchNorm sees each domain as ``bn_mode`` says; with
  ``joint`` (and ``bn_mode='train'``) one pass over the concatenated batch,
  as the thuml / tllib code runs it: batch statistics of the source +
  target mixture, one running-statistics update.

  Returns:
    ``(f_s, f_t, batch_stats)``: (B_s, h, w, C), (B_t, h, w, C) and the
    statistics after both passes.
  """
  if joint and bn_mode == "train":
    n = source_images.shape[0]
    f, stats = extract_features(
        models, params, batch_stats,
        jnp.concatenate([source_images, target_images]), bn_mode=bn_mode,
        labelled=True)
    return f[:n], f[n:], stats
  f_s, stats = extract_features(models, params, batch_stats, source_images,
                                bn_mode=bn_mode, labelled=True)
  f_t, stats = extract_features(models, params, stats, target_images,
                                bn_mode=bn_mode, labelled=False)
  return f_s, f_t, stats


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean CE of (B, C) logits against (B,) labels (255 = ignore)."""
  return losses.softmax_cross_entropy(logits=logits, labels=labels)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of (B,) labels equal to the argmax of (B, C) logits."""
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def domain_labels(num_source: int, num_target: int,
                  source_label: int) -> jax.Array:
  """(num_source + num_target,) float domain labels, source first.

  ``source_label`` is the config's convention (TADA, tllib: source = 1;
  AdaptSegNet/ADVENT: source = 0); target gets the other value.
  """
  if source_label not in (0, 1):
    raise ValueError(f"domain label of the source must be 0 or 1, got"
                     f" {source_label}")
  return jnp.concatenate([
      jnp.full((num_source,), float(source_label), jnp.float32),
      jnp.full((num_target,), float(1 - source_label), jnp.float32)])


def domain_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Accuracy of a discriminator's (...) logits at telling the domains."""
  return jnp.mean((logits >= 0.0) == (labels >= 0.5))


def update_all(state, tx, disc_tx, grads, disc_grads, batch_stats):
  """Applies the network and discriminator updates; advances the step."""
  new_state = base.update_segmenter(state, tx, grads, batch_stats)
  if disc_tx is None:
    return new_state
  return base.update_discriminators(new_state, disc_tx, disc_grads)


def minimize_with_discriminators(state, tx, disc_tx, loss_fn):
  """One joint step of network and discriminators (gradient reversal inside).

  ``loss_fn(params, disc_params) -> (loss, (stats, metrics))``; both take
  the gradient of the same loss (the GRL flips it for the features).

  Returns:
    ``(new_state, metrics)`` with ``loss`` and ``grad_norm`` added.
  """
  (loss, (stats, metrics)), (grads, d_grads) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.disc_params)
  new_state = update_all(state, tx, disc_tx, grads, d_grads, stats)
  return new_state, dict(metrics, loss=loss,
                         grad_norm=base.global_norm(grads))


def make_supervised_step(domain: str):
  """Supervised classification step factory on ``domain`` (source/target)."""

  def make_step(models: ClassificationModels, config, tx, disc_tx=None):
    del disc_tx
    bn_mode = config.model.bn_mode

    def step(state, batch, rng):
      del rng  # Deterministic: no dropout, no in-graph augmentation.
      data = batch[domain]

      def loss_fn(params):
        fmap, stats = extract_features(models, params, state.batch_stats,
                                       data["image"], bn_mode=bn_mode,
                                       labelled=True)
        logits = classify(models, params, fmap)["logits"]
        ce = cross_entropy(logits, data["label"])
        return ce, (stats, {"ce": ce, "train_acc": accuracy(
            logits, data["label"])})

      return base.minimize(state, tx, loss_fn)

    return step

  return make_step


SOURCE_ONLY_CLS = base.Method(
    name="source_only_cls", make_step=make_supervised_step("source"),
    task="classification", uses_target_images=False, single_process=True)
ORACLE_CLS = base.Method(
    name="oracle_cls", make_step=make_supervised_step("target"),
    task="classification", uses_target_images=True, uses_source_images=False,
    target_labels="ground_truth", single_process=True)
