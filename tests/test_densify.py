"""Tests for TPLD voting densification against a NumPy loop reference.

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

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.methods.self_training import densify, easy_hard
from jaxda.types import IGNORE_LABEL as IGNORE
from pseudo_label_refs import blocky_probs, np_select


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
    out = densify.densify(jnp.asarray(probs, jnp.float64), jnp.asarray(labels),
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
  a, b = (np.asarray(densify.densify(jnp.asarray(probs), jnp.asarray(labels),
                                jnp.asarray(thr), impl=impl, **kwargs))
          for impl in _IMPLS)
  np.testing.assert_array_equal(a, b)
  assert np.sum(a != labels) > 0


def test_densify_rejects_unknown_impl():
  probs, thr, labels = _densify_case(seed=2)
  with pytest.raises(ValueError, match="impl"):
    densify.densify(jnp.asarray(probs), jnp.asarray(labels), jnp.asarray(thr),
               impl="fft")


def test_densify_float32_matches_reference_with_margin():
  probs, thr, labels = _densify_case(seed=11)
  want, margin = np_densify(probs, labels, thr, window=3, alpha=0.7,
                            num_iters=3, pooling="sum", combine="convex",
                            top_k=2)
  assert margin > 1e-5, "reference decision too close to flip for float32"
  got = densify.densify(jnp.asarray(probs, jnp.float32), jnp.asarray(labels),
                   jnp.asarray(thr, jnp.float32))
  chex.assert_shape(got, labels.shape)
  chex.assert_type(got, jnp.int32)
  np.testing.assert_array_equal(np.asarray(got), want)
  # Defaults densify, and never relabel what was labelled.
  labelled = labels != IGNORE
  np.testing.assert_array_equal(np.asarray(got)[labelled], labels[labelled])
  assert float(easy_hard.label_density(got)) > float(easy_hard.label_density(labels))


def test_densify_zero_iterations_returns_labels():
  probs, thr, labels = _densify_case(seed=3)
  got = densify.densify(jnp.asarray(probs, jnp.float32), jnp.asarray(labels),
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
  out = densify.densify(probs, labels, thr, alpha=1.0, **kwargs)
  assert int(out[0, 0, 1]) == IGNORE  # s == 1 exactly: strict > fails
  # α = 2: s_0 = 0.5 + 1.0 = 1.5 and s_1 = 0.25 + 1.25 = 1.5: equal scores,
  # the higher-ranked candidate (class 0) wins.
  out = densify.densify(probs, labels, thr, alpha=2.0, **kwargs)
  assert int(out[0, 0, 1]) == 0
  # Right neighbour labelled 2 with a big vote: class 2 ties class 1 in r
  # at the centre and loses the candidate slot to the lower index at
  # top_k = 2, so it cannot win; with top_k = 3 it does.
  probs[0, 0, 2] = [0.125, 0.125, 0.75]
  labels[0, 0, 2] = 2
  out = densify.densify(probs, labels, thr, alpha=2.0, top_k=2, **kwargs)
  assert int(out[0, 0, 1]) == 0
  out = densify.densify(probs, labels, thr, alpha=2.0, top_k=3, **kwargs)
  assert int(out[0, 0, 1]) == 2  # s_2 = 0.25 + 1.5 = 1.75


def test_densify_is_jacobi_and_keeps_labelled_pixels():
  # 1 x 5 row, 2 classes; pixel 0 labelled 0, others r_0 = 0.75. One
  # labelled neighbour (r = 1) is enough: additive α = 1, s = 0.75 + 1.
  # Synchronous updates advance one pixel per iteration.
  p = [[1.0, 0.0]] + [[0.75, 0.25]] * 4
  probs, labels, thr = _one_image([p], [[0] + [IGNORE] * 4], [1.0, 1.0])
  for iters in range(5):
    out = np.asarray(densify.densify(probs, labels, thr, alpha=1.0,
                                num_iters=iters, combine="additive"))
    want = [0] * min(iters + 1, 5) + [IGNORE] * (4 - iters)
    np.testing.assert_array_equal(out[0, 0], want)
  # A labelled pixel whose neighbours vote for another class stays put.
  probs, labels, thr = _one_image(
      [[[0.0, 1.0], [0.5, 0.5], [0.0, 1.0]]], [[1, 0, 1]], [1.0, 1.0])
  out = densify.densify(probs, labels, thr, alpha=5.0, combine="additive")
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
    out = densify.densify(probs, labels, thr, alpha=1.5, pooling=pooling,
                     combine="additive", num_iters=1)
    assert int(out[0, 0, 0]) == IGNORE
  out = densify.densify(probs, labels, thr, alpha=1.5, pooling="sum",
                   combine="additive", num_iters=1)
  assert int(out[0, 0, 0]) == 0


def test_densify_take_along_axis_fallback_x64(monkeypatch):
  # Arrays of >= 2**31 elements are read with take_along_axis instead of
  # int32 flat indices; force that path (unjitted, so the patched limit is
  # seen) on a small case.
  monkeypatch.setattr(densify, "_FLAT_INDEX_LIMIT", 0)
  probs, thr, labels = _densify_case(seed=17)
  kwargs = dict(window=3, alpha=0.45, num_iters=2, pooling="mean",
                combine="additive", top_k=3)
  with jax.enable_x64(True):
    got = densify.densify.__wrapped__(
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
      densify.densify(probs, labels, thr, **kwargs)
