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

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxda import losses
from jaxda import optim
from jaxda.methods import base


@dataclasses.dataclass(frozen=True)
class ClassificationModels:
  """The Flax modules of a classification method.

  Attributes:
    classifier: `jaxda.models.ImageClassifier`.
    discriminator: global `DomainDiscriminator` (DANN, TADA) or None.
    region_discriminators: TADA's `RegionDiscriminators` or None.
  """
  classifier: nn.Module
  discriminator: nn.Module | None = None
  region_discriminators: nn.Module | None = None


def extract_features(models: ClassificationModels, params, batch_stats,
                     images: jax.Array, *, bn_mode: str, labelled: bool,
                     training: bool = True):
  """G_f with the configured BatchNorm behaviour (see ``base.forward``).

  Args:
    models: the modules.
    params: classifier parameters.
    batch_stats: BatchNorm running statistics (``{}`` without BatchNorm).
    images: (B, H, W, 3) float32.
    bn_mode: one of ``base.BN_MODES``.
    labelled: the pass is over the domain whose labels train the model.
    training: False for evaluation passes (running statistics, untouched).

  Returns:
    ``(feature_map, batch_stats)``: (B, h, w, C) and the (possibly updated)
    statistics.
  """
  if bn_mode not in base.BN_MODES:
    raise ValueError(f"bn_mode must be one of {base.BN_MODES}, got"
                     f" {bn_mode!r}")
  variables = {"params": params, "batch_stats": batch_stats}
  use_batch = training and bool(batch_stats) and (
      bn_mode == "train" or (bn_mode == "source" and labelled))
  method = models.classifier.features
  if use_batch:
    fmap, mutated = models.classifier.apply(
        variables, images, train_bn=True, mutable=["batch_stats"],
        method=method)
    return fmap, mutated["batch_stats"]
  return models.classifier.apply(variables, images, train_bn=False,
                                 method=method), batch_stats


def extract_both(models: ClassificationModels, params, batch_stats,
                 source_images: jax.Array, target_images: jax.Array, *,
                 bn_mode: str):
  """Source then target pass of G_f (adversarial steps), BN as configured.

  Separate passes so BatchNorm sees each domain as ``bn_mode`` says.

  Returns:
    ``(f_s, f_t, batch_stats)``: (B_s, h, w, C), (B_t, h, w, C) and the
    statistics after both passes.
  """
  f_s, stats = extract_features(models, params, batch_stats, source_images,
                                bn_mode=bn_mode, labelled=True)
  f_t, stats = extract_features(models, params, stats, target_images,
                                bn_mode=bn_mode, labelled=False)
  return f_s, f_t, stats


def classify(models: ClassificationModels, params,
             feature_map: jax.Array) -> dict[str, jax.Array]:
  """Pool + bottleneck + classifier on a (B, h, w, C) conv map.

  Returns:
    ``{'bottleneck': (B, D), 'logits': (B, num_classes)}``.
  """
  return models.classifier.apply({"params": params}, feature_map,
                                 method=models.classifier.head)


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


def make_classifier_tx(config, schedule_steps: int, *,
                       backbone_regex: str | None = None,
                       backbone_lr_mult: float = 1.0,
                       frozen_regexes=(), lr_mult: float = 1.0
                       ) -> tuple[optax.GradientTransformation, Any]:
  """SGD of the thuml / DANN recipe for classification networks.

  Coupled weight decay, momentum, the DANN annealing
  ``lr / (1 + α p)^β`` (``config.optim.lr_schedule = 'inv'``) or a
  constant LR, the backbone at ``backbone_lr_mult`` x LR (0.1 for a
  pretrained backbone), frozen parameters through ``optax.partition``.

  Args:
    config: run config (reads ``config.optim``).
    schedule_steps: steps for the progress p = step / schedule_steps.
    backbone_regex: parameter-path regex of the backbone (None: no split).
    backbone_lr_mult: LR multiplier of the backbone.
    frozen_regexes: parameter-path regexes never updated.
    lr_mult: multiplier of the whole LR (discriminators: ``disc_lr_mult``).

  Returns:
    ``(tx, labels_fn)`` as ``optim.make_segmenter_tx``.
  """
  o = config.optim
  if o.lr_schedule == "inv":
    schedule = optim.inv_schedule(o.learning_rate, schedule_steps,
                                  alpha=o.inv_alpha, beta=o.inv_beta)
  elif o.lr_schedule == "constant":
    schedule = optax.constant_schedule(o.learning_rate)
  else:
    raise ValueError(f"config.optim.lr_schedule must be 'inv' or 'constant',"
                     f" got {o.lr_schedule!r}")
  if o.optimizer == "sgd":
    opt = optax.sgd(schedule, momentum=o.momentum or None,
                    nesterov=bool(o.nesterov))
  elif o.optimizer == "adam":
    opt = optax.adam(schedule)
  else:
    raise ValueError(f"unknown optimizer {o.optimizer!r}; use 'sgd' or"
                     " 'adam'")
  parts = []
  if o.weight_decay:
    parts.append(optax.add_decayed_weights(o.weight_decay))
  parts.append(opt)
  if backbone_regex and backbone_lr_mult != 1.0:
    parts.append(optax.masked(optax.scale(backbone_lr_mult),
                              lambda p: optim.path_mask(p, [backbone_regex])))
  if lr_mult != 1.0:
    parts.append(optax.scale(lr_mult))

  def labels_fn(params):
    return optim.param_labels(params, frozen_regexes)

  tx = optax.partition({optim.TRAIN: optax.chain(*parts),
                        optim.FROZEN: optax.set_to_zero()}, labels_fn)
  return tx, labels_fn


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
    uses_target_images=False)
ORACLE_CLS = base.Method(
    name="oracle_cls", make_step=make_supervised_step("target"),
    uses_target_images=True, uses_source_images=False,
    target_labels="ground_truth")
