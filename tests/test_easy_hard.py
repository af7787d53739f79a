"""Tests for TPLD phase 2 (image confidence, easy/hard split, easy-image
labels) and the pseudo-label diagnostics, against NumPy references."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.methods.self_training import easy_hard, thresholds
from jaxda.types import IGNORE_LABEL as IGNORE
from pseudo_label_refs import blocky_probs, np_select


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
  got = easy_hard.image_confidence(probs, thr, count_source=source, strict=strict,
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
  np.testing.assert_allclose(easy_hard.image_confidence(probs, thr), [1.0])
  np.testing.assert_allclose(easy_hard.image_confidence(probs, thr, strict=False),
                             [(1 / 0.6 + 2.0) / 2], rtol=1e-6)


def test_easy_hard_split_matches_reference():
  rng = np.random.default_rng(3)
  scores = rng.choice([0.1, 0.5, 0.7, 0.9], size=17)  # many ties
  for q in (0.0, 0.3, 0.5, 1.0):
    got = np.asarray(easy_hard.easy_hard_split(jnp.asarray(scores), q))
    order = sorted(range(17), key=lambda i: (-scores[i], i))
    want = np.zeros(17, bool)
    want[order[:int(17 * q)]] = True
    np.testing.assert_array_equal(got, want)


def test_easy_image_labels():
  probs = blocky_probs(12, 2, 5, 6, 4).astype(np.float32)
  thr = np.float32([0.5, 0.7, 0.9, 0.6])
  probs[0, 0, 0] = [0.5, 0.3, 0.1, 0.1]  # p == λ for the argmax: weight 1
  labels, weights = easy_hard.easy_image_labels(probs, thr, gamma=2.0)
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
  kept = np.asarray(thresholds.select(probs, thr)) != IGNORE
  np.testing.assert_array_equal(np.asarray(weights) == 1.0, kept)
  assert 0 < kept.mean() < 1


# ---------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------


def test_label_density_and_precision():
  labels = np.array([[[0, 1, IGNORE], [2, IGNORE, 1]]])
  gt = np.array([[[0, 2, 1], [IGNORE, 0, 1]]])
  np.testing.assert_allclose(easy_hard.label_density(labels), 4 / 6)
  # Counted: (0,0) correct, (0,1) wrong, (1,2) correct; (1,0) has no GT.
  np.testing.assert_allclose(easy_hard.label_precision(labels, gt), 2 / 3)
  assert np.isnan(float(easy_hard.label_precision(
      np.full((1, 2, 2), IGNORE), np.zeros((1, 2, 2), int))))
  assert float(easy_hard.label_density(np.full((1, 2, 2), IGNORE))) == 0.0
