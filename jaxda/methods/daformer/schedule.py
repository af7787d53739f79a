"""DAFormer's optimiser: AdamW with parameter groups, warm-up + poly LR.

Mirrors mmcv 1.3.7's ``PolyLrUpdaterHook`` with linear warm-up and its
``paramwise_cfg`` (METHODS.md §17.3.10): the decode head learns 10x faster
(it starts from scratch while the encoder is ImageNet-pretrained) and
LayerNorms get no weight decay.
"""

from __future__ import annotations

from collections.abc import Sequence
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

HEAD = 'head'
NO_DECAY = 'no_decay'
DEFAULT = 'default'


def poly_warmup_schedule(base_lr: float = 6e-5, max_steps: int = 40000,
                         warmup_steps: int = 1500, warmup_ratio: float = 1e-6,
                         power: float = 1.0, min_lr: float = 0.0
                         ) -> optax.Schedule:
  """LR set before 0-based step i.

  regular = (base - min_lr) * (1 - i / max_steps) ** power + min_lr; for
  i < warmup_steps it is multiplied by 1 - (1 - i / warmup_steps) *
  (1 - warmup_ratio) (the warm-up factor multiplies the poly value).
  Steps past ``max_steps`` give ``min_lr``.
  """

  def schedule(step):
    i = jnp.minimum(jnp.asarray(step, jnp.float32), float(max_steps))
    # (max - i) / max rather than 1 - i / max: exact in float32 near the end.
    regular = ((base_lr - min_lr) * ((max_steps - i) / max_steps) ** power
               + min_lr)
    if warmup_steps <= 0:
      return regular
    # = 1 - (1 - i / w) * (1 - ratio), written so float32 keeps ratio exact.
    factor = warmup_ratio + (1.0 - warmup_ratio) * (i / warmup_steps)
    return jnp.where(i < warmup_steps, regular * factor, regular)

  return schedule


def _path(path: Sequence[Any]) -> str:
  """Pytree key path -> 'a/b/c'."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def param_group_labels(params: Any,
                       rules: Sequence[tuple[str, str]] = (
                           ('pos_block', NO_DECAY), ('head', HEAD),
                           ('norm', NO_DECAY))) -> Any:
  """Labels each parameter by the first rule whose regex searches its path.

  The default rules are mmcv's ``custom_keys`` in its order (``pos_block``
  decay 0, ``head`` lr x 10, ``norm`` decay 0): a head norm is a head
  parameter (decayed), biases are decayed. Unmatched: ``'default'``.
  """
  compiled = [(re.compile(r), label) for r, label in rules]

  def label(path, _):
    p = _path(path)
    for rx, lab in compiled:
      if rx.search(p):
        return lab
    return DEFAULT

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(params: Any, base_lr: float = 6e-5, max_steps: int = 40000,
                   warmup_steps: int = 1500, warmup_ratio: float = 1e-6,
                   power: float = 1.0, head_lr_mult: float = 10.0,
                   weight_decay: float = 0.01, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8,
                   rules: Sequence[tuple[str, str]] | None = None
                   ) -> optax.GradientTransformation:
  """AdamW with the groups of `param_group_labels`, one schedule each.

  Decoupled decay is scaled by the group's LR, as PyTorch's AdamW does.

  Args:
    params: the parameter tree (only its structure and paths are read).
    base_lr .. power: `poly_warmup_schedule` arguments.
    head_lr_mult: LR factor of the 'head' group.
    weight_decay, b1, b2, eps: AdamW.
    rules: optional (regex, label) rules, labels in 'head', 'no_decay',
      'default'.
  """
  sched = lambda mult: poly_warmup_schedule(
      base_lr * mult, max_steps, warmup_steps, warmup_ratio, power)
  adamw = lambda mult, wd: optax.adamw(sched(mult), b1=b1, b2=b2, eps=eps,
                                       weight_decay=wd)
  labels = (param_group_labels(params) if rules is None
            else param_group_labels(params, rules))
  return optax.multi_transform(
      {HEAD: adamw(head_lr_mult, weight_decay),
       NO_DECAY: adamw(1.0, 0.0),
       DEFAULT: adamw(1.0, weight_decay)}, labels)
