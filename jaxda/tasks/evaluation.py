"""Segmentation evaluation: confusion matrix on device, IoU on the host.

Protocol of the originals (METHODS.md §3.10): main output upsampled to the
label resolution with align-corners bilinear, argmax, confusion matrix over
every image exactly once (padding of the last batch masked out), per-class
IoU = diag / (row + col - diag), mIoU = nanmean over classes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxda import metrics
from jaxda import parallel
from jaxda.models import forward
from jaxda.types import IGNORE_LABEL


def make_predict_fn(models: forward.Models, *, bn_mode: str,
                    align_corners: bool, scales: tuple[float, ...] = (1.0,),
                    flip: bool = False) -> Callable:
  """``predict(state, images) -> probs`` (B, H, W, C) of the main output.

  Runs with running BatchNorm statistics (never updated), as every
  evaluation or pseudo-labelling pass must. ``scales`` / ``flip``: logits
  averaged over rescaled (and mirrored) inputs (``make_scaled_logits_fn``).
  """

  if tuple(scales) != (1.0,) or flip:
    scaled = make_scaled_logits_fn(models, bn_mode=bn_mode,
                                   align_corners=align_corners,
                                   scales=scales, flip=flip)
    return lambda state, images: jax.nn.softmax(
        scaled(state, images, images.shape[1:3]), axis=-1)

  logits_fn = make_logits_fn(models, bn_mode=bn_mode)

  def predict(state, images):
    return probs_from_logits(logits_fn(state, images), images.shape[1:3],
                             align_corners=align_corners)

  return predict


def make_scaled_logits_fn(models: forward.Models, *, bn_mode: str,
                          align_corners: bool, scales: tuple[float, ...],
                          flip: bool) -> Callable:
  """``logits(state, images, size) -> (B, *size, C)`` float32 main logits.

  CRST's test protocol (METHODS.md §3.10: scales 0.9, 1.0, 1.2 x flip):
  the input is resized by each scale (bilinear, half-pixel, as cv2), each
  view's logits (and the mirrored view's, mirrored back) are upsampled to
  ``size`` and averaged. One scale 1.0 without flip is single-scale.
  """
  logits_fn = make_logits_fn(models, bn_mode=bn_mode)

  def logits(state, images, size):
    b, h, w, c = images.shape
    total = 0.0
    for s in scales:
      x = images if s == 1.0 else jax.image.resize(
          images, (b, max(1, round(h * s)), max(1, round(w * s)), c),
          "bilinear")
      for mirrored in ((False, True) if flip else (False,)):
        view = x[:, :, ::-1] if mirrored else x
        out = forward.upsample_outputs(
            {"main": logits_fn(state, view).astype(jnp.float32)},
            tuple(size), align_corners=align_corners)["main"]
        total = total + (out[:, :, ::-1] if mirrored else out)
    return total / (len(scales) * (2 if flip else 1))

  return logits


def make_logits_fn(models: forward.Models, *, bn_mode: str) -> Callable:
  """``logits(state, images) -> (B, h, w, C)`` main output at output stride.

  The network part of ``make_predict_fn``: running BatchNorm statistics,
  no upsampling (h, w are the network's output size, 1/8 of the input for
  DeepLab-v2).
  """

  def logits(state, images):
    outputs, _ = forward.forward(
        models, state.params, state.batch_stats, images, bn_mode=bn_mode,
        labelled=False, training=False)
    return outputs["main"]

  return logits


def probs_from_logits(logits: jax.Array, size: tuple[int, int], *,
                      align_corners: bool) -> jax.Array:
  """(B, h, w, C) logits -> (B, H, W, C) float32 softmax at ``size``."""
  up = forward.upsample_outputs({"main": logits}, tuple(size),
                             align_corners=align_corners)["main"]
  return jax.nn.softmax(up.astype(jnp.float32), axis=-1)


def make_confusion_fn(predict_fn: Callable, num_classes: int) -> Callable:
  """``fn(state, batch) -> (C, C)`` confusion summed over the global batch.

  ``batch`` holds ``image`` (B, H, W, 3), ``label`` (B, H, W) for
  segmentation or (B,) for classification, and ``mask`` (B,) marking real
  (not padding) examples. ``predict_fn`` returns probabilities with the
  label's shape plus a class axis.
  """

  def confusion(state, batch):
    preds = jnp.argmax(predict_fn(state, batch["image"]), axis=-1)
    label = batch["label"]
    mask = batch["mask"].reshape(
        batch["mask"].shape + (1,) * (label.ndim - 1))
    labels = jnp.where(mask, label, IGNORE_LABEL)
    return metrics.confusion_matrix(preds, labels, num_classes,
                                    ignore_index=IGNORE_LABEL)

  return confusion


def summarize_confusion(confusion: np.ndarray,
                        class_names: Iterable[str]) -> dict[str, Any]:
  """Turns a confusion matrix into the summary's metrics.

  Returns:
    ``{'miou', 'pixel_accuracy', 'per_class_iou': {name: iou or None}}``;
    IoU values are fractions in [0, 1]; ``None`` marks a class absent from
    both prediction and ground truth (excluded from the nanmean).
  """
  confusion = np.asarray(confusion, np.int64)
  ious = metrics.iou_per_class(confusion)
  return {
      "miou": float(metrics.mean_iou(confusion)),
      "pixel_accuracy": float(metrics.pixel_accuracy(confusion)),
      "per_class_iou": {
          name: (None if np.isnan(v) else float(v))
          for name, v in zip(class_names, ious)},
  }


def evaluate(confusion_fn_jit: Callable, state, batches: Iterable[dict],
             mesh) -> np.ndarray:
  """Accumulates the confusion matrix over ``batches`` (host int64)."""
  total = None
  for batch in batches:
    cm = parallel.to_host(confusion_fn_jit(state, parallel.shard_batch(
        batch, mesh)))
    total = cm.astype(np.int64) if total is None else total + cm
  if total is None:
    raise ValueError("evaluation set is empty")
  return total


def format_iou_table(result: dict[str, Any]) -> str:
  """A fixed-width per-class IoU table (percent) for logs and terminals."""
  rows = [f"{'class':<16}{'IoU %':>8}"]
  for name, v in result["per_class_iou"].items():
    rows.append(f"{name:<16}{'  n/a' if v is None else f'{100 * v:8.2f}'}")
  rows.append(f"{'mIoU':<16}{100 * result['miou']:8.2f}")
  rows.append(f"{'pixel acc.':<16}{100 * result['pixel_accuracy']:8.2f}")
  return "\n".join(rows)
