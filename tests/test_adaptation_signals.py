"""Label-free adaptation signals (``self_training.progress``): each function
against an independent NumPy reference, edge cases, and the warning.

The round driver's use (``summary.json['adaptation_signals']``) is checked
in ``tests/test_end_to_end.py::test_tpld_pipeline_tiny``.
"""

import math

import jax
import numpy as np
import pytest

from jaxda.methods.self_training import progress
from jaxda.methods.self_training import rounds
from jaxda.types import IGNORE_LABEL


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _ref_entropy(p):
  """Per-pixel entropy / log C with an explicit loop over classes."""
  h = np.zeros(p.shape[:-1])
  for k in range(p.shape[-1]):
    pk = p[..., k].astype(np.float64)
    h -= np.where(pk > 0, pk * np.log(np.where(pk > 0, pk, 1)), 0)
  return h / math.log(p.shape[-1])


def test_entropy_matches_reference_and_bounds():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3.0, size=(2, 5, 6, 7)).astype(np.float32)
  p = _softmax(logits)
  np.testing.assert_allclose(progress.normalized_entropy(p), _ref_entropy(p),
                             atol=1e-5)
  np.testing.assert_allclose(progress.entropy_from_logits(logits),
                             _ref_entropy(p), atol=1e-5)
  np.testing.assert_allclose(progress.normalized_entropy(
      np.full((3, 4), 0.25, np.float32)), 1.0, atol=1e-6)
  one_hot = np.eye(4, dtype=np.float32)[rng.integers(0, 4, (3, 5))]
  np.testing.assert_array_equal(progress.normalized_entropy(one_hot), 0.0)
  # Saturated logits: no NaN from 0 * log 0.
  assert float(progress.entropy_from_logits(
      np.array([1e4, -1e4, 0.0], np.float32))) == pytest.approx(0.0,
                                                                abs=1e-6)
  with pytest.raises(ValueError):
    progress.normalized_entropy(np.ones((2, 1), np.float32))


def test_batch_sums_and_mean_entropy_respect_valid():
  rng = np.random.default_rng(1)
  p = _softmax(rng.normal(size=(3, 4, 5, 6)))
  valid = rng.random((3, 4, 5)) < 0.6
  sums = jax.jit(progress.batch_signal_sums)(p, valid)
  ref_h = _ref_entropy(p)
  assert float(sums["entropy_sum"]) == pytest.approx(ref_h[valid].sum(),
                                                     rel=1e-5)
  assert int(sums["pixels"]) == valid.sum()
  ref_hist = np.bincount(p.argmax(-1)[valid], minlength=6)
  np.testing.assert_array_equal(sums["predicted"], ref_hist)
  assert progress.mean_entropy(p, valid) == pytest.approx(
      ref_h[valid].mean(), rel=1e-5)
  # No valid pixel: 0, not NaN.
  assert progress.mean_entropy(p, np.zeros_like(valid)) == 0.0


def test_histogram_drift_and_collapse():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 5, (4, 6, 7)).astype(np.uint8)
  labels[0, 0] = IGNORE_LABEL
  hist = progress.label_histogram(labels, 5)
  ref = np.array([(labels == k).sum() for k in range(5)])
  np.testing.assert_array_equal(hist, ref)
  wide = labels.astype(np.int32)
  wide[1, 0] = -1  # non-uint8 maps: out-of-range values are not counted
  np.testing.assert_array_equal(progress.label_histogram(wide, 5),
                                [(wide == k).sum() for k in range(5)])
  # Total variation: independent form sum(max(t - s, 0)).
  t, s = rng.integers(0, 50, 5), rng.integers(1, 50, 5)
  tn, sn = t / t.sum(), s / s.sum()
  assert progress.class_drift(t, s) == pytest.approx(
      np.maximum(tn - sn, 0).sum())
  assert progress.class_drift(s, s) == 0.0
  assert progress.class_drift([1, 0], [0, 1]) == pytest.approx(1.0)
  assert progress.class_drift([0, 0], [0, 0]) == 0.0  # empty: no NaN
  assert progress.class_drift([0, 0], [1, 3]) == pytest.approx(0.5)
  # Constructed collapse: source has classes 0-3 (class 4 < 1%), target
  # predicts 0 and 1, class 2 at 0.05% (collapsed), class 3 at 2% (not).
  source = np.array([400, 300, 200, 95, 5])
  target = np.array([6000, 3795, 5, 200, 0])
  np.testing.assert_array_equal(
      progress.collapsed_classes(target, source), [2])
  np.testing.assert_array_equal(progress.collapsed_classes(
      target, source, target_max_share=0.03), [2, 3])
  assert len(progress.collapsed_classes(source, source)) == 0


def test_label_agreement():
  rng = np.random.default_rng(3)
  a = rng.integers(0, 4, (5, 8, 9)).astype(np.uint8)
  a[rng.random(a.shape) < 0.3] = IGNORE_LABEL
  b = a.copy()
  b[rng.random(b.shape) < 0.2] = 1
  b[rng.random(b.shape) < 0.2] = IGNORE_LABEL
  got = progress.label_agreement(a, b, chunk=2)
  both = (a != IGNORE_LABEL) & (b != IGNORE_LABEL)
  assert got["labelled_both"] == pytest.approx(both.mean())
  assert got["agreement"] == pytest.approx((a == b)[both].mean())
  same = progress.label_agreement(a, a)
  assert same["agreement"] == 1.0
  assert same["labelled_both"] == pytest.approx((a != IGNORE_LABEL).mean())
  empty = np.full_like(a, IGNORE_LABEL)
  assert progress.label_agreement(empty, empty) == {
      "labelled_both": 0.0, "agreement": 0.0}
  assert progress.label_agreement(a[:0], a[:0]) == {
      "labelled_both": 0.0, "agreement": 0.0}
  with pytest.raises(ValueError):
    progress.label_agreement(a, a[:2])


def _history(entropies, agreements, collapsed):
  return [{"round": r, "target_entropy": e, "agreement": a,
           "num_collapsed": c, "collapsed_classes": ["pole"] * c}
          for r, (e, a, c) in enumerate(zip(entropies, agreements,
                                            collapsed))]


def test_no_progress_fires_on_flat_history_only():
  flat = _history([0.40, 0.401, 0.398], [None, 0.99, 0.985], [0, 0, 0])
  warning = progress.no_progress(flat)
  assert warning and "\n" not in warning and "round 2" in warning
  assert "entropy 0.400 -> 0.398" in warning
  improving = _history([0.40, 0.34, 0.29], [None, 0.99, 0.99], [0, 0, 0])
  assert progress.no_progress(improving) is None
  # Flat entropy while the labels still change: not (yet) stalled.
  changing = _history([0.40, 0.40, 0.40], [None, 0.80, 0.97], [0, 0, 0])
  assert progress.no_progress(changing) is None
  # Too short a history for the stall rule.
  assert progress.no_progress(flat[:2]) is None
  assert progress.no_progress([]) is None
  # patience=1 looks at the last round only.
  assert progress.no_progress(flat[:2], patience=1)
  # Collapse growing fires on its own, and names the classes.
  collapse = _history([0.4, 0.3, 0.2], [None, 0.5, 0.5], [0, 0, 2])
  warning = progress.no_progress(collapse)
  assert "2 source classes" in warning and "pole" in warning
  # Most source classes never predicted and not coming back: fires after
  # `patience` rounds; not while they come back or when few are missing.
  def stuck(collapsed, n=3):
    h = _history([0.9, 0.7, 0.5][:n], [None, 0.5, 0.5][:n], collapsed)
    return progress.no_progress([dict(e, num_source_classes=9) for e in h])
  assert "8 of the source's 9 classes" in stuck([8, 8, 8])
  assert stuck([8, 8], n=2) is None
  assert stuck([8, 6, 5]) is None
  assert stuck([2, 2, 2]) is None
  # Entries without signals (runs from before them) are skipped, no error.
  assert progress.no_progress([{"round": 0}, {"round": 1}]) is None


def test_round_signals_from_pass_sums():
  """The driver's assembly: sums over batches -> entropy, shares, drift."""
  rng = np.random.default_rng(4)
  p = _softmax(rng.normal(scale=2.0, size=(4, 3, 5, 3)))
  valid = np.ones((4, 3, 5), bool)
  valid[3] = False  # a padding image
  sums = [jax.device_get(progress.batch_signal_sums(p[i:i + 2],
                                                    valid[i:i + 2]))
          for i in (0, 2)]
  source = np.array([10, 0, 30])
  got = rounds.adaptation_signals(["a", "b", "c"], sums, source)
  assert got["target_entropy"] == pytest.approx(
      _ref_entropy(p)[valid].mean(), rel=1e-5)
  pred = np.bincount(p.argmax(-1)[valid], minlength=3)
  assert got["class_drift"] == pytest.approx(
      0.5 * np.abs(pred / pred.sum() - source / source.sum()).sum())
  assert sum(got["predicted_share"].values()) == pytest.approx(1.0, abs=1e-4)
  assert got["num_collapsed"] == len(got["collapsed_classes"])
  assert got["num_source_classes"] == 2  # "b" has no source pixel
  assert "class_drift" not in rounds.adaptation_signals(["a", "b", "c"],
                                                        sums, None)
