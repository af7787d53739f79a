"""Segmentation evaluation at the labels' own resolution (real data sets).

The originals' protocol (METHODS.md §3.5, §3.10): the network sees the target
image at the training size (Cityscapes 1024x512), its main logits are
upsampled with align-corners bilinear straight to the ground-truth size
(2048x1024), argmax, and the confusion matrix is summed over every val image
exactly once. Batches have one shape: the last one is padded with zero
images and ignore labels whose `mask` is False, so padding never counts.

Applies to domains whose labels are `sources.LazyArray` views (the real data
sets) when `config.eval.full_resolution` is True; the embedded benchmarks
keep the in-memory evaluation of `segmentation.evaluate`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxda.tasks import evaluation
from jaxda import metrics
from jaxda import parallel
from jaxda import types
from jaxda.data import pipeline
from jaxda.tasks import splits
from jaxda.data import tables
from jaxda.models import forward


def applies(config, domain) -> bool:
  """True if `domain`'s labels are lazy real-data labels and it is enabled."""
  return (bool(config.eval.get("full_resolution", True))
          and domain.labels is not None
          and getattr(domain.labels, "is_lazy_source", False)
          and domain.labels.ndim == 3)


def eval_batches(images, labels, *, batch_size: int,
                 mode: str) -> Iterator[dict]:
  """In-order batches with native-resolution labels, each image once.

  Args:
    images: (N, h, w, 3) uint8 array or lazy view, at the network input size.
    labels: (N, H, W) uint8 labels at full resolution (array or lazy view).
    batch_size: B.
    mode: normalisation mode (`pipeline.normalize`).

  Yields:
    ceil(N / B) dicts: 'image' float32 (B, h, w, 3), 'label' int32
    (B, H, W), 'index' int32 (B,) (-1 for padding) and 'mask' bool (B,).
  """
  n = len(images)
  if len(labels) != n:
    raise ValueError(f"{n} images but {len(labels)} labels")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    image = np.asarray(images[np.arange(start, stop)])
    label = np.asarray(labels[np.arange(start, stop)]).astype(np.int32)
    index = np.arange(start, stop, dtype=np.int32)
    mask = np.ones(stop - start, bool)
    if pad:
      image = np.concatenate(
          [image, np.zeros((pad,) + image.shape[1:], image.dtype)])
      label = np.concatenate([label, np.full(
          (pad,) + label.shape[1:], types.IGNORE_LABEL, np.int32)])
      index = np.concatenate([index, np.full(pad, -1, np.int32)])
      mask = np.concatenate([mask, np.zeros(pad, bool)])
    yield {"image": pipeline.normalize(image, mode), "label": label,
           "index": index, "mask": mask}


def make_confusion_fn(models: forward.Models, num_classes: int, *,
                      bn_mode: str, align_corners: bool,
                      scales: tuple[float, ...] = (1.0,),
                      flip: bool = False) -> Callable:
  """``fn(state, batch) -> (C, C)`` with logits upsampled to the label size
  (averaged over ``scales`` x ``flip``: ``evaluation.make_scaled_logits_fn``).

  ``batch``: 'image' (B, h, w, 3), 'label' (B, H, W), 'mask' (B,).
  """

  logits_fn = evaluation.make_scaled_logits_fn(
      models, bn_mode=bn_mode, align_corners=align_corners,
      scales=tuple(scales), flip=flip)

  def confusion(state, batch):
    logits = logits_fn(state, batch["image"], batch["label"].shape[1:3])
    preds = jnp.argmax(logits, axis=-1)
    labels = jnp.where(batch["mask"][:, None, None], batch["label"],
                       types.IGNORE_LABEL)
    return metrics.confusion_matrix(preds, labels, num_classes,
                                     ignore_index=types.IGNORE_LABEL)

  return confusion


def eval_views(config) -> dict[str, Any]:
  """``{'scales', 'flip'}`` of ``config.eval`` (default: single scale)."""
  return {"scales": tuple(float(s) for s in config.eval.get("scales",
                                                            (1.0,))),
          "flip": bool(config.eval.get("flip", False))}


def add_synthia13(result: dict[str, Any], confusion: np.ndarray,
                  class_names) -> dict[str, Any]:
  """Adds mIoU* (13 classes) when the classes are the 16 SYNTHIA ones."""
  if tuple(class_names) == tables.SYNTHIA16_CLASSES:
    ious = metrics.iou_per_class(np.asarray(confusion, np.int64))
    result["miou13"] = float(np.nanmean(
        np.asarray(ious)[list(tables.SYNTHIA13_INDICES)]))
  return result


def evaluate_target(run, state, step: int, *,
                    prefix: str = "target") -> dict[str, Any]:
  """`segmentation.evaluate` at full label resolution (module doc)."""
  cfg = run.config
  confusion_fn = jax.jit(
      make_confusion_fn(run.models, run.num_classes,
                        bn_mode=cfg.model.bn_mode,
                        align_corners=cfg.model.upsample_align_corners,
                        **eval_views(cfg)),
      in_shardings=(parallel.replicated(run.mesh),
                    parallel.batch_sharded(run.mesh)),
      out_shardings=parallel.replicated(run.mesh))
  domain = run.data["target_val"]
  batch_size = splits.eval_batch_size(run)
  # This process's rows (load_data kept only its share), as many global
  # batches on every process.
  confusion = evaluation.evaluate(
      confusion_fn, state,
      parallel.process_eval_batches(
          domain.images, domain.labels.native, global_batch_size=batch_size,
          mode=cfg.data.normalization, make_batches=eval_batches),
      run.mesh)
  result = evaluation.summarize_confusion(confusion, run.class_names)
  add_synthia13(result, confusion, run.class_names)
  result["num_images"] = int(parallel.sum_over_processes(
      np.asarray(len(domain.images))))
  result["num_pixels"] = int(confusion.sum())
  result["confusion"] = confusion.tolist()
  scalars = {f"{prefix}/miou": result["miou"],
             f"{prefix}/pixel_accuracy": result["pixel_accuracy"]}
  if "miou13" in result:
    scalars[f"{prefix}/miou13"] = result["miou13"]
  run.writer.write_scalars(step, scalars)
  return result
