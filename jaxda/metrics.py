"""Evaluation metrics: confusion matrix (JAX) and scores derived from it.

`confusion_matrix` runs on device inside the jitted evaluation step. The
scores (`iou_per_class`, `mean_iou`, ...) are NumPy functions on the host:
they run once per evaluation on a (C, C) matrix.

Accumulate per-batch matrices on the host in int64: one int32 matrix holds at
most 2**31 - 1 pixels per cell (about a thousand 2048x1024 images).

Segmentation protocol (METHODS.md §3.10, AdaptSegNet `compute_iou.py`):
IoU_k = diag / (row sum + column sum - diag), NaN when class k is absent from
both prediction and ground truth; mIoU = nanmean over classes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxda.types import IGNORE_LABEL


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def confusion_matrix(
    predictions: jax.Array,
    labels: jax.Array,
    num_classes: int,
    ignore_index: int = IGNORE_LABEL,
) -> jax.Array:
  """Counts (ground truth, prediction) pairs.

  Pixels whose label is `ignore_index` or outside [0, num_classes) are
  skipped, and so are pixels whose prediction is outside [0, num_classes)
  (they cannot be placed in the matrix; argmax predictions never are).

  Args:
    predictions: (...) integer predicted classes, e.g. (B, H, W) or (B,).
    labels: (...) integer ground-truth labels, same shape.
    num_classes: C (static).
    ignore_index: label value to skip (static).

  Returns:
    (C, C) int32 matrix; entry [i, j] counts pixels of true class i predicted
    as class j (rows = ground truth, columns = prediction).
  """
  if predictions.shape != labels.shape:
    raise ValueError(f"predictions {predictions.shape} and labels "
                     f"{labels.shape} must have the same shape")
  predictions = jnp.asarray(predictions).astype(jnp.int32).reshape(-1)
  labels = jnp.asarray(labels).astype(jnp.int32).reshape(-1)
  valid = ((labels != ignore_index) & (labels >= 0) & (labels < num_classes)
           & (predictions >= 0) & (predictions < num_classes))
  # Skipped pixels are sent to an out-of-range bin that mode='drop' discards.
  flat = jnp.where(valid, labels * num_classes + predictions,
                   num_classes * num_classes)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32)
  counts = counts.at[flat].add(1, mode="drop")
  return counts.reshape(num_classes, num_classes)


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator with NaN (and no warning) where denominator 0."""
  numerator = np.asarray(numerator, np.float64)
  denominator = np.asarray(denominator, np.float64)
  out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
  np.divide(numerator, denominator, out=out, where=denominator != 0)
  return out


def _nanmean(values: np.ndarray) -> float:
  """Mean over non-NaN entries; NaN (and no warning) if there are none."""
  values = np.asarray(values, np.float64)
  finite = ~np.isnan(values)
  return float(values[finite].mean()) if finite.any() else float("nan")


def _as_confusion(confusion) -> np.ndarray:
  confusion = np.asarray(confusion, np.float64)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f"expected a square (C, C) matrix, got {confusion.shape}")
  return confusion


def iou_per_class(confusion) -> np.ndarray:
  """Per-class intersection over union.

  Args:
    confusion: (C, C) counts, rows = ground truth, columns = prediction.

  Returns:
    (C,) float64 IoU; NaN for classes absent from both prediction and
    ground truth.
  """
  confusion = _as_confusion(confusion)
  diag = np.diag(confusion)
  union = confusion.sum(axis=1) + confusion.sum(axis=0) - diag
  return _safe_ratio(diag, union)


def mean_iou(confusion) -> float:
  """mIoU: nanmean of `iou_per_class` (NaN if every class is absent).

  Args:
    confusion: (C, C) counts, rows = ground truth, columns = prediction.

  Returns:
    Python float in [0, 1].
  """
  return _nanmean(iou_per_class(confusion))


def pixel_accuracy(confusion) -> float:
  """Overall accuracy: trace / total (NaN for an empty matrix).

  Args:
    confusion: (C, C) counts.

  Returns:
    Python float in [0, 1].
  """
  confusion = _as_confusion(confusion)
  return float(_safe_ratio(np.trace(confusion), confusion.sum()))


def per_class_accuracy(confusion) -> np.ndarray:
  """Recall of every class: diag / row sum.

  Args:
    confusion: (C, C) counts, rows = ground truth, columns = prediction.

  Returns:
    (C,) float64 accuracies; NaN for classes without ground-truth samples.
  """
  confusion = _as_confusion(confusion)
  return _safe_ratio(np.diag(confusion), confusion.sum(axis=1))


def mean_class_accuracy(confusion) -> float:
  """Mean per-class accuracy (VisDA-style), nanmean over classes.

  Args:
    confusion: (C, C) counts, rows = ground truth, columns = prediction.

  Returns:
    Python float in [0, 1]; NaN if no class has ground-truth samples.
  """
  return _nanmean(per_class_accuracy(confusion))
