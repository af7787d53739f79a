"""Tests for jaxda.metrics against loop-based NumPy references."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda import metrics
from jaxda import types

IGNORE = types.IGNORE_LABEL


def np_confusion(pred, labels, num_classes):
  conf = np.zeros((num_classes, num_classes), np.int64)
  for p, y in zip(np.ravel(pred), np.ravel(labels)):
    if y != IGNORE and 0 <= y < num_classes and 0 <= p < num_classes:
      conf[y, p] += 1
  return conf


def np_iou(conf):
  """IoU from explicit pixel-set sizes: |pred=k & gt=k| / |pred=k | gt=k|."""
  c = conf.shape[0]
  out = []
  for k in range(c):
    inter = conf[k, k]
    union = sum(conf[i, j] for i in range(c) for j in range(c)
                if i == k or j == k)
    out.append(inter / union if union else float("nan"))
  return np.array(out)


def test_confusion_matrix_matches_reference_with_ignore_and_bad_labels():
  rng = np.random.default_rng(0)
  num_classes = 5
  pred = rng.integers(0, num_classes, size=(2, 7, 9))
  labels = rng.integers(0, num_classes, size=(2, 7, 9))
  labels[rng.random(labels.shape) < 0.2] = IGNORE
  labels[0, 0, :3] = [num_classes, -1, 17]   # outside [0, C): ignored
  pred[1, 0, :2] = [num_classes, -3]         # outside [0, C): dropped
  conf = metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(labels),
                                  num_classes)
  chex.assert_shape(conf, (num_classes, num_classes))
  chex.assert_type(conf, jnp.int32)
  np.testing.assert_array_equal(conf, np_confusion(pred, labels, num_classes))


def test_confusion_matrix_orientation_rows_are_ground_truth():
  labels = jnp.asarray([0, 0, 0, 1])
  pred = jnp.asarray([1, 1, 0, 1])
  conf = np.asarray(metrics.confusion_matrix(pred, labels, 3))
  assert conf[0, 1] == 2 and conf[1, 0] == 0
  np.testing.assert_array_equal(conf.sum(axis=1), [3, 1, 0])


def test_confusion_matrix_inside_jit_and_custom_ignore():
  rng = np.random.default_rng(1)
  pred = rng.integers(0, 4, size=(3, 6))
  labels = rng.integers(0, 4, size=(3, 6))
  labels[0] = 3  # with ignore_index=3, class 3 never counted

  @jax.jit
  def step(p, y):
    return metrics.confusion_matrix(p, y, 4, ignore_index=3)

  conf = np.asarray(step(pred, labels))
  expected = np_confusion(pred, np.where(labels == 3, IGNORE, labels), 4)
  np.testing.assert_array_equal(conf, expected)


def test_confusion_matrix_rejects_shape_mismatch():
  with pytest.raises(ValueError):
    metrics.confusion_matrix(jnp.zeros((2, 3), jnp.int32),
                             jnp.zeros((3, 2), jnp.int32), 4)


def test_iou_per_class_and_mean_iou_use_nan_for_absent_classes():
  rng = np.random.default_rng(2)
  conf = rng.integers(0, 20, size=(6, 6))
  conf[4, :] = 0
  conf[:, 4] = 0   # class 4 absent from prediction and ground truth
  conf[5, :] = 0   # class 5 absent from ground truth but predicted
  iou = metrics.iou_per_class(conf)
  chex.assert_shape(iou, (6,))
  expected = np_iou(conf)
  np.testing.assert_allclose(iou, expected)
  assert np.isnan(iou[4]) and iou[5] == 0.0
  present = [k for k in range(6) if k != 4]
  assert math.isclose(metrics.mean_iou(conf),
                      sum(expected[k] for k in present) / 5)


def test_metrics_hand_worked_example():
  # GT class 0: 3 pixels (2 predicted 0, 1 predicted 1); GT class 1: 1 pixel
  # predicted 1; class 2 never appears.
  conf = np.array([[2, 1, 0], [0, 1, 0], [0, 0, 0]])
  iou = metrics.iou_per_class(conf)
  np.testing.assert_allclose(iou[:2], [2 / 3, 1 / 2])
  assert np.isnan(iou[2])
  assert math.isclose(metrics.mean_iou(conf), (2 / 3 + 1 / 2) / 2)
  assert math.isclose(metrics.pixel_accuracy(conf), 3 / 4)
  acc = metrics.per_class_accuracy(conf)
  np.testing.assert_allclose(acc[:2], [2 / 3, 1.0])
  assert np.isnan(acc[2])
  assert math.isclose(metrics.mean_class_accuracy(conf), (2 / 3 + 1) / 2)


def test_metrics_on_random_predictions_match_pixel_counts():
  rng = np.random.default_rng(3)
  pred = rng.integers(0, 4, size=(50,))
  labels = rng.integers(0, 4, size=(50,))
  conf = np.asarray(metrics.confusion_matrix(jnp.asarray(pred),
                                             jnp.asarray(labels), 4))
  assert math.isclose(metrics.pixel_accuracy(conf), np.mean(pred == labels))
  for k in range(4):
    gt_k = labels == k
    assert math.isclose(metrics.per_class_accuracy(conf)[k],
                        np.mean(pred[gt_k] == k))
    inter = np.sum(gt_k & (pred == k))
    union = np.sum(gt_k | (pred == k))
    assert math.isclose(metrics.iou_per_class(conf)[k], inter / union)


def test_empty_confusion_gives_nan_without_warnings():
  conf = np.zeros((3, 3), np.int64)
  with np.errstate(all="raise"):
    assert np.all(np.isnan(metrics.iou_per_class(conf)))
    assert math.isnan(metrics.mean_iou(conf))
    assert math.isnan(metrics.pixel_accuracy(conf))
    assert math.isnan(metrics.mean_class_accuracy(conf))


def test_score_functions_reject_non_square():
  with pytest.raises(ValueError):
    metrics.iou_per_class(np.zeros((2, 3)))
