"""How a model's Flax modules are applied: BatchNorm modes and upsampling.

Every caller (train steps, evaluation, pseudo-labelling) runs the networks
through these functions, so the BatchNorm behaviour of a pass is decided in
one place (``BN_MODES``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxda import ops

BN_MODES = ("frozen", "train", "source", "split")


@dataclasses.dataclass(frozen=True)
class Models:
  """The Flax modules of a segmentation run (the only Flax objects a step
  sees): the segmenter and, for adversarial methods, the discriminator."""
  segmenter: nn.Module
  discriminator: nn.Module | None = None


@dataclasses.dataclass(frozen=True)
class ClassificationModels:
  """The Flax modules of a classification run.

  Attributes:
    classifier: `jaxda.models.ImageClassifier`.
    discriminator: global `DomainDiscriminator` or None.
    region_discriminators: `RegionDiscriminators` (TADA's local ones) or None.
  """
  classifier: nn.Module
  discriminator: nn.Module | None = None
  region_discriminators: nn.Module | None = None


def output_levels(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """``('main', 'aux')`` for multi-level models, ``('main',)`` otherwise."""
  return ("main", "aux") if config.model.multi_level else ("main",)


def precision_options(config) -> dict[str, Any]:
  """``dtype`` / ``conv_impl`` model attributes from ``config.model``.

  bfloat16 compute keeps float32 parameters and float32 logits (the models
  cast them), so optimiser state and losses stay in full precision.

  Raises:
    ValueError: an unknown ``config.model.compute_dtype``.
  """
  dtype = config.model.get("compute_dtype", "float32")
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.compute_dtype={dtype!r}; use 'float32'"
                     " or 'bfloat16'")
  return {"dtype": None if dtype == "float32" else jnp.bfloat16,
          "conv_impl": config.model.get("conv_impl", "auto")}


def bn_mode_problem(config: ml_collections.ConfigDict) -> str | None:
  """One line on an invalid ``config.model.bn_mode``, or None.

  ``'split'`` needs a driver that sets the running statistics to the
  unlabelled domain's: only self-training does
  (``self_training.target_bn_stats``).
  """
  mode = config.model.bn_mode
  if mode not in BN_MODES:
    return f"config.model.bn_mode must be one of {BN_MODES}, got {mode!r}"
  st = config.get("self_training") or {}
  if mode == "split" and not st.get("target_bn_stats", False):
    return ("config.model.bn_mode='split' needs target statistics that only"
            " self-training sets: use --config.self_training.target_bn_stats"
            "=True (cbst, crst, tpld), or bn_mode 'source', 'train' or"
            " 'frozen'")
  return None


def _check_bn_mode(bn_mode: str) -> None:
  if bn_mode not in BN_MODES:
    raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")


def uses_batch_statistics(bn_mode: str, labelled: bool,
                          training: bool = True) -> bool:
  """Whether a pass normalises with its batch statistics (``forward``'s
  rule for ``bn_mode``); the other passes use the running statistics."""
  return training and (
      bn_mode == "train" or (bn_mode in ("source", "split") and labelled))


def statistics_after(bn_mode: str, batch_stats, mutated):
  """The running statistics after a batch-statistics pass: the pass's
  update (as a constant, ``running_stats``), or unchanged under
  ``'split'``, whose running statistics belong to the other domain."""
  if bn_mode == "split":
    return batch_stats
  return running_stats(mutated)


def running_stats(stats):
  """BatchNorm running statistics as a later pass may read them: constants.

  A training pass's updated statistics are a function of the parameters;
  a later pass in the same loss that normalises with them would otherwise
  send gradient through them. PyTorch updates its running buffers in place
  without gradient, so this is the originals' behaviour.
  """
  return jax.lax.stop_gradient(stats)


def forward(models: Models, params, batch_stats, images, *, bn_mode: str,
            labelled: bool, training: bool = True):
  """Runs the segmenter with the configured BatchNorm behaviour.

  ``bn_mode`` (METHODS.md §3.6):
    * ``'frozen'``: always the stored running statistics, never updated
      (CRST; needs pretrained statistics).
    * ``'train'``: batch statistics in every training pass and running
      statistics updated by every pass, source and target, in order: the
      originals' ``model.train()`` (AdaptSegNet, ADVENT, IntraDA).
    * ``'source'``: batch statistics and updates only in passes over the
      labelled domain; passes over the unlabelled domain use the running
      statistics and change nothing, so every method normalises target
      images identically when models train from scratch.
    * ``'split'``: domain-specific statistics. Training passes over the
      labelled domain normalise with their batch statistics and leave the
      running statistics alone; every other pass uses the running
      statistics, which the caller has set to the unlabelled domain's
      (AdaBN, ``batch_statistics``; self-training's
      ``self_training.target_bn_stats``).

  Args:
    models: the modules.
    params: segmenter parameters.
    batch_stats: BatchNorm running statistics.
    images: (B, H, W, 3) float32.
    bn_mode: one of ``BN_MODES``.
    labelled: the pass is over the domain whose labels train the model.
    training: False for evaluation, pseudo-labelling and logging passes,
      which always use (and never touch) the running statistics.

  Returns:
    ``(outputs, batch_stats)``: dict of (B, h, w, C) logits per level and the
    (possibly updated) statistics.
  """
  _check_bn_mode(bn_mode)
  variables = {"params": params, "batch_stats": batch_stats}
  if uses_batch_statistics(bn_mode, labelled, training):
    outputs, mutated = models.segmenter.apply(
        variables, images, train_bn=True, mutable=["batch_stats"])
    return outputs, statistics_after(bn_mode, batch_stats,
                                     mutated["batch_stats"])
  return models.segmenter.apply(variables, images, train_bn=False), batch_stats


def batch_statistics(models: Models, params, batch_stats, images):
  """The BatchNorm statistics a training pass computes on ``images``.

  Every BatchNorm layer's batch mean and (biased) variance, each layer
  seeing the previous layers normalised with *their* batch statistics, as
  in a training forward pass (AdaBN's re-estimation, one batch). Found from
  the running-average update of two passes, from zero and from one
  statistics (``new = m * old + (1 - m) * batch``), so no layer's momentum
  ``m`` needs to be known.

  Args:
    models: the modules.
    params: segmenter parameters.
    batch_stats: the statistics tree (its structure; values unused).
    images: (B, H, W, 3) float32.

  Returns:
    a tree like ``batch_stats`` of the batch's statistics.
  """
  def updated(fill):
    old = jax.tree.map(lambda x: jnp.full_like(x, fill), batch_stats)
    _, mutated = models.segmenter.apply(
        {"params": params, "batch_stats": old}, images, train_bn=True,
        mutable=["batch_stats"])
    return mutated["batch_stats"]

  from_zero, from_one = updated(0.0), updated(1.0)
  # m = from_one - from_zero; batch = from_zero / (1 - m).
  return jax.tree.map(lambda z, o: z / (1.0 - (o - z)), from_zero, from_one)


def upsample_outputs(outputs: dict[str, jax.Array], size: tuple[int, int], *,
                     align_corners: bool) -> dict[str, jax.Array]:
  """Upsamples every level's logits to ``size`` = (H, W) of the input."""
  return {k: ops.upsample_bilinear(v, size, align_corners=align_corners)
          for k, v in outputs.items()}


def extract_features(models: ClassificationModels, params, batch_stats,
                     images: jax.Array, *, bn_mode: str, labelled: bool,
                     training: bool = True):
  """The classifier's feature extractor G_f, BatchNorm as in ``forward``.

  Args:
    models: the modules.
    params: classifier parameters.
    batch_stats: BatchNorm running statistics (``{}`` without BatchNorm).
    images: (B, H, W, 3) float32.
    bn_mode: one of ``BN_MODES``.
    labelled: the pass is over the domain whose labels train the model.
    training: False for evaluation passes (running statistics, untouched).

  Returns:
    ``(feature_map, batch_stats)``: (B, h, w, C) and the (possibly updated)
    statistics.
  """
  _check_bn_mode(bn_mode)
  variables = {"params": params, "batch_stats": batch_stats}
  method = models.classifier.features
  if bool(batch_stats) and uses_batch_statistics(bn_mode, labelled, training):
    fmap, mutated = models.classifier.apply(
        variables, images, train_bn=True, mutable=["batch_stats"],
        method=method)
    return fmap, statistics_after(bn_mode, batch_stats,
                                  mutated["batch_stats"])
  return models.classifier.apply(variables, images, train_bn=False,
                                 method=method), batch_stats


def classify(models: ClassificationModels, params,
             feature_map: jax.Array) -> dict[str, jax.Array]:
  """Pool + bottleneck + classifier on a (B, h, w, C) conv map.

  Returns:
    ``{'bottleneck': (B, D), 'logits': (B, num_classes)}``.
  """
  return models.classifier.apply({"params": params}, feature_map,
                                 method=models.classifier.head)
