"""Thing-class ImageNet feature distance (METHODS.md §17.3.6).

Keeps the student's bottleneck features near those of the frozen ImageNet
encoder where thing classes are, which the DAFormer paper found protects the
recognition of rare thing classes the synthetic source teaches poorly.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxda.types import IGNORE_LABEL

# Cityscapes train ids: light, sign, person, rider, car, truck, bus, train,
# motorcycle, bicycle.
CITYSCAPES_THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def downscale_label_ratio(labels: jax.Array, scale: int,
                          min_ratio: float = 0.75,
                          num_classes: int = 19,
                          ignore_label: int = IGNORE_LABEL) -> jax.Array:
  """Majority label of each ``scale`` x ``scale`` cell (the original's
  ``downscale_label_ratio``).

  The ignore label is one extra class; the cell takes the first most frequent
  class, and becomes ``ignore_label`` if that is the ignore slot or its share
  is below ``min_ratio``. Trailing rows/columns beyond a whole cell are dropped.

  Args:
    labels: (B, H, W) int labels.
    scale: cell side (label width // feature width).
    min_ratio: minimum majority share.
    num_classes: real classes.
    ignore_label: void label.

  Returns:
    (B, H // scale, W // scale) int32.
  """
  b, h, w = labels.shape
  th, tw = h // scale, w // scale
  lab = labels[:, :th * scale, :tw * scale].astype(jnp.int32)
  lab = jnp.where(lab == ignore_label, num_classes, lab)
  onehot = jax.nn.one_hot(lab, num_classes + 1, dtype=jnp.float32)
  pooled = onehot.reshape(b, th, scale, tw, scale, num_classes + 1).mean((2, 4))
  ratio = jnp.max(pooled, axis=-1)
  down = jnp.argmax(pooled, axis=-1).astype(jnp.int32)
  down = jnp.where((down == num_classes) | (ratio < min_ratio), ignore_label,
                   down)
  return down


def thing_class_mask(labels: jax.Array, feature_hw: tuple[int, int],
                     thing_classes: Sequence[int] = CITYSCAPES_THING_CLASSES,
                     min_ratio: float = 0.75, num_classes: int = 19,
                     ignore_label: int = IGNORE_LABEL) -> jax.Array:
  """(B, h, w) bool: cells whose downscaled label is a thing class.

  The scale is label width // feature width, as the original computes it.
  """
  scale = labels.shape[2] // feature_hw[1]
  down = downscale_label_ratio(labels, scale, min_ratio, num_classes,
                               ignore_label)
  down = down[:, :feature_hw[0], :feature_hw[1]]
  return jnp.isin(down, jnp.asarray(thing_classes, jnp.int32))


def _safe_norm(x: jax.Array) -> jax.Array:
  """L2 norm over the last axis with a zero (not NaN) gradient at 0."""
  sq = jnp.sum(jnp.square(x), axis=-1)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def feature_distance(student: jax.Array, imagenet: jax.Array,
                     mask: jax.Array | None = None, lam: float = 0.005,
                     empty: str = 'zero') -> jax.Array:
  """lam * mean over masked cells of ||student - imagenet||_2 (not squared).

  Args:
    student: (B, h, w, C) student bottleneck features.
    imagenet: (B, h, w, C) frozen ImageNet features (no gradient flows).
    mask: (B, h, w) bool, or None for every cell.
    lam: loss weight (0.005).
    empty: 'zero' returns 0 for an empty mask; 'nan' returns NaN as the
      original does (its gradient stays finite: 0).

  Returns:
    Scalar loss.
  """
  diff = student.astype(jnp.float32) - jax.lax.stop_gradient(
      imagenet.astype(jnp.float32))
  dist = _safe_norm(diff)
  m = jnp.ones(dist.shape, jnp.float32) if mask is None else mask.astype(
      jnp.float32)
  count = jnp.sum(m)
  loss = lam * jnp.sum(dist * m) / jnp.maximum(count, 1.0)
  if empty == 'nan':
    loss = jnp.where(count > 0, loss, jnp.nan)
  elif empty != 'zero':
    raise ValueError(f'empty must be zero or nan, got {empty!r}')
  return loss
