"""TPLD phase 2 (image confidence, easy/hard split, easy-image labels) and
pseudo-label diagnostics.

METHODS.md §7.3: images are ranked by `image_confidence`, the top fraction
(`easy_hard_split`) gets full labels (`easy_image_labels`); `label_density`
and `label_precision` measure any pseudo-label map. Pure JAX: no model
calls, no Flax, no I/O.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxda.methods.self_training.thresholds import ratios, select
from jaxda.types import IGNORE_LABEL


def image_confidence(
    probs: jax.Array,
    thresholds: jax.Array,
    *,
    count_source: str = "argmax",
    strict: bool = True,
    ignore_index: int = IGNORE_LABEL,
    valid: Optional[jax.Array] = None,
) -> jax.Array:
  """TPLD image confidence conf_t (METHODS §7.3, Eq. 6).

  conf_t = (1/K') Σ_{k present} (N_t^{k*} / N_t^k) / λ_k, with N_t^k the
  pixels predicted (argmax p) as k and K' the number of such classes.
  `count_source='argmax'`: N_t^{k*} counts those with p_k > λ_k (`strict`)
  or p_k >= λ_k. `count_source='pseudo'`: N_t^{k*} counts CBST pseudo-labels
  equal to k (`select`, inclusive; `strict` is not used, as in the
  reference). An image without (valid) pixels scores 0.

  Args:
    probs: (B, H, W, C) probabilities.
    thresholds: (C,) λ.
    count_source: 'argmax' or 'pseudo'.
    strict: p > λ (True) or p >= λ (False) for 'argmax'.
    ignore_index: label used for unselected pixels in 'pseudo' mode.
    valid: optional (B, H, W) bool; only valid pixels are counted.

  Returns:
    (B,) float confidences.
  """
  if count_source not in ("argmax", "pseudo"):
    raise ValueError(f"unknown count_source {count_source!r}")
  probs = jnp.asarray(probs)
  thresholds = jnp.asarray(thresholds)
  num_classes = probs.shape[-1]
  dtype = jnp.promote_types(probs.dtype, jnp.float32)
  if valid is None:
    valid = jnp.ones(probs.shape[:-1], bool)
  class_ids = jnp.arange(num_classes)
  pred = jnp.argmax(probs, axis=-1)
  predicted = (pred[..., None] == class_ids) & valid[..., None]
  n_k = jnp.sum(predicted, axis=(1, 2), dtype=jnp.int32)  # (B, C)
  if count_source == "argmax":
    p_pred = jnp.max(probs, axis=-1)
    thr_pred = thresholds[pred]
    confident = p_pred > thr_pred if strict else p_pred >= thr_pred
    n_star = jnp.sum(predicted & confident[..., None], axis=(1, 2),
                     dtype=jnp.int32)
  else:
    pseudo = select(probs, thresholds, ignore_index=ignore_index)
    labelled = (pseudo[..., None] == class_ids) & valid[..., None]
    n_star = jnp.sum(labelled, axis=(1, 2), dtype=jnp.int32)
  present = n_k > 0
  lam = thresholds.astype(dtype)
  per_class = jnp.where(
      present,
      n_star.astype(dtype) / jnp.maximum(n_k, 1).astype(dtype) / lam, 0.0)
  num_present = jnp.sum(present, axis=-1)
  return jnp.where(num_present > 0,
                   jnp.sum(per_class, axis=-1) / jnp.maximum(num_present, 1),
                   0.0).astype(dtype)


def easy_hard_split(confidences: jax.Array, q: float = 0.3) -> jax.Array:
  """Easy-image mask: the top int(N × q) images by confidence (METHODS §7.3).

  Ranking is descending and stable (equal scores: lower index first).

  Args:
    confidences: (N,) image confidences (`image_confidence`).
    q: easy fraction (TPLD: 0.3).

  Returns:
    (N,) bool, True for easy images.
  """
  confidences = jnp.asarray(confidences)
  n = confidences.shape[0]
  n_easy = int(n * q)
  order = jnp.argsort(-confidences, stable=True)
  return jnp.zeros(n, bool).at[order[:n_easy]].set(True)


def easy_image_labels(
    probs: jax.Array,
    thresholds: jax.Array,
    *,
    gamma: float = 2.0,
):
  """Full pseudo-labels of easy images, TPLD Eq. 7 in 'weight' mode.

  Every pixel gets k* = argmax_k p_k / λ_k (first max on ties) with weight 1
  where p_k* >= λ_k* (the pixels `select` keeps) and (p_k* / λ_k*)^γ below,
  which calibrates the low, noisy values further down.

  Args:
    probs: (B, H, W, C) probabilities.
    thresholds: (C,) λ.
    gamma: γ (TPLD: 2).

  Returns:
    (labels (B, H, W) int32, weights (B, H, W) float32).
  """
  r = ratios(probs, thresholds)
  label = jnp.argmax(r, axis=-1).astype(jnp.int32)
  best = jnp.max(r, axis=-1)
  weight = jnp.where(best >= 1, 1.0, best ** gamma)
  return label, weight.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------


def label_density(labels: jax.Array,
                  ignore_index: int = IGNORE_LABEL) -> jax.Array:
  """Fraction of pixels carrying a pseudo-label.

  Args:
    labels: (B, H, W) int labels.
    ignore_index: unlabelled marker.

  Returns:
    float32 scalar in [0, 1].
  """
  return jnp.mean(jnp.asarray(labels) != ignore_index, dtype=jnp.float32)


def label_precision(labels: jax.Array,
                    ground_truth: jax.Array,
                    ignore_index: int = IGNORE_LABEL) -> jax.Array:
  """Fraction of pseudo-labelled pixels (with valid ground truth) correct.

  Args:
    labels: (B, H, W) int pseudo-labels.
    ground_truth: (B, H, W) int labels, `ignore_index` where unknown.
    ignore_index: marker in both maps.

  Returns:
    float32 scalar; NaN when no pixel is both pseudo-labelled and has
    valid ground truth (undefined precision, so that averaging over images
    with `jnp.nanmean` skips it rather than counting it as 0).
  """
  labels = jnp.asarray(labels)
  ground_truth = jnp.asarray(ground_truth)
  counted = (labels != ignore_index) & (ground_truth != ignore_index)
  correct = counted & (labels == ground_truth)
  num = jnp.sum(counted, dtype=jnp.float32)
  return jnp.where(num > 0, jnp.sum(correct, dtype=jnp.float32) / num,
                   jnp.nan)
