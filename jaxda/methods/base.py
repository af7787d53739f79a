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
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxda import losses
from jaxda import models as models_lib
from jaxda import optim
from jaxda.models import forward as forward_lib
from jaxda.models.kernels import remat as remat_lib
from jaxda.types import StepFn

# Re-exported: every step module builds on these (``jaxda.models.forward``).
Models = forward_lib.Models
BN_MODES = forward_lib.BN_MODES
forward = forward_lib.forward
upsample_outputs = forward_lib.upsample_outputs
output_levels = forward_lib.output_levels
frozen_regexes = models_lib.segmenter_frozen_regexes


@dataclasses.dataclass(frozen=True)
class Method:
  """Registry entry of a training method (``jaxda.methods.METHODS``).

  Attributes:
    name: registry name, equal to the config's ``method``.
    make_step: ``make_step(models, config, tx, disc_tx) -> StepFn``, the
      step the default loop (and a driver's first phase) runs.
    task: name of its task in ``jaxda.tasks.TASKS`` (what it predicts and
      how it is evaluated).
    uses_target_images: the step reads ``batch['target']['image']``.
    uses_source_images: the step reads ``batch['source']``.
    target_labels: ``'none'`` (unsupervised), ``'ground_truth'`` (oracle),
      ``'pseudo'`` (self-training supplies them) or ``'anchor'``.
    discriminator_inputs: ``'none'`` (no discriminator is built) or what
      the discriminators eat (``'softmax'``, ``'entropy'``, ``'features'``,
      ``'activations'``).
    discriminator_levels: output levels that get a segmentation
      discriminator; None: every level of the model (``output_levels``).
    discriminator_features: ``config -> 'bottleneck' | 'pooled'``, the
      classification features the global discriminator sees; None:
      ``'bottleneck'``.
    make_region_discriminators: ``config -> nn.Module | None``, extra
      per-region discriminators of a classification method (TADA).
    attention_maps: ``(models, config) -> (fn(state, images) -> (B, h, w),
      title)``, maps drawn over target images by the task's pictures; None:
      none.
    config_problems: ``config -> [message]``, the method's own invalid
      config values (checked by the loop after the task's).
    driver: ``(config, workdir, method) -> summary`` of a multi-stage method; None:
      the default loop (``jaxda.train.loop.train_and_evaluate``).
    phase_steps: step factories of later phases, by name (TPLD:
      ``{'phase2': make_phase2_step}``); drivers take them from here.
    single_process: runs in one process only (whole-split passes).
    warm_starts_from_source_only: starts from a source-only model of the same
      seed (``model.init_checkpoint``; trained by its driver when unset).
  """
  name: str
  make_step: Callable[..., StepFn]
  task: str = "segmentation"
  uses_target_images: bool = True
  uses_source_images: bool = True
  target_labels: str = "none"
  discriminator_inputs: str = "none"
  discriminator_levels: tuple[str, ...] | None = None
  discriminator_features: Callable[[Any], str] | None = None
  make_region_discriminators: Callable[[Any], Any] | None = None
  attention_maps: Callable[..., Any] | None = None
  config_problems: Callable[[Any], list[str]] | None = None
  driver: Callable[[Any, str, Any], dict] | None = None
  phase_steps: Mapping[str, Callable[..., StepFn]] = dataclasses.field(
      default_factory=dict)
  single_process: bool = False
  warm_starts_from_source_only: bool = False


def segmentation_loss(logits: dict[str, jax.Array], labels: jax.Array, *,
                      lambda_aux: float, weights: jax.Array | None = None,
                      prefix: str = "ce"):
  """``CE(main) + lambda_aux * CE(aux)`` on upsampled logits (ignore 255).

  Returns:
    ``(loss, metrics)`` with the per-level CE in ``metrics``.
  """
  metrics = {}
  total = 0.0
  for level, logit in logits.items():
    ce = losses.softmax_cross_entropy(logits=logit, labels=labels,
                                      weights=weights)
    metrics[f"{prefix}_{level}"] = ce
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


def minimize_per_loss(state, tx: optax.GradientTransformation, passes,
                      frozen: Sequence[str] = ()):
  """``minimize`` on the sum of ``passes``' losses, one backward per loss.

  Each pass is ``f(params, batch_stats, after) -> (loss, (batch_stats,
  metrics))`` and must add the scalar ``after`` (0; not finite only where an
  earlier gradient is not) to its input images; the statistics chain from
  pass to pass.
  ``after`` is 0 made to depend on every earlier gradient
  (``kernels.remat.after``), so a pass's forward starts only once every
  earlier backward has finished: one pass's activations are alive at a
  time, not all of them (the original's ``loss.backward()`` per loss). An
  ``optimization_barrier`` does not do this on XLA:CPU, which drops it
  before scheduling.

  Returns:
    ``(new_state, metrics)``, as ``minimize`` (``loss`` is the sum).
  """
  params, stats = state.params, state.batch_stats
  grads, total, metrics = None, 0.0, {}
  after = jnp.zeros((), jnp.float32)
  for f in passes:
    (loss, (stats, m)), g = jax.value_and_grad(f, has_aux=True)(
        params, stats, after)
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    total = total + loss
    metrics.update(m)
    after = remat_lib.after(jnp.zeros((), jnp.float32), grads)
  new_state = update_segmenter(state, tx, grads, stats)
  return new_state, dict(metrics, loss=total,
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
