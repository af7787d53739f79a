"""Classification evaluation: confusion matrix on device, accuracies on host.

Every target val image is counted exactly once (the padding of the last
batch is masked out); accuracy = trace / total, per-class accuracy = the
diagonal over the row sums (recall of each class), mean class accuracy =
their mean over classes present in the ground truth (VisDA's metric).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxda.tasks import evaluation
from jaxda.methods import classification

IGNORE = 255


def make_predict_fn(models: classification.ClassificationModels, *,
                    bn_mode: str) -> Callable:
  """``predict(state, images) -> probs`` (B, C), running BN statistics."""

  def predict(state, images):
    fmap, _ = classification.extract_features(
        models, state.params, state.batch_stats, images, bn_mode=bn_mode,
        labelled=False, training=False)
    logits = classification.classify(models, state.params, fmap)["logits"]
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  return predict


# The confusion function is the segmentation one: it masks labels of any
# rank, here (B,).
make_confusion_fn = evaluation.make_confusion_fn


def summarize_confusion(confusion: np.ndarray,
                        class_names: Iterable[str]) -> dict[str, Any]:
  """Accuracies from a (C, C) confusion matrix (rows = ground truth).

  Returns:
    ``{'accuracy', 'mean_class_accuracy', 'per_class_accuracy': {name: acc
    or None}}``, fractions in [0, 1]; ``None`` marks a class absent from the
    ground truth (excluded from the mean).
  """
  confusion = np.asarray(confusion, np.int64)
  total = confusion.sum()
  rows = confusion.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    per_class = np.where(rows > 0, np.diag(confusion) / rows, np.nan)
  present = per_class[~np.isnan(per_class)]
  return {
      "accuracy": float(np.trace(confusion) / total) if total else 0.0,
      "mean_class_accuracy": float(present.mean()) if present.size else 0.0,
      "per_class_accuracy": {
          name: (None if np.isnan(v) else float(v))
          for name, v in zip(class_names, per_class)},
  }


def format_accuracy_table(result: dict[str, Any]) -> str:
  """A fixed-width per-class accuracy table (percent) for logs."""
  rows = [f"{'class':<16}{'acc. %':>8}"]
  for name, v in result["per_class_accuracy"].items():
    rows.append(f"{name:<16}{'  n/a' if v is None else f'{100 * v:8.2f}'}")
  rows.append(f"{'mean class acc.':<16}"
              f"{100 * result['mean_class_accuracy']:8.2f}")
  rows.append(f"{'accuracy':<16}{100 * result['accuracy']:8.2f}")
  return "\n".join(rows)
