"""Tests for jaxda.pseudo_labels against NumPy references written here.

How the voting kernel is checked exactly: `densify` computes in the dtype of
p / λ, so under `jax.enable_x64` with float64 inputs it runs the same
arithmetic as the float64 loop reference below. The pooled sums are added
in a different order (XLA's reduce_window vs a Python loop), which changes
the last bit of a float64 at most; on random maps no score lands within
1e-15 of the s > 1 boundary, so the labels must be identical, and the
constructed tie/boundary cases use dyadic numbers (exact in any order). The
float32 path is checked against the float64 reference too, after asserting
that every decision in the reference has a margin > 1e-5 (so float32
rounding cannot flip one); a failure there is then a real bug.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.methods.self_training import pseudo_labels as pl

IGNORE = 255


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def blocky_probs(seed, b, h, w, c, block=4, scale=3.0, noise=0.8):
  """Piecewise-constant 'scenes' plus noise: voting has regions to fill."""
  rng = np.random.default_rng(seed)
  blocks = rng.normal(size=(b, -(-h // block), -(-w // block), c)) * scale
  logits = np.repeat(np.repeat(blocks, block, 1), block, 2)[:, :h, :w]
  return np_softmax(logits + rng.normal(size=(b, h, w, c)) * noise)


# ---------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------


def np_select(probs, thr, inclusive=True):
  """CRST label_selection in float32, explicit loop over pixels."""
  p = np.asarray(probs, np.float32).reshape(-1, probs.shape[-1])
  lam = np.asarray(thr, np.float32)
  out = np.full(p.shape[0], IGNORE, np.int64)
  for i in range(p.shape[0]):
    r = p[i] / lam
    best = 0
    for k in range(1, len(r)):
      if r[k] > r[best]:
        best = k
    if r[best] > 1 or (inclusive and r[best] == 1):
      out[i] = best
  return out.reshape(probs.shape[:-1])


def np_densify(probs, labels, thr, window, alpha, num_iters, pooling,
               combine, top_k):
  """Voting densification, float64 loops; returns (labels, decision margin).

  The margin is the smallest |s - 1| and |s_a - s_b| over every candidate
  score looked at: how far the reference's decisions are from a flip.
  """
  r = np.asarray(probs, np.float64) / np.asarray(thr, np.float64)
  b_, h, w, c = r.shape
  lab = np.array(labels, np.int64)
  half = window // 2
  margin = np.inf
  for _ in range(num_iters):
    new = lab.copy()
    for b in range(b_):
      for i in range(h):
        for j in range(w):
          if lab[b, i, j] != IGNORE:
            continue
          cands = sorted(range(c), key=lambda k: (-r[b, i, j, k], k))[:top_k]
          scores = []
          for k in cands:
            vals = []
            for di in range(-half, half + 1):
              for dj in range(-half, half + 1):
                y, x = i + di, j + dj
                if 0 <= y < h and 0 <= x < w and lab[b, y, x] == k:
                  vals.append(1.0 if pooling == "count" else r[b, y, x, k])
                else:
                  vals.append(0.0)
            if pooling == "max":
              pooled = max(vals)
            elif pooling == "sum":
              pooled = sum(vals)
            else:  # mean, count
              pooled = sum(vals) / window**2
            if combine == "convex":
              s = alpha * r[b, i, j, k] + (1 - alpha) * pooled
            else:
              s = r[b, i, j, k] + alpha * pooled
            scores.append(s)
          best = int(np.argmax(scores))
          if scores[best] > 1:
            new[b, i, j] = cands[best]
          margin = min([margin] + [abs(s - 1) for s in scores] + [
              abs(s - scores[best]) for n, s in enumerate(scores)
              if n != best and scores[best] > 1])
    lab = new
  return lab, margin


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


def np_image_confidence(prob, thr, strict=True, source="argmax", valid=None):
  c_ = prob.shape[-1]
  p = np.asarray(prob, np.float32)
  v = np.ones(p.shape[:-1], bool) if valid is None else valid
  n_k, n_star = np.zeros(c_), np.zeros(c_)
  pseudo = np_select(p[None], thr)[0]
  for idx in zip(*np.nonzero(v)):
    k = int(p[idx].argmax())
    n_k[k] += 1
    if source == "argmax":
      hit = p[idx][k] > thr[k] if strict else p[idx][k] >= thr[k]
      n_star[k] += hit
    elif pseudo[idx] != IGNORE:
      n_star[pseudo[idx]] += 1
  present = n_k > 0
  if not present.any():
    return 0.0
  return float(np.sum(n_star[present] / n_k[present]
                      / np.float64(np.asarray(thr)[present]))
               / present.sum())


def np_logit(p):
  p = np.asarray(p, np.float64)
  return np.log(p) - np.log1p(-p)


# ---------------------------------------------------------------------------
# Densification
# ---------------------------------------------------------------------------

_B, _H, _W, _C = 2, 9, 11, 5


def _densify_case(seed):
  probs = blocky_probs(seed, _B, _H, _W, _C)
  rng = np.random.default_rng(seed + 100)
  thr = rng.uniform(0.3, 0.9, _C)
  labels = np_select(probs, thr)
  # Arbitrary extra labels (not the argmax): the kernel must take any map.
  extra = rng.random(labels.shape) < 0.08
  labels[extra] = rng.integers(0, _C, labels.shape)[extra]
  # Some unlabelled pixels with max r >= 1 (user-supplied maps need not be
  # the CBST selection): only these can fire with convex 'count' pooling.
  labels[rng.random(labels.shape) < 0.15] = IGNORE
  return probs, thr, labels


def _densify_x64(probs, labels, thr, **kwargs):
  with jax.enable_x64(True):
    out = pl.densify(jnp.asarray(probs, jnp.float64), jnp.asarray(labels),
                     jnp.asarray(thr, jnp.float64), **kwargs)
    assert out.dtype == jnp.int32
    return np.asarray(out)


_IMPLS = ["reduce_window", "shifted"]


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("combine", ["convex", "additive"])
@pytest.mark.parametrize("pooling", ["sum", "mean", "max", "count"])
@pytest.mark.parametrize("window", [1, 3, 5])
def test_densify_matches_reference_x64(window, pooling, combine, impl):
  probs, thr, labels = _densify_case(seed=window)
  alpha = 0.7 if combine == "convex" else 0.45
  kwargs = dict(window=window, alpha=alpha, num_iters=2, pooling=pooling,
                combine=combine, top_k=2)
  got = _densify_x64(probs, labels, thr, impl=impl, **kwargs)
  want, _ = np_densify(probs, labels, thr, **kwargs)
  np.testing.assert_array_equal(got, want)
  changed = int(np.sum(want != labels))
  if window == 1:
    # An unlabelled pixel's own vote is 0: s = α r (convex) or r.
    assert changed == np.sum(np.any(
        np.asarray(probs) / thr * (alpha if combine == "convex" else 1) > 1,
        axis=-1) & (labels == IGNORE))
  else:
    assert changed > 0  # the case must exercise the voting rule


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("top_k", [1, 3, 5])
@pytest.mark.parametrize("num_iters", [1, 4])
def test_densify_top_k_and_iterations_x64(top_k, num_iters, impl):
  probs, thr, labels = _densify_case(seed=7)
  kwargs = dict(window=3, alpha=0.6, num_iters=num_iters, pooling="sum",
                combine="convex", top_k=top_k)
  want, _ = np_densify(probs, labels, thr, **kwargs)
  np.testing.assert_array_equal(
      _densify_x64(probs, labels, thr, impl=impl, **kwargs), want)


@pytest.mark.parametrize("pooling", ["sum", "max", "count"])
def test_densify_impls_agree_float32_on_a_large_batch(pooling):
  # Same labels from both implementations at a size where borders are a
  # small part of the image (the benchmark's regime), in float32.
  probs = blocky_probs(5, 2, 40, 56, 7).astype(np.float32)
  thr = np.random.default_rng(5).uniform(0.3, 0.9, 7).astype(np.float32)
  labels = np_select(probs, thr)
  # Additive: with convex 'count' a CBST selection can never fire
  # (s <= α r + 1 - α < 1 for an unselected pixel).
  kwargs = dict(window=5, alpha=0.3, num_iters=3, pooling=pooling,
                combine="additive", top_k=3)
  a, b = (np.asarray(pl.densify(jnp.asarray(probs), jnp.asarray(labels),
                                jnp.asarray(thr), impl=impl, **kwargs))
          for impl in _IMPLS)
  np.testing.assert_array_equal(a, b)
  assert np.sum(a != labels) > 0


def test_densify_rejects_unknown_impl():
  probs, thr, labels = _densify_case(seed=2)
  with pytest.raises(ValueError, match="impl"):
    pl.densify(jnp.asarray(probs), jnp.asarray(labels), jnp.asarray(thr),
               impl="fft")


def test_densify_float32_matches_reference_with_margin():
  probs, thr, labels = _densify_case(seed=11)
  want, margin = np_densify(probs, labels, thr, window=3, alpha=0.7,
                            num_iters=3, pooling="sum", combine="convex",
                            top_k=2)
  assert margin > 1e-5, "reference decision too close to flip for float32"
  got = pl.densify(jnp.asarray(probs, jnp.float32), jnp.asarray(labels),
                   jnp.asarray(thr, jnp.float32))
  chex.assert_shape(got, labels.shape)
  chex.assert_type(got, jnp.int32)
  np.testing.assert_array_equal(np.asarray(got), want)
  # Defaults densify, and never relabel what was labelled.
  labelled = labels != IGNORE
  np.testing.assert_array_equal(np.asarray(got)[labelled], labels[labelled])
  assert float(pl.label_density(got)) > float(pl.label_density(labels))


def test_densify_zero_iterations_returns_labels():
  probs, thr, labels = _densify_case(seed=3)
  got = pl.densify(jnp.asarray(probs, jnp.float32), jnp.asarray(labels),
                   jnp.asarray(thr, jnp.float32), num_iters=0)
  np.testing.assert_array_equal(np.asarray(got), labels)


def _one_image(p_rows, labels_rows, thr):
  probs = np.asarray(p_rows, np.float64)[None]
  labels = np.asarray(labels_rows, np.int64)[None]
  return probs, labels, np.asarray(thr, np.float64)


def test_densify_candidate_and_score_ties():
  # 1 x 3 image, 3 classes, λ = 1 so r = p (all values dyadic: exact).
  # Centre pixel r = (0.5, 0.25, 0.25): candidates {0, 1} (tie 1/2 -> 1).
  # Left neighbour labelled 0 with r_0 = 0.5; right labelled 1 with
  # r_1 = 0.625. additive, α = 1: s_0 = 0.5 + 0.5 = 1.0 (not > 1),
  # s_1 = 0.25 + 0.625 = 0.875.
  rows = [[[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.125, 0.625, 0.25]]]
  probs, labels, thr = _one_image(rows, [[0, IGNORE, 1]], [1.0, 1.0, 1.0])
  kwargs = dict(window=3, num_iters=1, pooling="sum", combine="additive")
  out = pl.densify(probs, labels, thr, alpha=1.0, **kwargs)
  assert int(out[0, 0, 1]) == IGNORE  # s == 1 exactly: strict > fails
  # α = 2: s_0 = 0.5 + 1.0 = 1.5 and s_1 = 0.25 + 1.25 = 1.5: equal scores,
  # the higher-ranked candidate (class 0) wins.
  out = pl.densify(probs, labels, thr, alpha=2.0, **kwargs)
  assert int(out[0, 0, 1]) == 0
  # Right neighbour labelled 2 with a big vote: class 2 ties class 1 in r
  # at the centre and loses the candidate slot to the lower index at
  # top_k = 2, so it cannot win; with top_k = 3 it does.
  probs[0, 0, 2] = [0.125, 0.125, 0.75]
  labels[0, 0, 2] = 2
  out = pl.densify(probs, labels, thr, alpha=2.0, top_k=2, **kwargs)
  assert int(out[0, 0, 1]) == 0
  out = pl.densify(probs, labels, thr, alpha=2.0, top_k=3, **kwargs)
  assert int(out[0, 0, 1]) == 2  # s_2 = 0.25 + 1.5 = 1.75


def test_densify_is_jacobi_and_keeps_labelled_pixels():
  # 1 x 5 row, 2 classes; pixel 0 labelled 0, others r_0 = 0.75. One
  # labelled neighbour (r = 1) is enough: additive α = 1, s = 0.75 + 1.
  # Synchronous updates advance one pixel per iteration.
  p = [[1.0, 0.0]] + [[0.75, 0.25]] * 4
  probs, labels, thr = _one_image([p], [[0] + [IGNORE] * 4], [1.0, 1.0])
  for iters in range(5):
    out = np.asarray(pl.densify(probs, labels, thr, alpha=1.0,
                                num_iters=iters, combine="additive"))
    want = [0] * min(iters + 1, 5) + [IGNORE] * (4 - iters)
    np.testing.assert_array_equal(out[0, 0], want)
  # A labelled pixel whose neighbours vote for another class stays put.
  probs, labels, thr = _one_image(
      [[[0.0, 1.0], [0.5, 0.5], [0.0, 1.0]]], [[1, 0, 1]], [1.0, 1.0])
  out = pl.densify(probs, labels, thr, alpha=5.0, combine="additive")
  np.testing.assert_array_equal(np.asarray(out)[0, 0], [1, 0, 1])


def test_densify_mean_counts_padding_at_borders():
  # Corner pixel of a 2 x 2 image with window 3: 4 of 9 window cells are
  # inside. Neighbours labelled 0 with r = 1 each (3 votes). 'mean' divides
  # by 9 (padding counted): P = 3/9; 'count' also 3/9; 'sum' gives 3.
  p = [[[0.5, 0.5], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]]
  probs, labels, thr = _one_image(p, [[IGNORE, 0], [0, 0]], [1.0, 1.0])
  probs, labels = probs[0][None], labels[0][None]
  # additive α = 1.5: mean -> 0.5 + 1.5 * 3/9 = 1.0, not > 1.
  for pooling in ("mean", "count"):
    out = pl.densify(probs, labels, thr, alpha=1.5, pooling=pooling,
                     combine="additive", num_iters=1)
    assert int(out[0, 0, 0]) == IGNORE
  out = pl.densify(probs, labels, thr, alpha=1.5, pooling="sum",
                   combine="additive", num_iters=1)
  assert int(out[0, 0, 0]) == 0


def test_densify_take_along_axis_fallback_x64(monkeypatch):
  # Arrays of >= 2**31 elements are read with take_along_axis instead of
  # int32 flat indices; force that path (unjitted, so the patched limit is
  # seen) on a small case.
  monkeypatch.setattr(pl, "_FLAT_INDEX_LIMIT", 0)
  probs, thr, labels = _densify_case(seed=17)
  kwargs = dict(window=3, alpha=0.45, num_iters=2, pooling="mean",
                combine="additive", top_k=3)
  with jax.enable_x64(True):
    got = pl.densify.__wrapped__(
        jnp.asarray(probs, jnp.float64), jnp.asarray(labels),
        jnp.asarray(thr, jnp.float64), **kwargs)
  want, _ = np_densify(probs, labels, thr, **kwargs)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert np.sum(want != labels) > 0


def test_densify_rejects_bad_arguments():
  probs = jnp.full((1, 4, 4, 3), 1 / 3)
  labels = jnp.full((1, 4, 4), IGNORE)
  thr = jnp.ones(3)
  for kwargs in (dict(window=2), dict(pooling="median"),
                 dict(combine="product"), dict(top_k=4), dict(top_k=0)):
    with pytest.raises(ValueError):
      pl.densify(probs, labels, thr, **kwargs)


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
  got = pl.class_thresholds(probs, portion, subsample=subsample,
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
  thr = pl.class_thresholds(p, 0.3, subsample=1)
  np.testing.assert_array_equal(thr, np.float32([1.0, 0.9]))
  # Subsample 2 keeps class-1 confidences 0.6, 0.7, 0.8 (positions 0, 2, 4
  # among class-1 pixels): portion 0.34 -> n_sel 1 -> 0.8.
  thr = pl.class_thresholds(p, 0.34, subsample=2)
  np.testing.assert_array_equal(thr, np.float32([1.0, 0.8]))


def test_class_thresholds_prob_mode_and_valid_mask():
  probs = _threshold_probs(seed=5)
  valid = np.random.default_rng(5).random(probs.shape[:-1]) < 0.7
  for kc in ("conf", "prob"):
    got = pl.class_thresholds(probs, 0.3, kc_value=kc, valid=valid)
    want, _ = np_crst_thresholds(probs, 0.3, kc=kc, valid=valid)
    np.testing.assert_array_equal(got, want)
  # Right/bottom padding marked invalid changes nothing.
  padded = np.pad(probs, ((0, 0), (0, 3), (0, 2), (0, 0)), constant_values=0.5)
  mask = np.zeros(padded.shape[:-1], bool)
  mask[:, :probs.shape[1], :probs.shape[2]] = True
  np.testing.assert_array_equal(
      pl.class_thresholds(padded, 0.3, valid=mask),
      pl.class_thresholds(probs, 0.3))


def test_class_thresholds_rejects_bad_portion():
  with pytest.raises(ValueError):
    pl.class_thresholds(_threshold_probs(0), 1.5)


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


def _histogram(probs, subsample=4, valid=None, num_bins=pl.DEFAULT_NUM_BINS):
  hist = pl.init_threshold_histogram(probs.shape[-1], num_bins)
  # Two batches: exercises the accumulation.
  half = probs.shape[0] // 2
  for sl in (slice(0, half), slice(half, None)):
    hist = pl.update_threshold_histogram(
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
  chex.assert_shape(hist, (probs.shape[-1], pl.DEFAULT_NUM_BINS))
  chex.assert_type(hist, jnp.int32)
  _, lists = np_crst_thresholds(probs, 0.2, ds=subsample, valid=valid)
  np.testing.assert_array_equal(np.asarray(hist).sum(1),
                                [len(x) for x in lists])


@pytest.mark.parametrize("portion", [0.0, 0.01, 0.2, 0.35, 0.5, 1.0])
@pytest.mark.parametrize("leading_zero", [False, True])
def test_histogram_thresholds_within_one_bin(portion, leading_zero):
  probs = _saturated_probs(seed=2)
  hist = _histogram(probs)
  got = pl.thresholds_from_histogram(hist, portion,
                                     mxnet_leading_zero=leading_zero)
  want, _ = np_crst_thresholds(probs, portion, leading_zero=leading_zero)
  assert got.dtype == np.float32
  c_ = probs.shape[-1]
  width = (np_logit(1 - 2.0**-24) + math.log(c_ - 1)) / pl.DEFAULT_NUM_BINS
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
  edges = pl.threshold_histogram_edges(c_, nb)
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
  hist = pl.update_threshold_histogram(
      pl.init_threshold_histogram(c_, nb), jnp.asarray(probs), subsample=1)
  want = np.zeros((c_, nb), np.int64)
  np.add.at(want[1], bins, 1)
  np.testing.assert_array_equal(np.asarray(hist), want)
  # 8 values, portion 0.5 -> 4th largest (bin 30); 0.75 -> 6th (bin 5).
  thr = pl.thresholds_from_histogram(hist, 0.5)
  np.testing.assert_allclose(thr, np.float32([1, edges[30], 1, 1]))
  thr = pl.thresholds_from_histogram(hist, 0.75)
  np.testing.assert_allclose(thr, np.float32([1, edges[5], 1, 1]))


def test_histograms_add_across_batches():
  probs = _saturated_probs(seed=9)
  empty = pl.init_threshold_histogram(probs.shape[-1])
  parts = [pl.update_threshold_histogram(empty, jnp.asarray(probs[i:i + 1]))
           for i in range(probs.shape[0])]
  whole = pl.update_threshold_histogram(empty, jnp.asarray(probs))
  np.testing.assert_array_equal(np.asarray(sum(parts)), np.asarray(whole))


def test_histogram_selects_at_least_the_portion():
  # The lower bin edge keeps at least what the exact λ keeps.
  probs = _saturated_probs(seed=4)
  thr_h = pl.thresholds_from_histogram(_histogram(probs, subsample=1), 0.3)
  thr_e = pl.class_thresholds(probs, 0.3, subsample=1)
  kept_h = np.asarray(pl.select(probs, thr_h)) != IGNORE
  kept_e = np.asarray(pl.select(probs, thr_e)) != IGNORE
  assert np.all(kept_h[kept_e])


# ---------------------------------------------------------------------------
# Selection and LRENT
# ---------------------------------------------------------------------------


def test_select_matches_reference():
  probs = blocky_probs(21, 2, 7, 9, 5).astype(np.float32)
  thr = np.random.default_rng(21).uniform(0.3, 0.9, 5).astype(np.float32)
  for inclusive in (True, False):
    got = pl.select(probs, thr, inclusive=inclusive)
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
  np.testing.assert_array_equal(np.asarray(pl.select(probs, thr))[0, 0],
                                [1, IGNORE, 0])
  np.testing.assert_array_equal(
      np.asarray(pl.select(probs, thr, inclusive=False))[0, 0],
      [IGNORE, IGNORE, IGNORE])
  # Equal ratios above 1 -> first (lowest) class.
  tie = np.float32([[[[0.5, 0.5, 0.0]]]])
  assert int(pl.select(tie, np.float32([0.25, 0.25, 1.0]))[0, 0, 0]) == 0


def test_lrent_soft_labels_match_reference():
  probs = blocky_probs(5, 2, 6, 7, 4).astype(np.float32)
  thr = np.float32([0.6, 0.8, 0.5, 0.9])
  alpha = 0.25
  target, keep = pl.lrent_soft_labels(probs, thr, alpha=alpha)
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
  target, _ = pl.lrent_soft_labels(probs, np.float32([0.5, 0.5, 0.5]),
                                   alpha=0.005)
  chex.assert_tree_all_finite(target)


def test_target_portion():
  assert [pl.target_portion(r) for r in (0, 1, 2, 6, 10)] == pytest.approx(
      [0.2, 0.25, 0.3, 0.5, 0.5])
  assert pl.target_portion(1, init=0.15) == pytest.approx(0.2)


# ---------------------------------------------------------------------------
# TPLD phase 2
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["argmax", "pseudo"])
@pytest.mark.parametrize("strict", [True, False])
def test_image_confidence_matches_reference(source, strict):
  probs = blocky_probs(8, 4, 6, 8, 5, scale=2.0).astype(np.float32)
  thr = np.random.default_rng(8).uniform(0.3, 0.8, 5).astype(np.float32)
  # Ties p == λ: make some confidences equal to their class threshold.
  pred = probs.argmax(-1)
  flat = probs.reshape(-1, 5)
  tied = np.arange(0, flat.shape[0], 7)
  flat[tied, pred.reshape(-1)[tied]] = thr[pred.reshape(-1)[tied]]
  pred = probs.argmax(-1)
  valid = np.ones(probs.shape[:-1], bool)
  valid[3] = False  # empty image -> 0
  valid[2, :3] = False
  got = pl.image_confidence(probs, thr, count_source=source, strict=strict,
                            valid=valid)
  chex.assert_shape(got, (4,))
  chex.assert_type(got, jnp.float32)
  want = [np_image_confidence(probs[b], thr, strict, source, valid[b])
          for b in range(4)]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  assert float(got[3]) == 0.0 and float(got[0]) > 0


def test_image_confidence_strict_tie():
  probs = np.float32([[[[0.6, 0.4], [0.2, 0.8]]]])
  thr = np.float32([0.6, 0.5])
  # strict: class 0 pixel (p == λ) not confident -> (0/1/0.6 + 1/1/0.5)/2.
  np.testing.assert_allclose(pl.image_confidence(probs, thr), [1.0])
  np.testing.assert_allclose(pl.image_confidence(probs, thr, strict=False),
                             [(1 / 0.6 + 2.0) / 2], rtol=1e-6)


def test_easy_hard_split_matches_reference():
  rng = np.random.default_rng(3)
  scores = rng.choice([0.1, 0.5, 0.7, 0.9], size=17)  # many ties
  for q in (0.0, 0.3, 0.5, 1.0):
    got = np.asarray(pl.easy_hard_split(jnp.asarray(scores), q))
    order = sorted(range(17), key=lambda i: (-scores[i], i))
    want = np.zeros(17, bool)
    want[order[:int(17 * q)]] = True
    np.testing.assert_array_equal(got, want)


def test_easy_image_labels():
  probs = blocky_probs(12, 2, 5, 6, 4).astype(np.float32)
  thr = np.float32([0.5, 0.7, 0.9, 0.6])
  probs[0, 0, 0] = [0.5, 0.3, 0.1, 0.1]  # p == λ for the argmax: weight 1
  labels, weights = pl.easy_image_labels(probs, thr, gamma=2.0)
  chex.assert_shape([labels, weights], [probs.shape[:-1]] * 2)
  chex.assert_type([labels, weights], [jnp.int32, jnp.float32])
  r = probs.astype(np.float64) / thr
  np.testing.assert_array_equal(np.asarray(labels), r.argmax(-1))
  best = r.max(-1)
  k = r.argmax(-1)
  p_k = np.take_along_axis(probs, k[..., None], -1)[..., 0]
  want = np.where(p_k >= thr[k], 1.0, best**2)
  np.testing.assert_allclose(np.asarray(weights), want, rtol=1e-6)
  assert float(weights[0, 0, 0]) == 1.0
  # Weight 1 exactly where `select` keeps the pixel.
  kept = np.asarray(pl.select(probs, thr)) != IGNORE
  np.testing.assert_array_equal(np.asarray(weights) == 1.0, kept)
  assert 0 < kept.mean() < 1


# ---------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------


def test_label_density_and_precision():
  labels = np.array([[[0, 1, IGNORE], [2, IGNORE, 1]]])
  gt = np.array([[[0, 2, 1], [IGNORE, 0, 1]]])
  np.testing.assert_allclose(pl.label_density(labels), 4 / 6)
  # Counted: (0,0) correct, (0,1) wrong, (1,2) correct; (1,0) has no GT.
  np.testing.assert_allclose(pl.label_precision(labels, gt), 2 / 3)
  assert np.isnan(float(pl.label_precision(
      np.full((1, 2, 2), IGNORE), np.zeros((1, 2, 2), int))))
  assert float(pl.label_density(np.full((1, 2, 2), IGNORE))) == 0.0
