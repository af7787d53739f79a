"""Tests for CBST/CRST thresholds (exact and streaming), `select` and LRENT
against NumPy references written here (CRST's own loops and sorts)."""

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.methods.self_training import thresholds
from jaxda.types import IGNORE_LABEL as IGNORE
from pseudo_label_refs import blocky_probs, np_select, np_softmax


def np_crst_thresholds(probs, portion, ds=4, kc="conf", leading_zero=False,
                       valid=None):
  """CRST val + kc_parameters: per-class lists, full descending sort."""
  probs = np.asarray(probs, np.float32)
  c_ = probs.shape[-1]
  lists = [[] for _ in range(c_)]
  for b in range(probs.shape[0]):
    p = probs[b]
    v = np.ones(p.shape[:-1], bool) if valid is None else valid[b]
    pred, conf = p.argmax(-1), p.max(-1)
    for c in range(c_):
      if kc == "conf":
        vals = conf[(pred == c) & v]
        if vals.size:
          lists[c].append(vals[0::ds])
      else:
        lists[c].append(p[..., c][v][0::ds])
  thr = np.ones(c_, np.float32)
  for c in range(c_):
    if not lists[c]:
      continue
    vals = np.concatenate(lists[c])
    if leading_zero:
      vals = np.concatenate([[np.float32(0)], vals])
    ordered = np.sort(vals)[::-1]
    n_sel = int(math.floor(len(ordered) * portion))
    if n_sel != 0:
      thr[c] = ordered[n_sel - 1]
  if leading_zero:
    thr[thr == 0] = 1.0
  return thr, [np.concatenate(x) if x else np.zeros(0) for x in lists]


def np_logit(p):
  p = np.asarray(p, np.float64)
  return np.log(p) - np.log1p(-p)


# ---------------------------------------------------------------------------
# Thresholds: exact form
# ---------------------------------------------------------------------------


def _threshold_probs(seed, b=3, h=13, w=17, c=6):
  probs = blocky_probs(seed, b, h, w, c, block=5, scale=2.5)
  # Class c-1 is never the argmax: an absent class.
  probs[..., -1] = np.minimum(probs[..., -1], 0.5 * probs[..., 0])
  return (probs / probs.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("portion", [0.0, 0.001, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("subsample", [1, 3, 4])
@pytest.mark.parametrize("leading_zero", [False, True])
def test_class_thresholds_match_reference(portion, subsample, leading_zero):
  probs = _threshold_probs(seed=subsample)
  got = thresholds.class_thresholds(probs, portion, subsample=subsample,
                            mxnet_leading_zero=leading_zero)
  want, lists = np_crst_thresholds(probs, portion, ds=subsample,
                                   leading_zero=leading_zero)
  chex.assert_shape(got, (probs.shape[-1],))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  assert got[-1] == 1.0 and lists[-1].size == 0  # absent class
  if portion == 0.0:
    np.testing.assert_array_equal(got, 1.0)


def test_class_thresholds_n_sel_zero_gives_one():
  # Class 0 predicted at 3 pixels: portion 0.3 -> floor(0.9) = 0 -> 1.0;
  # class 1 at 5 pixels -> floor(1.5) = 1 -> the largest confidence.
  p = np.zeros((1, 1, 8, 2), np.float32)
  p[0, 0, :3] = [[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]]
  p[0, 0, 3:] = [[0.4, 0.6], [0.1, 0.9], [0.3, 0.7], [0.45, 0.55],
                 [0.2, 0.8]]
  thr = thresholds.class_thresholds(p, 0.3, subsample=1)
  np.testing.assert_array_equal(thr, np.float32([1.0, 0.9]))
  # Subsample 2 keeps class-1 confidences 0.6, 0.7, 0.8 (positions 0, 2, 4
  # among class-1 pixels): portion 0.34 -> n_sel 1 -> 0.8.
  thr = thresholds.class_thresholds(p, 0.34, subsample=2)
  np.testing.assert_array_equal(thr, np.float32([1.0, 0.8]))


def test_class_thresholds_prob_mode_and_valid_mask():
  probs = _threshold_probs(seed=5)
  valid = np.random.default_rng(5).random(probs.shape[:-1]) < 0.7
  for kc in ("conf", "prob"):
    got = thresholds.class_thresholds(probs, 0.3, kc_value=kc, valid=valid)
    want, _ = np_crst_thresholds(probs, 0.3, kc=kc, valid=valid)
    np.testing.assert_array_equal(got, want)
  # Right/bottom padding marked invalid changes nothing.
  padded = np.pad(probs, ((0, 0), (0, 3), (0, 2), (0, 0)), constant_values=0.5)
  mask = np.zeros(padded.shape[:-1], bool)
  mask[:, :probs.shape[1], :probs.shape[2]] = True
  np.testing.assert_array_equal(
      thresholds.class_thresholds(padded, 0.3, valid=mask),
      thresholds.class_thresholds(probs, 0.3))


def test_class_thresholds_rejects_bad_portion():
  with pytest.raises(ValueError):
    thresholds.class_thresholds(_threshold_probs(0), 1.5)


# ---------------------------------------------------------------------------
# Thresholds: streaming histogram
# ---------------------------------------------------------------------------


def _saturated_probs(seed, b=4, h=16, w=20, c=6):
  """Confidences spread over [1/C, 1], many near 1, some exactly 1."""
  rng = np.random.default_rng(seed)
  scale = rng.choice([0.5, 3.0, 12.0, 30.0], size=(b, h, w, 1))
  probs = np_softmax(rng.normal(size=(b, h, w, c)) * scale)
  probs[..., -1] = np.minimum(probs[..., -1], 0.5 * probs[..., 0])  # absent
  probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
  onehot = rng.random((b, h, w)) < 0.05
  probs[onehot] = np.eye(c, dtype=np.float32)[rng.integers(0, c - 1,
                                                           onehot.sum())]
  return probs


def _histogram(probs, subsample=4, valid=None, num_bins=thresholds.DEFAULT_NUM_BINS):
  hist = thresholds.init_threshold_histogram(probs.shape[-1], num_bins)
  # Two batches: exercises the accumulation.
  half = probs.shape[0] // 2
  for sl in (slice(0, half), slice(half, None)):
    hist = thresholds.update_threshold_histogram(
        hist, jnp.asarray(probs[sl]), subsample=subsample,
        valid=None if valid is None else jnp.asarray(valid[sl]))
  return hist


@pytest.mark.parametrize("subsample", [1, 4])
@pytest.mark.parametrize("use_valid", [False, True])
def test_histogram_counts_match_subsampling(subsample, use_valid):
  probs = _saturated_probs(seed=subsample)
  valid = (np.random.default_rng(1).random(probs.shape[:-1]) < 0.6
           if use_valid else None)
  hist = _histogram(probs, subsample, valid)
  chex.assert_shape(hist, (probs.shape[-1], thresholds.DEFAULT_NUM_BINS))
  chex.assert_type(hist, jnp.int32)
  _, lists = np_crst_thresholds(probs, 0.2, ds=subsample, valid=valid)
  np.testing.assert_array_equal(np.asarray(hist).sum(1),
                                [len(x) for x in lists])


@pytest.mark.parametrize("portion", [0.0, 0.01, 0.2, 0.35, 0.5, 1.0])
@pytest.mark.parametrize("leading_zero", [False, True])
def test_histogram_thresholds_within_one_bin(portion, leading_zero):
  probs = _saturated_probs(seed=2)
  hist = _histogram(probs)
  got = thresholds.thresholds_from_histogram(hist, portion,
                                     mxnet_leading_zero=leading_zero)
  want, _ = np_crst_thresholds(probs, portion, leading_zero=leading_zero)
  assert got.dtype == np.float32
  c_ = probs.shape[-1]
  width = (np_logit(1 - 2.0**-24) + math.log(c_ - 1)) / thresholds.DEFAULT_NUM_BINS
  ulp = 2.0**-24
  for h_val, e_val in zip(got.astype(np.float64), want.astype(np.float64)):
    if e_val == 1.0:
      # n_sel = 0 / absent (exactly 1.0), or a saturated p == 1 sample:
      # its bin is the top bin.
      assert h_val == 1.0 or np_logit(h_val) >= np_logit(1 - ulp) - width
      continue
    assert h_val <= e_val + ulp  # the lower edge of λ_exact's bin
    lower = 1 / (1 + np.exp(-(np_logit(e_val) - width)))
    assert e_val - h_val <= e_val - lower + ulp
  assert got[-1] == 1.0  # absent class


def test_histogram_layout_and_lower_edges():
  # Confidences at the centres of known bins land there; λ is that bin's
  # lower edge. Layout: uniform in logit between logit(1/C) and
  # logit(1 - 2**-24).
  c_, nb = 4, 64
  edges = thresholds.threshold_histogram_edges(c_, nb)
  low, top = -math.log(c_ - 1), np_logit(1 - 2.0**-24)
  np.testing.assert_allclose(edges[0], 1 / c_, rtol=1e-12)
  np.testing.assert_allclose(np_logit(edges[1:-1]),
                             low + (top - low) * np.arange(1, nb) / nb,
                             rtol=1e-9)
  bins = np.array([0, 5, 5, 5, 30, 50, 50, 63])
  centres = 1 / (1 + np.exp(-(low + (bins + 0.5) * (top - low) / nb)))
  centres[-1] = 1.0  # a saturated softmax lands in the top bin
  probs = np.zeros((1, 1, len(bins), c_), np.float32)
  probs[0, 0, :, 1] = centres
  # The rest spread evenly: class 1 (>= 1/C) stays the argmax.
  probs[0, 0, :, [0, 2, 3]] = (1 - centres) / 3
  hist = thresholds.update_threshold_histogram(
      thresholds.init_threshold_histogram(c_, nb), jnp.asarray(probs), subsample=1)
  want = np.zeros((c_, nb), np.int64)
  np.add.at(want[1], bins, 1)
  np.testing.assert_array_equal(np.asarray(hist), want)
  # 8 values, portion 0.5 -> 4th largest (bin 30); 0.75 -> 6th (bin 5).
  thr = thresholds.thresholds_from_histogram(hist, 0.5)
  np.testing.assert_allclose(thr, np.float32([1, edges[30], 1, 1]))
  thr = thresholds.thresholds_from_histogram(hist, 0.75)
  np.testing.assert_allclose(thr, np.float32([1, edges[5], 1, 1]))


def test_histograms_add_across_batches():
  probs = _saturated_probs(seed=9)
  empty = thresholds.init_threshold_histogram(probs.shape[-1])
  parts = [thresholds.update_threshold_histogram(empty, jnp.asarray(probs[i:i + 1]))
           for i in range(probs.shape[0])]
  whole = thresholds.update_threshold_histogram(empty, jnp.asarray(probs))
  np.testing.assert_array_equal(np.asarray(sum(parts)), np.asarray(whole))


def test_histogram_selects_at_least_the_portion():
  # The lower bin edge keeps at least what the exact λ keeps.
  probs = _saturated_probs(seed=4)
  thr_h = thresholds.thresholds_from_histogram(_histogram(probs, subsample=1), 0.3)
  thr_e = thresholds.class_thresholds(probs, 0.3, subsample=1)
  kept_h = np.asarray(thresholds.select(probs, thr_h)) != IGNORE
  kept_e = np.asarray(thresholds.select(probs, thr_e)) != IGNORE
  assert np.all(kept_h[kept_e])


# ---------------------------------------------------------------------------
# Selection and LRENT
# ---------------------------------------------------------------------------


def test_select_matches_reference():
  probs = blocky_probs(21, 2, 7, 9, 5).astype(np.float32)
  thr = np.random.default_rng(21).uniform(0.3, 0.9, 5).astype(np.float32)
  for inclusive in (True, False):
    got = thresholds.select(probs, thr, inclusive=inclusive)
    chex.assert_shape(got, probs.shape[:-1])
    chex.assert_type(got, jnp.int32)
    np.testing.assert_array_equal(np.asarray(got),
                                  np_select(probs, thr, inclusive))


def test_select_ties():
  probs = np.float32([[[[0.25, 0.5, 0.25], [0.4, 0.3, 0.3],
                        [0.5, 0.25, 0.25]]]])
  thr = np.float32([0.5, 0.5, 0.9])
  # Pixel 0: r = (0.5, 1, 0.28) -> 1 kept only when inclusive.
  # Pixel 1: r = (0.8, 0.6, 0.33) -> ignored.
  # Pixel 2: r = (1, 0.5, 0.28) -> 0 kept only when inclusive.
  np.testing.assert_array_equal(np.asarray(thresholds.select(probs, thr))[0, 0],
                                [1, IGNORE, 0])
  np.testing.assert_array_equal(
      np.asarray(thresholds.select(probs, thr, inclusive=False))[0, 0],
      [IGNORE, IGNORE, IGNORE])
  # Equal ratios above 1 -> first (lowest) class.
  tie = np.float32([[[[0.5, 0.5, 0.0]]]])
  assert int(thresholds.select(tie, np.float32([0.25, 0.25, 1.0]))[0, 0, 0]) == 0


def test_lrent_soft_labels_match_reference():
  probs = blocky_probs(5, 2, 6, 7, 4).astype(np.float32)
  thr = np.float32([0.6, 0.8, 0.5, 0.9])
  alpha = 0.25
  target, keep = thresholds.lrent_soft_labels(probs, thr, alpha=alpha)
  chex.assert_shape(target, probs.shape)
  chex.assert_shape(keep, probs.shape[:-1])
  chex.assert_tree_all_finite(target)
  p = probs.astype(np.float64)
  soft = (p / thr) ** (1 / alpha)
  soft /= soft.sum(-1, keepdims=True)
  reg = np.sum(-soft * np.log(p + 1e-32)
               + alpha * soft * np.log(soft + 1e-32), -1)
  sel = np.sum(-soft * np.log(np.float64(thr) + 1e-32), -1)
  want_keep = reg < sel
  clear = np.abs(reg - sel) > 1e-4  # float32 cannot flip these
  assert clear.mean() > 0.95 and 0 < want_keep.mean() < 1
  np.testing.assert_array_equal(np.asarray(keep)[clear], want_keep[clear])
  np.testing.assert_allclose(np.asarray(target),
                             soft * np.asarray(keep)[..., None], atol=1e-5)


def test_lrent_small_alpha_is_finite():
  probs = blocky_probs(6, 1, 4, 4, 3).astype(np.float32)
  target, _ = thresholds.lrent_soft_labels(probs, np.float32([0.5, 0.5, 0.5]),
                                   alpha=0.005)
  chex.assert_tree_all_finite(target)


def test_target_portion():
  assert [thresholds.target_portion(r) for r in (0, 1, 2, 6, 10)] == pytest.approx(
      [0.2, 0.25, 0.3, 0.5, 0.5])
  assert thresholds.target_portion(1, init=0.15) == pytest.approx(0.2)
