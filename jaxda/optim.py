"""Optimisers of the originals, built from optax transformations.

Segmentation network (METHODS.md §3.9): SGD, momentum 0.9, coupled weight
decay 5e-4 (added to the gradient before momentum, as PyTorch does), poly LR
``base * (1 - i / schedule_steps) ** 0.9`` counted from step 0, and the ASPP
heads at 10x the learning rate. BatchNorm affine parameters are frozen in the
originals (``requires_grad=False``); here every parameter gets a label from a
path regex and frozen ones go through ``optax.set_to_zero()`` inside an
``optax.partition`` -- gradients are never edited by hand.

The 10x head multiplier is ``optax.masked(optax.scale(mult), head_mask)``
applied after the SGD transform: PyTorch keeps one momentum buffer of raw
gradients and multiplies by the group LR at the end, so scaling the final
update is exactly the same.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

FROZEN = "frozen"
TRAIN = "train"


def param_path(path: Sequence[Any]) -> str:
  """Joins a pytree key path into ``'a/b/c'``."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def path_mask(params: Any, regexes: Sequence[str]) -> Any:
  """Boolean pytree: True where the parameter path matches any regex."""
  compiled = [re.compile(r) for r in regexes]
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(c.search(param_path(p)) for c in compiled), params)


def param_labels(params: Any, frozen_regexes: Sequence[str]) -> Any:
  """Labels every parameter ``'frozen'`` or ``'train'`` by path regex."""
  frozen = path_mask(params, frozen_regexes)
  return jax.tree.map(lambda f: FROZEN if f else TRAIN, frozen)


def poly_schedule(base_lr: float, schedule_steps: int,
                  power: float = 0.9) -> optax.Schedule:
  """``base_lr * (1 - step / schedule_steps) ** power``, 0 after the end."""
  return optax.polynomial_schedule(
      init_value=base_lr, end_value=0.0, power=power,
      transition_steps=max(int(schedule_steps), 1))


def staircase(schedule: optax.Schedule, every: int,
              factor: float) -> optax.Schedule:
  """``schedule(count) * factor ** (count // every)``; ``every = 0`` or
  ``factor = 1``: ``schedule`` itself."""
  if not every or factor == 1.0:
    return schedule
  return lambda count: schedule(count) * factor ** (count // every)


def inv_schedule(base_lr: float, schedule_steps: int, alpha: float = 10.0,
                 beta: float = 0.75) -> optax.Schedule:
  """DANN's annealing ``base_lr / (1 + alpha * p) ** beta``, p = step / steps.

  Ganin & Lempitsky (JMLR 2016) with α = 10, β = 0.75 (METHODS.md §12);
  p is clipped to [0, 1]. ``alpha = 0`` gives a constant LR.
  """
  steps = float(max(int(schedule_steps), 1))

  def schedule(step):
    p = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
    return base_lr / (1.0 + alpha * p) ** beta

  return schedule


def make_segmenter_tx(
    *,
    learning_rate: float,
    schedule_steps: int,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    power: float = 0.9,
    head_regexes: Sequence[str] = (),
    head_lr_mult: float = 10.0,
    frozen_regexes: Sequence[str] = (),
    optimizer: str = "sgd",
    schedule_offset: int = 0,
    decay_every: int = 0,
    decay_factor: float = 1.0,
) -> tuple[optax.GradientTransformation, Any]:
  """The segmentation network's optimiser.

  Args:
    learning_rate: base LR of the backbone.
    schedule_steps: length of the poly schedule (may exceed the run length,
      as in AdaptSegNet: 250k schedule, stop at 150k).
    momentum: SGD momentum (no Nesterov).
    weight_decay: coupled L2 added to the gradient (0 disables).
    power: poly exponent; 0 gives a constant LR (CRST self-training).
    head_regexes: parameter-path regexes trained at ``head_lr_mult`` x LR.
    head_lr_mult: LR multiplier of the heads.
    frozen_regexes: parameter-path regexes that are never updated (BN affine
      parameters, dead ASPP branches, a frozen decoder).
    optimizer: ``'sgd'`` (the originals) or ``'adam'`` (for small from-scratch
      CPU models).
    schedule_offset: the schedule is read at ``count + schedule_offset``: a
      fresh optimiser (new state, count 0) that continues another one's LR
      schedule, e.g. the second phase of a two-phase run.
    decay_every: with ``decay_factor``, the LR is also multiplied by
      ``decay_factor ** (count // decay_every)`` (CBST's MXNet code: ÷√2
      per self-training round); 0 disables.
    decay_factor: the staircase factor.

  Returns:
    ``(tx, labels_fn)``; ``labels_fn(params)`` gives the partition labels, so
    tests can check that every parameter was labelled.
  """
  schedule = staircase(poly_schedule(learning_rate, schedule_steps, power),
                       decay_every, decay_factor)
  if schedule_offset:
    base_schedule = schedule
    schedule = lambda count: base_schedule(count + schedule_offset)
  if optimizer == "sgd":
    base = optax.sgd(schedule, momentum=momentum or None)
  elif optimizer == "adam":
    base = optax.adam(schedule)
  else:
    raise ValueError(f"unknown optimizer {optimizer!r}; use 'sgd' or 'adam'")
  parts = []
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(base)
  if head_regexes and head_lr_mult != 1.0:
    parts.append(optax.masked(optax.scale(head_lr_mult),
                              lambda p: path_mask(p, head_regexes)))
  train_tx = optax.chain(*parts)

  def labels_fn(params):
    return param_labels(params, frozen_regexes)

  tx = optax.partition({TRAIN: train_tx, FROZEN: optax.set_to_zero()},
                       labels_fn)
  return tx, labels_fn


def make_discriminator_tx(*, learning_rate: float, schedule_steps: int,
                          b1: float = 0.9, b2: float = 0.99,
                          power: float = 0.9) -> optax.GradientTransformation:
  """Adam with the originals' betas (0.9, 0.99) and the same poly schedule."""
  return optax.adam(poly_schedule(learning_rate, schedule_steps, power),
                    b1=b1, b2=b2)


def accumulate(tx: optax.GradientTransformation,
               every_k: int) -> optax.GradientTransformation:
  """Gradient accumulation: one ``tx`` update per ``every_k`` calls.

  ``optax.MultiSteps`` averages the gradients of ``every_k`` consecutive
  calls and hands the mean to ``tx`` on the last one; the others return zero
  updates. With equal micro-batches that mean is the gradient of the
  ``every_k`` times larger batch, so the effective batch is
  ``batch_size * every_k`` (BatchNorm statistics, which are not gradients,
  still update every micro-batch). ``tx``'s own step count (and so its LR
  schedule) advances once per update. The accumulator lives in the optimiser
  state, so checkpoints taken mid-accumulation resume exactly.

  Args:
    tx: the optimiser of one update.
    every_k: micro-batches per update; 1 returns ``tx`` unchanged.

  Returns:
    The accumulating transformation (``tx`` itself when ``every_k == 1``).
  """
  if int(every_k) < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {every_k}")
  if int(every_k) == 1:
    return tx
  return optax.MultiSteps(tx, every_k_schedule=int(every_k)
                          ).gradient_transformation()
