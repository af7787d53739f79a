"""Unsupervised adaptation signals: is self-training still making progress?

Pure functions (no model calls, no Flax, no config, no I/O) on NumPy / JAX
arrays. None of them reads a target label: they tell a user whose target
split has no labels whether the rounds still change anything.

* **Prediction entropy** (`normalized_entropy`, `entropy_from_logits`,
  `mean_entropy`): per pixel ``H(p) / log C = -Σ_k p_k log p_k / log C``, in
  [0, 1]: 1 for a uniform prediction, 0 for a one-hot one. Its mean over the
  target set falls as the model becomes confident on the target.
* **Class-distribution drift** (`label_histogram`, `class_shares`,
  `class_drift`, `collapsed_classes`): the histogram of predicted (argmax)
  classes on the target against the source label histogram. The drift is
  the total variation distance ``TV = ½ Σ_k |t_k − s_k|`` between the two
  class shares, in [0, 1] (0: same class mix; 1: disjoint). TV is bounded
  and defined when a class is missing on one side (KL is not). A class is
  *collapsed* when the source has it (share > ``source_min_share``) but the
  target prediction (almost) never gives it (share <= ``target_max_share``):
  self-training's typical failure, where pseudo labels feed the dominant
  classes until rare ones vanish.
* **Pseudo-label agreement** (`label_agreement`): between two consecutive
  rounds' label maps, the fraction of pixels labelled in both (neither is
  the ignore label) and, of those, the fraction with the same class. An
  agreement near 1 means the labels have reached a fixed point: more rounds
  train on the same targets.
* `batch_signal_sums` (jittable) gives a batch's entropy sum, pixel count
  and predicted-class histogram, so a pass over the target set can sum them
  batch by batch; `no_progress` turns a history of per-round signals into a
  one-line warning.

Empty inputs are defined, never NaN: no valid pixel gives entropy 0 and an
all-zero histogram; an all-zero histogram has all-zero shares; no pixel
labelled in both rounds gives agreement 0 (no evidence of stable labels).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxda.types import IGNORE_LABEL

# Defaults of `collapsed_classes`: a class with more than 1% of the source
# pixels that gets at most 0.1% of the target predictions.
SOURCE_MIN_SHARE = 0.01
TARGET_MAX_SHARE = 0.001
# Defaults of `no_progress`.
PATIENCE = 2  # rounds over which the entropy must fall
MIN_ENTROPY_DROP = 0.01  # ... by at least this much (normalised entropy)
STABLE_AGREEMENT = 0.95  # agreement at which labels count as unchanged
COLLAPSED_FRACTION = 0.5  # share of the source's classes that is too many


# ---------------------------------------------------------------------------
# Entropy
# ---------------------------------------------------------------------------


def _log_classes(num_classes: int) -> float:
  if num_classes < 2:
    raise ValueError(f"entropy needs >= 2 classes, got {num_classes}")
  return math.log(num_classes)


def normalized_entropy(probs: jax.Array) -> jax.Array:
  """Per-pixel entropy of probabilities over the last axis, / log C.

  ``0 log 0 = 0``; clipped to [0, 1] against float rounding.

  Args:
    probs: (..., C) probabilities (rows sum to 1).

  Returns:
    (...) float32 in [0, 1].
  """
  probs = jnp.asarray(probs, jnp.float32)
  plogp = jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs,
                                                         1.0)), 0.0)
  h = -plogp.sum(axis=-1) / _log_classes(probs.shape[-1])
  return jnp.clip(h, 0.0, 1.0)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
  """`normalized_entropy` of ``softmax(logits)``, computed stably.

  Args:
    logits: (..., C).

  Returns:
    (...) float32 in [0, 1].
  """
  logits = jnp.asarray(logits, jnp.float32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  h = -(jnp.exp(log_p) * log_p).sum(axis=-1) / _log_classes(logits.shape[-1])
  return jnp.clip(h, 0.0, 1.0)


def batch_signal_sums(probs: jax.Array,
                      valid: Optional[jax.Array] = None) -> dict[str, Any]:
  """One batch's sums for the target signals (jittable, on device).

  Args:
    probs: (B, H, W, C) probabilities.
    valid: optional (B, H, W) bool; pixels outside it (e.g. padding images)
      are not counted.

  Returns:
    ``entropy_sum`` float32 (Σ of `normalized_entropy` over valid pixels),
    ``pixels`` int32 (valid pixels) and ``predicted`` (C,) int32 (valid
    pixels per argmax class). Sums of these over batches give
    `mean_entropy` and the predicted-class histogram.
  """
  c = probs.shape[-1]
  if valid is None:
    valid = jnp.ones(probs.shape[:-1], bool)
  valid = jnp.broadcast_to(valid, probs.shape[:-1])
  h = normalized_entropy(probs)
  pred = jnp.argmax(probs, axis=-1).reshape(-1)
  weight = valid.reshape(-1).astype(jnp.int32)
  return {
      "entropy_sum": jnp.where(valid, h, 0.0).sum(),
      "pixels": weight.sum(),
      "predicted": jnp.zeros((c,), jnp.int32).at[pred].add(weight),
  }


def mean_entropy(probs, valid=None) -> float:
  """Mean `normalized_entropy` over the valid pixels; 0.0 if there are none."""
  sums = batch_signal_sums(jnp.asarray(probs), valid)
  pixels = int(sums["pixels"])
  return float(sums["entropy_sum"]) / pixels if pixels else 0.0


# ---------------------------------------------------------------------------
# Class-distribution drift
# ---------------------------------------------------------------------------


def label_histogram(labels, num_classes: int) -> np.ndarray:
  """(C,) int64 pixel count per class of a label map; values >= C (e.g.
  ``IGNORE_LABEL``) are not counted."""
  flat = np.asarray(labels).reshape(-1)
  if flat.dtype != np.uint8:  # uint8 (label maps): no mask needed
    flat = flat.astype(np.int64)
    flat = flat[(flat >= 0) & (flat < num_classes)]
  counts = np.bincount(flat, minlength=num_classes)
  return counts[:num_classes].astype(np.int64)


def class_shares(hist) -> np.ndarray:
  """Histogram / its total (float64); all zeros for an empty histogram."""
  hist = np.asarray(hist, np.float64)
  total = hist.sum()
  return hist / total if total > 0 else np.zeros_like(hist)


def class_drift(predicted_hist, source_hist) -> float:
  """Total variation distance ½ Σ|t − s| between the class shares, in [0, 1].

  An empty histogram has all-zero shares (so drift against a non-empty one
  is 0.5, and 0 between two empty ones).
  """
  t, s = class_shares(predicted_hist), class_shares(source_hist)
  if t.shape != s.shape:
    raise ValueError(f"histograms differ in classes: {t.shape} vs {s.shape}")
  return float(0.5 * np.abs(t - s).sum())


def collapsed_classes(predicted_hist, source_hist, *,
                      source_min_share: float = SOURCE_MIN_SHARE,
                      target_max_share: float = TARGET_MAX_SHARE
                      ) -> np.ndarray:
  """Indices of classes the source has but the target prediction lacks.

  Class k is collapsed when its source share is > ``source_min_share`` and
  its share of the target predictions is <= ``target_max_share``.

  Returns:
    int64 array of class indices, ascending.
  """
  t, s = class_shares(predicted_hist), class_shares(source_hist)
  return np.flatnonzero((s > source_min_share) & (t <= target_max_share))


# ---------------------------------------------------------------------------
# Pseudo-label agreement between rounds
# ---------------------------------------------------------------------------


def label_agreement(previous, current, *, ignore_label: int = IGNORE_LABEL,
                    chunk: int = 64) -> dict[str, float]:
  """Agreement of two rounds' pseudo-label maps (same shape).

  Args:
    previous, current: (N, ...) integer label maps, ``ignore_label`` where a
      pixel has no pseudo label.
    chunk: rows compared at a time (bounds the temporaries to a chunk).

  Returns:
    ``labelled_both``: fraction of all pixels labelled in both maps;
    ``agreement``: of those, the fraction with the same label (0.0 when no
    pixel is labelled in both). Both in [0, 1]; 0.0 for empty maps.
  """
  previous, current = np.asarray(previous), np.asarray(current)
  if previous.shape != current.shape:
    raise ValueError(f"label maps differ in shape: {previous.shape} vs"
                     f" {current.shape}")
  if previous.ndim == 0:
    previous, current = previous[None], current[None]
  total = both = same = 0
  for i in range(0, len(previous), max(int(chunk), 1)):
    a, b = previous[i:i + chunk], current[i:i + chunk]
    labelled = (a != ignore_label) & (b != ignore_label)
    total += a.size
    both += int(labelled.sum())
    same += int((labelled & (a == b)).sum())
  return {"labelled_both": both / total if total else 0.0,
          "agreement": same / both if both else 0.0}


# ---------------------------------------------------------------------------
# The warning
# ---------------------------------------------------------------------------


def no_progress(history: Sequence[dict[str, Any]], *,
                patience: int = PATIENCE,
                min_entropy_drop: float = MIN_ENTROPY_DROP,
                stable_agreement: float = STABLE_AGREEMENT,
                collapsed_fraction: float = COLLAPSED_FRACTION
                ) -> Optional[str]:
  """A one-line warning when the per-round signals show no progress.

  ``history`` holds one dict per round, oldest first, with the keys
  ``target_entropy`` (mean normalised entropy), ``num_collapsed`` (collapsed
  class count), ``agreement`` (vs the previous round; None in the first
  round) and optionally ``num_source_classes`` (source classes above
  ``SOURCE_MIN_SHARE``), ``round`` and ``collapsed_classes`` (names or
  indices, for the message). Entries missing a key are skipped by the rule
  that needs it. Three rules fire:

  1. *stalled*: over the last ``patience`` rounds the entropy fell by less
     than ``min_entropy_drop`` (default 0.01, i.e. 1% of log C) **and** in
     each of them the pseudo labels agreed with the previous round's on at
     least ``stable_agreement`` (default 0.95) of the pixels labelled in
     both: the model and its labels have stopped changing, so further rounds
     train on the same targets;
  2. *collapse*: more classes are collapsed now than in the first round
     (the base model): self-training is eating classes the source has;
  3. *no recovery*: after ``patience`` rounds at least
     ``collapsed_fraction`` (default 0.5) of the source's classes are still
     collapsed, no fewer than in the first round: the model predicts only a
     few classes on the target and self-training does not bring the others
     back (its labels come from the same predictions).

  Returns:
    None, or one line naming the rule(s) and their numbers.
  """
  if patience < 1:
    raise ValueError(f"patience must be >= 1, got {patience}")
  history = list(history)
  if not history:
    return None
  last = history[-1]
  where = f" at round {last['round']}" if "round" in last else ""
  problems = []

  window = history[-(patience + 1):]
  entropies = [h.get("target_entropy") for h in window]
  agreements = [h.get("agreement") for h in window[1:]]
  if (len(window) == patience + 1 and None not in entropies
      and None not in agreements):
    drop = entropies[0] - entropies[-1]
    if drop < min_entropy_drop and min(agreements) >= stable_agreement:
      problems.append(
          f"target entropy {entropies[0]:.3f} -> {entropies[-1]:.3f} over"
          f" {patience} rounds (drop < {min_entropy_drop:g}) while pseudo"
          f" labels agree >= {100 * min(agreements):.1f}% with the previous"
          " round's")

  first, now = history[0].get("num_collapsed"), last.get("num_collapsed")
  names = last.get("collapsed_classes")
  listed = f" ({', '.join(str(n) for n in names)})" if names else ""
  source = last.get("num_source_classes")
  if first is not None and now is not None and now > first:
    problems.append(f"{now} source classes no longer predicted on target"
                    f"{listed}, {first} at the first round")
  elif (first is not None and now is not None and source
        and len(history) > patience and now >= first
        and now >= collapsed_fraction * source):
    problems.append(f"{now} of the source's {source} classes still never"
                    f" predicted on target{listed} after"
                    f" {len(history) - 1} rounds ({first} at the first)")

  if not problems:
    return None
  return (f"WARNING: self-training shows no progress{where}: "
          + "; ".join(problems)
          + " (label-free signals; check the base model, LR and rounds)")
