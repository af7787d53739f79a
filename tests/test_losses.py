"""Tests for jaxda.losses against NumPy references written here."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda import losses
from jaxda import types

IGNORE = types.IGNORE_LABEL
B, H, W, C = 2, 3, 5, 7


# ---------------------------------------------------------------------------
# NumPy references (float64, loops where that keeps them obviously right)
# ---------------------------------------------------------------------------


def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_ce(logits, labels, weights=None):
  p = np_softmax(logits).reshape(-1, logits.shape[-1])
  lab = np.asarray(labels).reshape(-1)
  w = np.ones(lab.shape) if weights is None else np.reshape(weights, -1)
  total, count = 0.0, 0
  for i, y in enumerate(lab):
    if 0 <= y < p.shape[-1] and y != IGNORE:
      total += -w[i] * np.log(p[i, y])
      count += 1
  return total / count if count else 0.0


def np_bootstrap(logits, labels, beta, thresholds=None, mode="soft",
                 apply_to="labeled", weights=None):
  """-sum_k [beta t_k + (1-beta) z_k] log r_k per pixel, r = p / lambda."""
  p = np_softmax(logits).reshape(-1, logits.shape[-1])
  k = p.shape[-1]
  lam = np.ones(k) if thresholds is None else np.asarray(thresholds,
                                                         np.float64)
  lab = np.asarray(labels).reshape(-1)
  w = np.ones(lab.shape) if weights is None else np.reshape(weights, -1)
  total, count = 0.0, 0
  for i, y in enumerate(lab):
    labelled = 0 <= y < k and y != IGNORE
    if not labelled and apply_to == "labeled":
      continue
    r = p[i] / lam
    if mode == "hard":
      z = np.zeros(k)
      z[np.argmax(p[i])] = 1.0
    else:
      z = r
    t = np.zeros(k)
    if labelled:
      t[y] = 1.0
    total += -w[i] * np.sum((beta * t + (1 - beta) * z) * np.log(r))
    count += 1
  return total / count if count else 0.0


def np_bce(x, t):
  x = np.asarray(x, np.float64)
  return np.mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x))))


def np_self_information(p):
  p = np.asarray(p, np.float64)
  return -p * np.log2(p + 1e-30) / np.log2(p.shape[-1])


# ---------------------------------------------------------------------------
# Fixtures / helpers
# ---------------------------------------------------------------------------


def _random_problem(seed=0, ignore_frac=0.3):
  rng = np.random.default_rng(seed)
  logits = (2.0 * rng.normal(size=(B, H, W, C))).astype(np.float32)
  labels = rng.integers(0, C, size=(B, H, W))
  labels[rng.random((B, H, W)) < ignore_frac] = IGNORE
  labels[0, 0, 0] = IGNORE  # at least one ignored pixel
  labels[0, 0, 1] = 3       # at least one labelled pixel
  return logits, labels.astype(np.int32)


def _check_scalar_and_grad(fn, logits):
  """Scalar float32 value; finite value and gradient w.r.t. logits."""
  value = fn(jnp.asarray(logits))
  chex.assert_shape(value, ())
  chex.assert_type(value, jnp.float32)
  chex.assert_tree_all_finite(value)
  grad = jax.grad(fn)(jnp.asarray(logits))
  chex.assert_shape(grad, logits.shape)
  chex.assert_tree_all_finite(grad)
  return value, grad


# ---------------------------------------------------------------------------
# Cross-entropies
# ---------------------------------------------------------------------------


def test_softmax_cross_entropy_matches_reference():
  logits, labels = _random_problem(0)
  fn = lambda z: losses.softmax_cross_entropy(logits=z, labels=labels)
  value, _ = _check_scalar_and_grad(fn, logits)
  np.testing.assert_allclose(value, np_ce(logits, labels), rtol=1e-5)


def test_softmax_cross_entropy_gradient_is_p_minus_onehot_over_count():
  logits, labels = _random_problem(1)
  grad = jax.grad(lambda z: losses.softmax_cross_entropy(
      logits=z, labels=labels))(jnp.asarray(logits))
  valid = labels != IGNORE
  onehot = np.eye(C)[np.where(valid, labels, 0)]
  expected = (np_softmax(logits) - onehot) * valid[..., None] / valid.sum()
  np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_softmax_cross_entropy_weights_divide_by_valid_count():
  logits, labels = _random_problem(2)
  weights = np.random.default_rng(2).uniform(0, 2, size=labels.shape)
  value = losses.softmax_cross_entropy(
      logits=jnp.asarray(logits), labels=labels,
      weights=jnp.asarray(weights, jnp.float32))
  np.testing.assert_allclose(value, np_ce(logits, labels, weights),
                             rtol=1e-5)


def test_softmax_cross_entropy_classification_shape_and_jit():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(6,))
  fn = jax.jit(lambda z, y: losses.softmax_cross_entropy(logits=z, labels=y))
  np.testing.assert_allclose(fn(logits, labels), np_ce(logits, labels),
                             rtol=1e-5)


def test_softmax_cross_entropy_no_valid_pixel_is_zero_with_zero_grad():
  logits, _ = _random_problem(4)
  labels = np.full((B, H, W), IGNORE, np.int32)
  fn = lambda z: losses.softmax_cross_entropy(logits=z, labels=labels)
  value, grad = _check_scalar_and_grad(fn, logits)
  assert float(value) == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def test_softmax_cross_entropy_out_of_range_labels_are_ignored():
  logits, labels = _random_problem(5)
  bad = labels.copy()
  bad[0, 1, :] = C       # out of range above
  bad[1, 2, :2] = -1     # negative
  cleaned = np.where((bad < 0) | (bad >= C), IGNORE, bad)
  got = losses.softmax_cross_entropy(logits=jnp.asarray(logits), labels=bad)
  np.testing.assert_allclose(got, np_ce(logits, cleaned), rtol=1e-5)
  custom = losses.softmax_cross_entropy(
      logits=jnp.asarray(logits), labels=np.where(labels == IGNORE, 99,
                                                  labels), ignore_index=99)
  np.testing.assert_allclose(custom, np_ce(logits, labels), rtol=1e-5)


def test_softmax_cross_entropy_bf16_logits_computed_in_float32():
  logits, labels = _random_problem(6)
  value = losses.softmax_cross_entropy(
      logits=jnp.asarray(logits, jnp.bfloat16), labels=labels)
  chex.assert_type(value, jnp.float32)
  rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(value, np_ce(rounded, labels), rtol=1e-5)


def test_softmax_cross_entropy_rejects_shape_mismatch():
  with pytest.raises(ValueError):
    losses.softmax_cross_entropy(logits=jnp.zeros((2, 3, 4)),
                                 labels=jnp.zeros((2, 4), jnp.int32))


def test_soft_cross_entropy_matches_reference_and_onehot_equals_ce():
  logits, labels = _random_problem(7)
  rng = np.random.default_rng(7)
  targets = np_softmax(rng.normal(size=logits.shape)).astype(np.float32)
  mask = rng.random((B, H, W)) < 0.6
  fn = lambda z: losses.soft_cross_entropy(logits=z, targets=targets,
                                           mask=mask)
  value, _ = _check_scalar_and_grad(fn, logits)
  per_pixel = -(targets * np.log(np_softmax(logits))).sum(-1)
  np.testing.assert_allclose(value, per_pixel[mask].mean(), rtol=1e-5)
  # No mask: mean over all pixels.
  np.testing.assert_allclose(
      losses.soft_cross_entropy(logits=jnp.asarray(logits), targets=targets),
      per_pixel.mean(), rtol=1e-5)
  # One-hot targets of the labelled pixels give the hard CE.
  valid = labels != IGNORE
  onehot = (np.eye(C)[np.where(valid, labels, 0)]
            * valid[..., None]).astype(np.float32)
  np.testing.assert_allclose(
      losses.soft_cross_entropy(logits=jnp.asarray(logits), targets=onehot,
                                mask=valid),
      np_ce(logits, labels), rtol=1e-5)
  empty = losses.soft_cross_entropy(logits=jnp.asarray(logits),
                                    targets=targets, mask=np.zeros_like(mask))
  assert float(empty) == 0.0


# ---------------------------------------------------------------------------
# Adversarial losses
# ---------------------------------------------------------------------------


def test_bce_with_logits_matches_reference_and_is_stable():
  rng = np.random.default_rng(8)
  x = (3 * rng.normal(size=(2, 4, 6, 1))).astype(np.float32)
  for t in (0.0, 1.0, 0.3):
    fn = lambda z, t=t: losses.bce_with_logits(z, t)
    value, grad = _check_scalar_and_grad(fn, x)
    np.testing.assert_allclose(value, np_bce(x, t), rtol=1e-5)
    # d/dx = (sigmoid(x) - t) / n
    expected = (1 / (1 + np.exp(-x.astype(np.float64))) - t) / x.size
    np.testing.assert_allclose(grad, expected, atol=1e-6)
  np.testing.assert_allclose(losses.bce_with_logits(jnp.zeros(5), 1.0),
                             np.log(2), rtol=1e-6)
  big = jnp.asarray([200.0, -200.0])
  np.testing.assert_allclose(losses.bce_with_logits(big, 0.0), 100.0,
                             rtol=1e-6)
  chex.assert_tree_all_finite(jax.grad(losses.bce_with_logits)(big, 0.0))


def test_lsgan_loss_matches_reference():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(2, 3, 4, 1)).astype(np.float32)
  value, _ = _check_scalar_and_grad(lambda z: losses.lsgan_loss(z, 1.0), x)
  np.testing.assert_allclose(value, np.mean((x.astype(np.float64) - 1) ** 2),
                             rtol=1e-5)


@pytest.mark.parametrize("gan", ["vanilla", "ls", "Vanilla", "LS"])
def test_adversarial_losses_follow_adaptsegnet_labels(gan):
  rng = np.random.default_rng(10)
  d_src = rng.normal(size=(2, 3, 4, 1)).astype(np.float32)
  d_tgt = rng.normal(size=(2, 5, 2, 1)).astype(np.float32)
  if gan.lower() == "vanilla":
    crit = np_bce
  else:
    crit = lambda x, t: np.mean((np.asarray(x, np.float64) - t) ** 2)
  # Generator: target outputs pushed towards the source label 0.
  gen = losses.generator_adv_loss(d_out=jnp.asarray(d_tgt), gan=gan)
  np.testing.assert_allclose(gen, crit(d_tgt, 0.0), rtol=1e-5)
  gen1 = losses.generator_adv_loss(d_out=jnp.asarray(d_tgt), gan=gan,
                                   target_label=1.0)
  np.testing.assert_allclose(gen1, crit(d_tgt, 1.0), rtol=1e-5)
  # Discriminator: 0.5 l(src, 0) + 0.5 l(tgt, 1).
  dis = losses.discriminator_loss(d_out_source=jnp.asarray(d_src),
                                  d_out_target=jnp.asarray(d_tgt), gan=gan)
  np.testing.assert_allclose(
      dis, 0.5 * crit(d_src, 0.0) + 0.5 * crit(d_tgt, 1.0), rtol=1e-5)
  swapped = losses.discriminator_loss(
      d_out_source=jnp.asarray(d_src), d_out_target=jnp.asarray(d_tgt),
      gan=gan, source_label=1.0, target_label=0.0)
  np.testing.assert_allclose(
      swapped, 0.5 * crit(d_src, 1.0) + 0.5 * crit(d_tgt, 0.0), rtol=1e-5)
  grads = jax.grad(
      lambda a, b: losses.discriminator_loss(d_out_source=a, d_out_target=b,
                                             gan=gan),
      argnums=(0, 1))(jnp.asarray(d_src), jnp.asarray(d_tgt))
  chex.assert_tree_all_finite(grads)


def test_adversarial_losses_reject_unknown_gan():
  with pytest.raises(ValueError):
    losses.generator_adv_loss(d_out=jnp.zeros(3), gan="wgan")


# ---------------------------------------------------------------------------
# Entropy and MRKLD
# ---------------------------------------------------------------------------


def test_weighted_self_information_and_entropy_match_reference():
  logits, _ = _random_problem(11)
  probs = np_softmax(logits).astype(np.float32)
  wsi = losses.weighted_self_information(jnp.asarray(probs))
  chex.assert_shape(wsi, probs.shape)
  chex.assert_type(wsi, jnp.float32)
  np.testing.assert_allclose(wsi, np_self_information(probs), rtol=1e-5,
                             atol=1e-7)
  ent = losses.entropy_map(jnp.asarray(probs))
  chex.assert_shape(ent, (B, H, W))
  # Independent route: natural-log entropy / ln C.
  p64 = probs.astype(np.float64)
  np.testing.assert_allclose(ent, -(p64 * np.log(p64)).sum(-1) / np.log(C),
                             rtol=1e-5)
  assert np.all((np.asarray(ent) >= 0) & (np.asarray(ent) <= 1 + 1e-6))


def test_entropy_edge_cases_uniform_onehot_and_zero_probability():
  uniform = jnp.full((3, 4, 19), 1 / 19, jnp.float32)
  np.testing.assert_allclose(losses.entropy_map(uniform), 1.0, rtol=1e-5)
  onehot = jax.nn.one_hot(jnp.full((3, 4), 2), 19)
  np.testing.assert_array_equal(losses.entropy_map(onehot), 0.0)
  wsi = losses.weighted_self_information(onehot)
  assert not np.any(np.isnan(wsi))
  np.testing.assert_array_equal(wsi, 0.0)
  # Gradient w.r.t. probabilities at p = 0 is finite: -log2(eps) / log2(C).
  grad = jax.grad(lambda p: losses.entropy_map(p).sum())(onehot)
  chex.assert_tree_all_finite(grad)
  np.testing.assert_allclose(grad[0, 0, 0], -np.log2(1e-30) / np.log2(19),
                             rtol=1e-4)
  # And through a softmax that underflows to exact zeros.
  logits = jnp.asarray([[0.0, -200.0, -300.0], [5.0, 5.0, -1e4]])
  assert float(jax.nn.softmax(logits)[0, 1]) == 0.0
  g = jax.grad(lambda z: losses.minent_loss(jax.nn.softmax(z)))(logits)
  chex.assert_tree_all_finite(g)


def test_minent_loss_matches_advent_formula():
  logits, labels = _random_problem(12)
  fn = lambda z: losses.minent_loss(jax.nn.softmax(z))
  value, _ = _check_scalar_and_grad(fn, logits)
  p = np_softmax(logits)
  n_pixels = B * H * W
  advent = -np.sum(p * np.log2(p + 1e-30)) / (n_pixels * np.log2(C))
  np.testing.assert_allclose(value, advent, rtol=1e-5)
  mask = labels != IGNORE
  masked = losses.minent_loss(jax.nn.softmax(jnp.asarray(logits)), mask=mask)
  ent = np_self_information(p).sum(-1)
  np.testing.assert_allclose(masked, ent[mask].mean(), rtol=1e-5)


def test_mrkld_loss_matches_reference():
  logits, labels = _random_problem(13)
  mask = labels != IGNORE
  fn = lambda z: losses.mrkld_loss(logits=z, mask=mask)
  value, _ = _check_scalar_and_grad(fn, logits)
  p = np_softmax(logits)
  per_pixel = -np.log(p).sum(-1) / C
  np.testing.assert_allclose(value, per_pixel[mask].mean(), rtol=1e-5)
  # KL(uniform || p) = per_pixel - log C.
  kl = (np.log(1 / C) - np.log(p)).sum(-1) / C
  np.testing.assert_allclose(value - np.log(C), kl[mask].mean(), rtol=1e-5)
  assert float(losses.mrkld_loss(logits=jnp.asarray(logits),
                                 mask=np.zeros_like(mask))) == 0.0


# ---------------------------------------------------------------------------
# Bootstrapping
# ---------------------------------------------------------------------------


def _thresholds(seed):
  return np.random.default_rng(seed).uniform(0.3, 1.0, C).astype(np.float32)


@pytest.mark.parametrize("apply_to", ["labeled", "all"])
@pytest.mark.parametrize("stop_gradient", [True, False])
def test_tpld_bootstrap_matches_reference(apply_to, stop_gradient):
  logits, labels = _random_problem(14)
  lam = _thresholds(14)
  fn = lambda z: losses.tpld_bootstrap_loss(
      logits=z, labels=labels, thresholds=lam, beta=0.9, apply_to=apply_to,
      stop_gradient_prediction=stop_gradient)
  value, _ = _check_scalar_and_grad(fn, logits)
  np.testing.assert_allclose(
      value, np_bootstrap(logits, labels, 0.9, lam, apply_to=apply_to),
      rtol=1e-5)


def test_tpld_bootstrap_weights_and_empty():
  logits, labels = _random_problem(15)
  lam = _thresholds(15)
  weights = np.random.default_rng(15).uniform(0, 1, labels.shape)
  value = losses.tpld_bootstrap_loss(
      logits=jnp.asarray(logits), labels=labels, thresholds=lam, beta=0.95,
      weights=jnp.asarray(weights, jnp.float32))
  np.testing.assert_allclose(
      value, np_bootstrap(logits, labels, 0.95, lam, weights=weights),
      rtol=1e-5)
  all_ignored = np.full_like(labels, IGNORE)
  fn = lambda z: losses.tpld_bootstrap_loss(
      logits=z, labels=all_ignored, thresholds=lam, beta=0.95)
  value, grad = _check_scalar_and_grad(fn, logits)
  assert float(value) == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def test_bootstrap_beta_one_equals_masked_cross_entropy():
  logits, labels = _random_problem(16)
  z = jnp.asarray(logits)
  ce = np_ce(logits, labels)
  soft = losses.soft_bootstrap_loss(logits=z, labels=labels, beta=1.0)
  hard = losses.hard_bootstrap_loss(logits=z, labels=labels, beta=1.0)
  np.testing.assert_allclose(soft, ce, rtol=1e-5)
  np.testing.assert_allclose(hard, ce, rtol=1e-5)
  # TPLD with beta = 1: CE shifted by the constant mean log(lambda_label),
  # so the gradient is exactly the CE gradient.
  lam = _thresholds(16)
  tpld = lambda v: losses.tpld_bootstrap_loss(logits=v, labels=labels,
                                              thresholds=lam, beta=1.0)
  valid = labels != IGNORE
  shift = np.log(lam.astype(np.float64))[labels[valid]].mean()
  np.testing.assert_allclose(tpld(z), ce + shift, rtol=1e-5)
  ce_fn = lambda v: losses.softmax_cross_entropy(logits=v, labels=labels)
  np.testing.assert_allclose(jax.grad(tpld)(z), jax.grad(ce_fn)(z),
                             atol=1e-6)


def test_tpld_with_unit_thresholds_reduces_to_reed_soft():
  logits, labels = _random_problem(17)
  z = jnp.asarray(logits)
  for apply_to in ("labeled", "all"):
    for sg in (True, False):
      tpld = lambda v: losses.tpld_bootstrap_loss(
          logits=v, labels=labels, thresholds=np.ones(C), beta=0.95,
          apply_to=apply_to, stop_gradient_prediction=sg)
      reed = lambda v: losses.soft_bootstrap_loss(
          logits=v, labels=labels, beta=0.95, apply_to=apply_to,
          stop_gradient_prediction=sg)
      np.testing.assert_allclose(tpld(z), reed(z), rtol=1e-6)
      np.testing.assert_allclose(jax.grad(tpld)(z), jax.grad(reed)(z),
                                 atol=1e-7)
  # Reed soft = beta CE + (1 - beta) entropy over labelled pixels.
  p = np_softmax(logits)
  valid = labels != IGNORE
  ce = -np.log(np.take_along_axis(p, np.where(valid, labels, 0)[..., None],
                                  -1)[..., 0])
  ent = -(p * np.log(p)).sum(-1)
  np.testing.assert_allclose(
      losses.soft_bootstrap_loss(logits=z, labels=labels, beta=0.95),
      (0.95 * ce + 0.05 * ent)[valid].mean(), rtol=1e-5)


def test_bootstrap_value_independent_of_stop_gradient_but_gradient_differs():
  logits, labels = _random_problem(18)
  lam = _thresholds(18)
  beta = 0.8
  z = jnp.asarray(logits)

  def fn(sg):
    return lambda v: losses.tpld_bootstrap_loss(
        logits=v, labels=labels, thresholds=lam, beta=beta, apply_to="all",
        stop_gradient_prediction=sg)

  np.testing.assert_allclose(fn(True)(z), fn(False)(z), rtol=1e-6)
  g_sg = np.asarray(jax.grad(fn(True))(z), np.float64)
  g_full = np.asarray(jax.grad(fn(False))(z), np.float64)
  assert np.max(np.abs(g_sg - g_full)) > 1e-3
  # Analytic gradient with a fixed target c: d/dz [-sum_k c_k log p_k] =
  # (sum_k c_k) p - c (the log(lambda) shift has no gradient).
  p = np_softmax(logits)
  valid = labels != IGNORE
  onehot = np.eye(C)[np.where(valid, labels, 0)] * valid[..., None]
  c = beta * onehot + (1 - beta) * p / lam
  expected = (c.sum(-1, keepdims=True) * p - c) / labels.size
  np.testing.assert_allclose(g_sg, expected, atol=1e-6)


def test_soft_bootstrap_full_gradient_is_ce_plus_entropy_gradient():
  logits, labels = _random_problem(19)
  beta = 0.7
  g = jax.grad(lambda v: losses.soft_bootstrap_loss(
      logits=v, labels=labels, beta=beta, stop_gradient_prediction=False))(
          jnp.asarray(logits))
  p = np_softmax(logits)
  valid = labels != IGNORE
  onehot = np.eye(C)[np.where(valid, labels, 0)]
  log_p = np.log(p)
  ent = -(p * log_p).sum(-1, keepdims=True)
  # dH/dz_j = -p_j (log p_j + H);  dCE/dz = p - onehot.
  per_pixel = beta * (p - onehot) + (1 - beta) * (-p * (log_p + ent))
  expected = per_pixel * valid[..., None] / valid.sum()
  np.testing.assert_allclose(g, expected, atol=1e-6)


@pytest.mark.parametrize("apply_to", ["labeled", "all"])
def test_hard_bootstrap_matches_reference(apply_to):
  logits, labels = _random_problem(20)
  fn = lambda z: losses.hard_bootstrap_loss(logits=z, labels=labels,
                                            beta=0.8, apply_to=apply_to)
  value, _ = _check_scalar_and_grad(fn, logits)
  np.testing.assert_allclose(
      value, np_bootstrap(logits, labels, 0.8, mode="hard",
                          apply_to=apply_to), rtol=1e-5)


def test_soft_bootstrap_matches_reference_with_weights():
  logits, labels = _random_problem(21)
  weights = np.random.default_rng(21).uniform(0, 3, labels.shape)
  value = losses.soft_bootstrap_loss(
      logits=jnp.asarray(logits), labels=labels, beta=0.95, apply_to="all",
      weights=jnp.asarray(weights, jnp.float32))
  np.testing.assert_allclose(
      value, np_bootstrap(logits, labels, 0.95, apply_to="all",
                          weights=weights), rtol=1e-5)


def test_bootstrap_traced_beta_under_jit_and_bad_arguments():
  logits, labels = _random_problem(22)
  lam = _thresholds(22)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fn(z, beta):
    return losses.tpld_bootstrap_loss(logits=z, labels=labels,
                                      thresholds=lam, beta=beta)

  for beta in (0.9, 0.5):
    np.testing.assert_allclose(fn(logits, jnp.float32(beta)),
                               np_bootstrap(logits, labels, beta, lam),
                               rtol=1e-5)
  with pytest.raises(ValueError):
    losses.tpld_bootstrap_loss(logits=logits, labels=labels, thresholds=lam,
                               beta=0.9, apply_to="unlabeled")
  with pytest.raises(ValueError):
    losses.tpld_bootstrap_loss(logits=logits, labels=labels,
                               thresholds=lam[:3], beta=0.9)
