"""What a method is: a factory of pure train steps plus a few facts.

A method composes pure losses (``jaxda.losses``) into a step
``(state, batch, rng) -> (state, metrics)``. The batch is the paired
contract ``{'source': {'image', 'label'}, 'target': {'image', ...}}``; which
target fields exist depends on the method (``'label'`` only for the oracle,
pseudo labels for self-training). The run loop compiles the step once with
``jaxda.parallel.jit_step``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxda import losses
from jaxda import models as models_lib
from jaxda import ops
from jaxda import optim

StepFn = Callable[[Any, Any, jax.Array], tuple[Any, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Models:
  """The Flax modules a method uses (the only Flax objects it sees)."""
  segmenter: nn.Module
  discriminator: nn.Module | None = None


@dataclasses.dataclass(frozen=True)
class Method:
  """Registry entry of a training method.

  Attributes:
    name: registry name, equal to the config's ``method``.
    make_step: ``make_step(models, config, tx, disc_tx) -> StepFn``.
    uses_target_images: the step reads ``batch['target']['image']``.
    uses_source_images: the step reads ``batch['source']``.
    target_labels: ``'none'`` (unsupervised), ``'ground_truth'`` (oracle),
      or ``'pseudo'`` (self-training supplies them).
    discriminator_inputs: ``'none'``, ``'softmax'`` or ``'entropy'``;
      decides whether discriminators are created and what they eat.
  """
  name: str
  make_step: Callable[..., StepFn]
  uses_target_images: bool = True
  uses_source_images: bool = True
  target_labels: str = "none"
  discriminator_inputs: str = "none"


def output_levels(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """``('main', 'aux')`` for multi-level models, ``('main',)`` otherwise."""
  return ("main", "aux") if config.model.multi_level else ("main",)


BN_MODES = ("frozen", "train", "source")


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
      statistics and change nothing. For models trained from scratch (the CPU
      benchmark): every method then normalises target images identically, so
      a comparison measures the adaptation loss, not a BatchNorm leak.

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
  if bn_mode not in BN_MODES:
    raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
  variables = {"params": params, "batch_stats": batch_stats}
  use_batch = training and (
      bn_mode == "train" or (bn_mode == "source" and labelled))
  if use_batch:
    outputs, mutated = models.segmenter.apply(
        variables, images, train_bn=True, mutable=["batch_stats"])
    return outputs, mutated["batch_stats"]
  return models.segmenter.apply(variables, images, train_bn=False), batch_stats


def upsample_outputs(outputs: dict[str, jax.Array], size: tuple[int, int], *,
                     align_corners: bool) -> dict[str, jax.Array]:
  """Upsamples every level's logits to ``size`` = (H, W) of the input."""
  return {k: ops.upsample_bilinear(v, size, align_corners=align_corners)
          for k, v in outputs.items()}


def segmentation_loss(logits: dict[str, jax.Array], labels: jax.Array, *,
                      lambda_aux: float, weights: jax.Array | None = None):
  """``CE(main) + lambda_aux * CE(aux)`` on upsampled logits (ignore 255).

  Returns:
    ``(loss, metrics)`` with the per-level CE in ``metrics``.
  """
  metrics = {}
  total = 0.0
  for level, logit in logits.items():
    ce = losses.softmax_cross_entropy(logits=logit, labels=labels,
                                      weights=weights)
    metrics[f"ce_{level}"] = ce
    total = total + (1.0 if level == "main" else lambda_aux) * ce
  return total, metrics


def supervised_pass(models: Models, params, batch_stats, data, *,
                    bn_mode: str, align_corners: bool, lambda_aux: float,
                    labelled: bool = True):
  """Forward on a labelled batch + multi-level segmentation loss.

  Returns:
    ``(loss, metrics, batch_stats, logits)`` with ``logits`` upsampled to
    the input size per level.
  """
  outputs, batch_stats = forward(models, params, batch_stats, data["image"],
                                 bn_mode=bn_mode, labelled=labelled)
  logits = upsample_outputs(outputs, data["image"].shape[1:3],
                            align_corners=align_corners)
  loss, metrics = segmentation_loss(logits, data["label"],
                                    lambda_aux=lambda_aux)
  return loss, metrics, batch_stats, logits


def target_pass(models: Models, params, batch_stats, images, *,
                bn_mode: str, align_corners: bool):
  """Forward on unlabelled-domain images; logits upsampled to the input."""
  outputs, batch_stats = forward(models, params, batch_stats, images,
                                 bn_mode=bn_mode, labelled=False)
  return upsample_outputs(outputs, images.shape[1:3],
                          align_corners=align_corners), batch_stats


def update_segmenter(state, tx: optax.GradientTransformation, grads,
                     batch_stats):
  """Applies the segmenter update and advances the step counter."""
  params, opt_state = apply_updates(tx, grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=params,
                       batch_stats=batch_stats, opt_state=opt_state)


def minimize(state, tx: optax.GradientTransformation, loss_fn,
             frozen: Sequence[str] = ()):
  """One optimiser step on ``loss_fn(params) -> (loss, (stats, metrics))``.

  The shared tail of every single-network step: gradients of the loss
  w.r.t. ``state.params``, the update with the new BatchNorm statistics,
  and the metrics extended with ``loss`` and ``grad_norm`` (over the
  parameters not matched by the ``frozen`` regexes, ``trainable_norm``).

  Returns:
    ``(new_state, metrics)``.
  """
  (loss, (stats, metrics)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  new_state = update_segmenter(state, tx, grads, stats)
  return new_state, dict(metrics, loss=loss,
                        grad_norm=trainable_norm(grads, frozen))


def update_discriminators(state, disc_tx: optax.GradientTransformation,
                          disc_grads):
  """Applies the discriminators' update (step counter unchanged)."""
  disc_params, disc_opt_state = apply_updates(
      disc_tx, disc_grads, state.disc_opt_state, state.disc_params)
  return state.replace(disc_params=disc_params,
                       disc_opt_state=disc_opt_state)


def apply_updates(tx: optax.GradientTransformation, grads, opt_state, params):
  """One optax update; returns ``(params, opt_state)``."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def frozen_regexes(config) -> list[str]:
  """Parameter-path regexes never updated: config extras, BatchNorm affine
  parameters, and the ASPP branches AdaptSegNet's early return leaves dead
  (PyTorch's SGD skips parameters without gradients, so they keep their init
  values and get no weight decay)."""
  frozen = list(config.optim.frozen_regexes)
  frozen.append(models_lib.batchnorm_param_regex)
  if config.model.aspp_branches_used < 4:
    dead = "|".join(str(i) for i in range(config.model.aspp_branches_used, 4))
    frozen.append(rf"aspp_(main|aux)/branch_({dead})/")
  return frozen


def global_norm(tree) -> jax.Array:
  """L2 norm over every leaf of ``tree``, float32."""
  return optax.tree.norm(tree).astype(jnp.float32)


def trainable_norm(grads, frozen: Sequence[str]) -> jax.Array:
  """L2 norm of the gradients the optimiser applies, float32.

  Leaves whose path matches a ``frozen`` regex (as given to the optimiser's
  ``optax.partition``) are left out. Besides not being applied, reading them
  would make XLA compute them: the scale gradient of a frozen BatchNorm
  needs every normalised conv output kept for the backward pass, which
  PyTorch skips (``requires_grad=False``). Measured on the 256x512
  AdaptSegNet step in bf16: 14% of the step time and 42% of XLA's
  temporaries (``benchmarks/NOTES.md``).

  Args:
    grads: gradient pytree (the parameter tree's structure).
    frozen: parameter-path regexes (``optim.param_path`` form).
  """
  mask = optim.path_mask(grads, frozen)
  applied = [g for g, is_frozen in zip(jax.tree.leaves(grads),
                                        jax.tree.leaves(mask))
             if not is_frozen]
  return global_norm(applied)
