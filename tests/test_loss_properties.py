"""Property-based tests (hypothesis + chex) of `jaxda.losses` and of the
pseudo-label functions of `jaxda.methods.self_training.thresholds`.

Every property is checked against a short float64 NumPy reference written in
this file, plus structural properties (ignored pixels, permutations, limits).

Budget notes (the file must stay well under half a minute on 2 cores):

* Shapes are drawn by hypothesis from a small fixed pool `SEG_SHAPES` that
  spans batch 1..3, H and W 1..6 and classes 2..5 (including the degenerate
  1x1 image and C = 2), while the array *contents* are drawn freely (a seed,
  a logit scale, an ignore rate, a dtype). Jitted functions compile once per
  shape, and the non-jitted variant compiles each primitive once per shape,
  so a pool shared by all tests keeps the compile count bounded; fully free
  shapes cost ~1 s of compilation per example.
* Each example calls ONE compiled function (value and gradient together) and
  then re-calls it with permuted / perturbed inputs of the same shape, which
  hits the cache.
* `chex.variants(with_jit=True, without_jit=True)` is the outer decorator of
  `@given` on `chex.TestCase` methods: chex sets `self.variant` and then
  hypothesis runs all examples under that variant. This combines cleanly.
  The host-side NumPy functions (`class_confidences`,
  `thresholds_from_confidences`, `class_thresholds`, `target_portion`) are
  not JAX functions, so their tests are plain hypothesis tests without
  variants (`thresholds_from_histogram` is checked inside the variant test
  of the jitted `update_threshold_histogram`).
* The hypothesis settings (`PROFILE`) are applied per test (never loaded
  globally, so other test files keep theirs): few examples, no deadline,
  derandomized (deterministic CI), no example database on disk. The two
  tests of `select`'s ties (`SELECT_TIE_BUG`: the bug they found, fixed in
  `select`) skip the shrink phase; before the fix each of their examples
  failed with probability ~0.3-0.5.
"""

import math

import chex
from hypothesis import HealthCheck
from hypothesis import Phase
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda import losses
from jaxda.methods.self_training import thresholds as thr
from jaxda.types import IGNORE_LABEL

# Keep all of this file on one xdist worker: the tests share the shape pool,
# hence the per-primitive compilations of the non-jitted variant.
pytestmark = pytest.mark.xdist_group("loss_properties")

IGNORE = IGNORE_LABEL
BF16 = jnp.bfloat16

settings.register_profile(
    "jaxda_loss_properties",
    max_examples=4,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings(settings.get_profile("jaxda_loss_properties"))
# The cheap host-side (NumPy only) tests afford more examples.
HOST_PROFILE = settings(PROFILE, max_examples=25)

# (B, H, W, C): batch 1..3, H, W 1..6, classes 2..5.
SEG_SHAPES = ((1, 1, 1, 2), (2, 3, 4, 3), (3, 2, 5, 5), (1, 6, 6, 4))
SEEDS = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------------------
# NumPy references (float64)
# ---------------------------------------------------------------------------


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_valid(labels, c, ignore=IGNORE):
  return (labels != ignore) & (labels >= 0) & (labels < c)


def np_onehot(labels, valid, c):
  return np.eye(c)[np.where(valid, labels, 0)] * valid[..., None]


def ref_ce(logits, labels, weights=None, ignore=IGNORE):
  """(value, d value / d logits) of the masked softmax cross-entropy."""
  lp = np_log_softmax(logits)
  c = lp.shape[-1]
  valid = np_valid(labels, c, ignore)
  t = np_onehot(labels, valid, c)
  w = valid * (1.0 if weights is None else np.asarray(weights, np.float64))
  n = max(valid.sum(), 1)
  return (-(t * lp).sum(-1) * w).sum() / n, (np.exp(lp) - t) * w[..., None] / n


def ref_bootstrap(logits, labels, beta, lam=None, mode="soft",
                  apply_to="labeled", weights=None, stop_gradient=True):
  """(value, gradient) of -sum_k m_k (log q_k - log lam_k), m = beta t +
  (1 - beta) z, z = q / lam ('soft', TPLD) or onehot(argmax q) ('hard')."""
  lp = np_log_softmax(logits)
  q = np.exp(lp)
  c = q.shape[-1]
  lam = np.ones(c) if lam is None else np.asarray(lam, np.float64)
  valid = np_valid(labels, c)
  t = np_onehot(labels, valid, c)
  z = np.eye(c)[lp.argmax(-1)] if mode == "hard" else q / lam
  m = beta * t + (1 - beta) * z
  log_r = lp - np.log(lam)
  inc = valid if apply_to == "labeled" else np.ones(valid.shape, bool)
  w = inc * (1.0 if weights is None else np.asarray(weights, np.float64))
  n = max(inc.sum(), 1)
  value = (-(m * log_r).sum(-1) * w).sum() / n
  # d/dz of -sum_k m_k log q_k with m fixed is -(m - q sum_k m_k).
  grad = -(m - q * m.sum(-1, keepdims=True))
  if not stop_gradient and mode != "hard":
    # Plus the derivative through z = q / lam: -(1 - beta) sum_k a_k dq_k.
    a = log_r / lam
    grad = grad - (1 - beta) * q * (a - (a * q).sum(-1, keepdims=True))
  return value, grad * w[..., None] / n


def ref_wsi(p):
  p = np.asarray(p, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    out = -p * np.log2(p) / np.log2(p.shape[-1])
  return np.where(p == 0, 0.0, out)


def np_masked_mean(per_pixel, mask):
  mask = np.ones(per_pixel.shape, bool) if mask is None else mask
  return per_pixel[mask].sum() / mask.sum() if mask.any() else 0.0


def np_softmax32(z):
  return np.exp(np_log_softmax(z)).astype(np.float32)


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------


@st.composite
def seg_cases(draw, dtypes=(np.float32, BF16), scales=(0.1, 1.0, 4.0, 30.0)):
  """Logits, labels (some ignored with 255 or another out-of-range code),
  optional weights, and the rng for further draws."""
  b, h, w, c = draw(st.sampled_from(SEG_SHAPES))
  rng = np.random.default_rng(draw(SEEDS))
  scale = draw(st.sampled_from(scales))
  p_ignore = draw(st.sampled_from((0.0, 0.3, 1.0)))
  dtype = draw(st.sampled_from(dtypes))
  use_weights = draw(st.booleans())
  logits = (scale * rng.standard_normal((b, h, w, c))).astype(dtype)
  labels = rng.integers(0, c, (b, h, w))
  ignored = rng.random((b, h, w)) < p_ignore
  codes = rng.choice(np.array([IGNORE, -1, c, c + 3]), (b, h, w))
  labels = np.where(ignored, codes, labels).astype(np.int32)
  weights = (rng.uniform(0.0, 2.0, (b, h, w)).astype(np.float32)
             if use_weights else None)
  return dict(logits=logits, labels=labels, weights=weights, rng=rng)


@st.composite
def prob_cases(draw, dtypes=(np.float32,), scales=(0.5, 2.0, 8.0)):
  """Softmax probabilities (B, H, W, C) and the rng."""
  b, h, w, c = draw(st.sampled_from(SEG_SHAPES))
  rng = np.random.default_rng(draw(SEEDS))
  scale = draw(st.sampled_from(scales))
  dtype = draw(st.sampled_from(dtypes))
  probs = np_softmax32(scale * rng.standard_normal((b, h, w, c)))
  return dict(probs=probs.astype(dtype), rng=rng)


def perturb(x, where_pixels, rng, amount=10.0):
  """x with random changes at the pixels where `where_pixels` (leading dims)."""
  noise = (amount * rng.standard_normal(x.shape)).astype(np.float32)
  sel = where_pixels.reshape(
      where_pixels.shape + (1,) * (x.ndim - where_pixels.ndim))
  return np.where(sel, x.astype(np.float32) + noise, x).astype(x.dtype)


def class_perm_labels(labels, perm, c):
  """Labels of class-permuted scores x[..., perm]: old y -> inv[y]."""
  inv = np.argsort(perm)
  valid = (labels >= 0) & (labels < c)
  return np.where(valid, inv[np.where(valid, labels, 0)], labels).astype(
      labels.dtype)


def tol(dtype):
  """Gradient tolerances: gradients come back in the input dtype."""
  return dict(rtol=2e-2, atol=1e-3) if dtype == BF16 else dict(
      rtol=2e-4, atol=2e-6)


VALUE_TOL = dict(rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------
# Functions under test, wrapped so that one compile serves a whole example.
# (Module level, so jit's cache is keyed on a stable function.)
# ---------------------------------------------------------------------------


def _ce_vg(logits, labels, weights, ignore_index):
  # ignore_index is an operand (traced under jit), so a custom one needs no
  # extra compile.
  return jax.value_and_grad(
      lambda z: losses.softmax_cross_entropy(
          logits=z, labels=labels, weights=weights,
          ignore_index=ignore_index))(logits)


def _soft_ce_vg(logits, targets, mask):
  return jax.value_and_grad(
      lambda z, t: losses.soft_cross_entropy(logits=z, targets=t, mask=mask),
      argnums=(0, 1))(logits, targets)


def _tpld_vg(logits, labels, lam, beta, weights, apply_to, sg):
  return jax.value_and_grad(
      lambda z: losses.tpld_bootstrap_loss(
          logits=z, labels=labels, thresholds=lam, beta=beta,
          apply_to=apply_to, stop_gradient_prediction=sg,
          weights=weights))(logits)


def _soft_boot_vg(logits, labels, beta, weights, apply_to, sg):
  return jax.value_and_grad(
      lambda z: losses.soft_bootstrap_loss(
          logits=z, labels=labels, beta=beta, apply_to=apply_to,
          stop_gradient_prediction=sg, weights=weights))(logits)


def _hard_boot_vg(logits, labels, beta, weights, apply_to):
  return jax.value_and_grad(
      lambda z: losses.hard_bootstrap_loss(
          logits=z, labels=labels, beta=beta, apply_to=apply_to,
          weights=weights))(logits)


def _adversarial(d_src, d_tgt, t):
  return dict(
      bce=losses.bce_with_logits(d_src, t),
      bce_flipped=losses.bce_with_logits(-d_src, 1.0 - t),
      bce_grad=jax.grad(losses.bce_with_logits)(d_src, t),
      ls=losses.lsgan_loss(d_src, t),
      ls_grad=jax.grad(losses.lsgan_loss)(d_src, t),
      gen_vanilla=losses.generator_adv_loss(d_out=d_src, target_label=t),
      gen_ls=losses.generator_adv_loss(d_out=d_src, gan="LS",
                                       target_label=t),
      disc_vanilla=losses.discriminator_loss(
          d_out_source=d_src, d_out_target=d_tgt, gan="Vanilla",
          source_label=t, target_label=1.0 - t),
      disc_ls=losses.discriminator_loss(
          d_out_source=d_src, d_out_target=d_tgt, gan="ls",
          source_label=t, target_label=1.0 - t),
  )


def _entropy_fns(p):
  return (losses.weighted_self_information(p), losses.entropy_map(p),
          jax.grad(lambda q: jnp.sum(losses.weighted_self_information(q)))(p))


def _minent_vg(p, mask):
  return jax.value_and_grad(lambda q: losses.minent_loss(q, mask))(p)


def _mrkld_vg(logits, mask):
  return jax.value_and_grad(
      lambda z: losses.mrkld_loss(logits=z, mask=mask))(logits)


def _select_both(p, lam):
  return (thr.ratios(p, lam), thr.select(p, lam),
          thr.select(p, lam, inclusive=False),
          thr.select(p, lam, ignore_index=7))


def _hist_update(hist, probs, valid, subsample):
  return thr.update_threshold_histogram(hist, probs, subsample=subsample,
                                        valid=valid)


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


class LossPropertiesTest(chex.TestCase):

  def check_ignored_pixels(self, vg, args, ignored, rng, value, grad,
                           changed_first=None, weights_index=None):
    """Gradient exactly 0 at `ignored`; changing args[0] there (and the
    weights, args[weights_index]) changes neither value nor gradient."""
    np.testing.assert_array_equal(np.asarray(grad, np.float32)[ignored], 0.0)
    changed = list(args)
    changed[0] = (perturb(args[0], ignored, rng) if changed_first is None
                  else changed_first)
    if weights_index is not None and args[weights_index] is not None:
      changed[weights_index] = np.where(
          ignored, 1e3, args[weights_index]).astype(np.float32)
    value2, grad2 = vg(*changed)
    self.assertEqual(float(value2), float(value))
    np.testing.assert_array_equal(np.asarray(grad2, np.float32),
                                  np.asarray(grad, np.float32))

  # -- softmax_cross_entropy -------------------------------------------------

  @chex.variants(with_jit=True, without_jit=True)
  @given(case=seg_cases(), ignore_index=st.integers(0, 4))
  @PROFILE
  def test_softmax_cross_entropy(self, case, ignore_index):
    logits, labels, weights = case["logits"], case["labels"], case["weights"]
    rng, dtype = case["rng"], logits.dtype
    b, c = logits.shape[0], logits.shape[-1]
    invalid = ~np_valid(labels, c)
    loss = self.variant(_ce_vg)
    vg = lambda z, y, w, ig=IGNORE: loss(z, y, w, np.int32(ig))
    value, grad = vg(logits, labels, weights)
    # Shape, dtype (bf16 is computed in float32), finiteness.
    chex.assert_shape(value, ())
    chex.assert_type(value, jnp.float32)
    chex.assert_shape(grad, logits.shape)
    chex.assert_type(grad, dtype)
    chex.assert_tree_all_finite((value, grad))
    # NumPy reference, value and gradient.
    ref_value, ref_grad = ref_ce(logits, labels, weights)
    np.testing.assert_allclose(value, ref_value, **VALUE_TOL)
    np.testing.assert_allclose(np.asarray(grad, np.float32), ref_grad,
                               **tol(dtype))
    # Ignored pixels (255 and other labels outside [0, C)).
    self.check_ignored_pixels(vg, (logits, labels, weights), invalid, rng,
                              value, grad, weights_index=2)
    # Every out-of-range code means the same as 255.
    self.assertEqual(
        float(vg(logits, np.where(invalid, IGNORE, labels).astype(np.int32),
                 weights)[0]), float(value))
    # Batch permutation: same mean, permuted gradient.
    perm = rng.permutation(b)
    value_p, grad_p = vg(logits[perm], labels[perm],
                         None if weights is None else weights[perm])
    np.testing.assert_allclose(value_p, value, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad_p, np.float32),
                               np.asarray(grad, np.float32)[perm], rtol=1e-6,
                               atol=1e-7)
    # Class permutation (relabelled): same value, permuted gradient.
    cperm = rng.permutation(c)
    value_c, grad_c = vg(logits[..., cperm],
                         class_perm_labels(labels, cperm, c), weights)
    np.testing.assert_allclose(value_c, value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_c, np.float32),
                               np.asarray(grad, np.float32)[..., cperm],
                               **tol(dtype))
    # Limits: uniform logits give log C on any labelled batch; no valid pixel
    # gives exactly 0 and a zero gradient; zero weights give 0.
    value_u, _ = vg(np.zeros_like(logits), labels,
                    None if weights is None else np.ones_like(weights))
    expected_u = math.log(c) if (~invalid).any() else 0.0
    np.testing.assert_allclose(value_u, expected_u, rtol=1e-6)
    value_i, grad_i = vg(logits, np.full_like(labels, IGNORE), weights)
    self.assertEqual(float(value_i), 0.0)
    np.testing.assert_array_equal(np.asarray(grad_i, np.float32), 0.0)
    if weights is not None:
      value_z, grad_z = vg(logits, labels, np.zeros_like(weights))
      self.assertEqual(float(value_z), 0.0)
      np.testing.assert_array_equal(np.asarray(grad_z, np.float32), 0.0)
    # A custom ignore_index (here a class index, or >= C: no effect).
    value_x, grad_x = vg(logits, labels, weights, np.int32(ignore_index))
    ref_x, ref_gx = ref_ce(logits, labels, weights, ignore=ignore_index)
    np.testing.assert_allclose(value_x, ref_x, **VALUE_TOL)
    np.testing.assert_allclose(np.asarray(grad_x, np.float32), ref_gx,
                               **tol(dtype))

  # -- soft_cross_entropy ----------------------------------------------------

  @chex.variants(with_jit=True, without_jit=True)
  @given(case=seg_cases(), use_mask=st.booleans(),
         targets_kind=st.sampled_from(("soft", "onehot", "partly_zero")))
  @PROFILE
  def test_soft_cross_entropy(self, case, use_mask, targets_kind):
    logits, labels, rng = case["logits"], case["labels"], case["rng"]
    dtype = logits.dtype
    b, c = logits.shape[0], logits.shape[-1]
    valid = np_valid(labels, c)
    if targets_kind == "onehot":
      targets = np_onehot(labels, valid, c).astype(np.float32)
    else:
      targets = np_softmax32(3 * rng.standard_normal(logits.shape))
      if targets_kind == "partly_zero":  # all-zero rows: 0 loss, still count
        targets = targets * (rng.random(labels.shape) < 0.5)[..., None]
    mask = (rng.random(labels.shape) < 0.6) if use_mask else None
    vg = self.variant(_soft_ce_vg)
    value, (g_logits, g_targets) = vg(logits, targets, mask)
    chex.assert_shape(value, ())
    chex.assert_type(value, jnp.float32)
    chex.assert_type(g_logits, dtype)
    chex.assert_shape((g_logits, g_targets), logits.shape)
    chex.assert_tree_all_finite((value, g_logits, g_targets))
    lp = np_log_softmax(logits)
    per_pixel = -(targets * lp).sum(-1)
    np.testing.assert_allclose(value, np_masked_mean(per_pixel, mask),
                               **VALUE_TOL)
    n = labels.size if mask is None else max(mask.sum(), 1)
    inc = np.ones(labels.shape) if mask is None else mask
    ref_g = (np.exp(lp) * targets.sum(-1, keepdims=True) - targets) * inc[
        ..., None] / n
    np.testing.assert_allclose(np.asarray(g_logits, np.float32), ref_g,
                               **tol(dtype))
    np.testing.assert_allclose(g_targets, -lp * inc[..., None] / n,
                               rtol=1e-5, atol=1e-5)
    if mask is not None:
      # Masked-out pixels: no gradient into logits or targets, no effect.
      out = ~mask
      np.testing.assert_array_equal(np.asarray(g_targets)[out], 0.0)
      def logits_vg(z, t, m):
        v, (g, _) = vg(z, t, m)
        return v, g
      self.check_ignored_pixels(logits_vg, (logits, targets, mask), out, rng,
                                value, g_logits)
      changed = perturb(targets, out, rng)
      self.assertEqual(float(vg(logits, changed, mask)[0]), float(value))
      # Empty mask: 0, not NaN.
      value_e, (ge, _) = vg(logits, targets, np.zeros_like(mask))
      self.assertEqual(float(value_e), 0.0)
      np.testing.assert_array_equal(np.asarray(ge, np.float32), 0.0)
    if targets_kind == "onehot" and mask is None:
      # Equals the hard-label CE when every pixel is labelled (no ignore:
      # soft CE with all-zero rows counts them in the mean, CE does not).
      if valid.all():
        np.testing.assert_allclose(
            value, losses.softmax_cross_entropy(logits=logits, labels=labels),
            rtol=1e-6, atol=1e-6)
    # Batch and class permutations.
    perm = rng.permutation(b)
    value_p, _ = vg(logits[perm], targets[perm],
                    None if mask is None else mask[perm])
    np.testing.assert_allclose(value_p, value, rtol=1e-6, atol=1e-6)
    cperm = rng.permutation(c)
    value_c, (gl_c, _) = vg(logits[..., cperm], targets[..., cperm], mask)
    np.testing.assert_allclose(value_c, value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gl_c, np.float32),
                               np.asarray(g_logits, np.float32)[..., cperm],
                               **tol(dtype))
    # Zero targets give 0.
    self.assertEqual(float(vg(logits, np.zeros_like(targets), mask)[0]), 0.0)

  # -- adversarial: bce_with_logits, lsgan_loss, generator / discriminator ---

  @chex.variants(with_jit=True, without_jit=True)
  @given(src_shape=st.sampled_from(SEG_SHAPES),
         tgt_shape=st.sampled_from(SEG_SHAPES), seed=SEEDS,
         scale=st.sampled_from((0.5, 5.0, 100.0)),
         target=st.sampled_from((0.0, 1.0, 0.3)),
         dtype=st.sampled_from((np.float32, BF16)))
  @PROFILE
  def test_adversarial_losses(self, src_shape, tgt_shape, seed, scale, target,
                              dtype):
    rng = np.random.default_rng(seed)
    d_src = (scale * rng.standard_normal(src_shape[:3] + (1,))).astype(dtype)
    d_tgt = (scale * rng.standard_normal(tgt_shape[:3] + (1,))).astype(dtype)
    fns = self.variant(_adversarial)
    out = fns(d_src, d_tgt, np.float32(target))
    for name, value in out.items():
      if name.endswith("_grad"):
        chex.assert_shape(value, d_src.shape)
        chex.assert_type(value, dtype)
      else:
        chex.assert_shape(value, ())
        chex.assert_type(value, jnp.float32)
    chex.assert_tree_all_finite(out)  # stable for |logits| ~ 100

    def np_bce(x, t):
      x = np.asarray(x, np.float64)
      return np.mean(t * np.logaddexp(0, -x) + (1 - t) * np.logaddexp(0, x))

    def np_ls(x, t):
      return np.mean((np.asarray(x, np.float64) - t) ** 2)

    x = np.asarray(d_src, np.float64)
    rtol = dict(rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(out["bce"], np_bce(d_src, target), **rtol)
    np.testing.assert_allclose(out["ls"], np_ls(d_src, target), **rtol)
    np.testing.assert_allclose(
        np.asarray(out["bce_grad"], np.float32),
        (1 / (1 + np.exp(-x)) - target) / x.size, **tol(dtype))
    np.testing.assert_allclose(
        np.asarray(out["ls_grad"], np.float32), 2 * (x - target) / x.size,
        **tol(dtype))
    # BCE symmetry: l(x, t) = l(-x, 1 - t).
    np.testing.assert_allclose(out["bce_flipped"], out["bce"], rtol=1e-6)
    # The generator loss is the criterion at its target label; the mode flag
    # is case-insensitive ('Vanilla' / 'LS' as in the original code).
    np.testing.assert_allclose(out["gen_vanilla"], out["bce"], rtol=1e-6)
    np.testing.assert_allclose(out["gen_ls"], out["ls"], rtol=1e-6)
    np.testing.assert_allclose(
        out["disc_vanilla"],
        0.5 * np_bce(d_src, target) + 0.5 * np_bce(d_tgt, 1 - target), **rtol)
    np.testing.assert_allclose(
        out["disc_ls"],
        0.5 * np_ls(d_src, target) + 0.5 * np_ls(d_tgt, 1 - target), **rtol)
    # LS-GAN: >= 0 and exactly 0 on its target.
    self.assertGreaterEqual(float(out["ls"]), 0.0)
    if float(np.asarray(target, dtype)) == target:  # (bf16(0.3) != 0.3)
      at_target = fns(np.full_like(d_src, target), d_tgt, np.float32(target))
      self.assertEqual(float(at_target["ls"]), 0.0)
    # Means over elements: invariant to permuting them (here: the batch).
    perm = rng.permutation(d_src.shape[0])
    permuted = fns(d_src[perm], d_tgt, np.float32(target))
    for name in ("bce", "ls", "disc_vanilla", "disc_ls"):
      np.testing.assert_allclose(permuted[name], out[name], rtol=1e-6)
    with self.assertRaises(ValueError):
      losses.generator_adv_loss(d_out=d_src, gan="wgan")
    with self.assertRaises(ValueError):
      losses.discriminator_loss(d_out_source=d_src, d_out_target=d_tgt,
                                gan="hinge")

  # -- weighted_self_information, entropy_map ---------------------------------

  @chex.variants(with_jit=True, without_jit=True)
  @given(case=prob_cases(dtypes=(np.float32, BF16)))
  @PROFILE
  def test_self_information_and_entropy_map(self, case):
    probs, rng = case["probs"], case["rng"]
    c, dtype = probs.shape[-1], probs.dtype
    bf16 = dtype == BF16
    # Some one-hot rows (exact zeros) and some uniform rows.
    kind = rng.integers(0, 3, probs.shape[:-1])
    onehot = np.eye(c)[rng.integers(0, c, probs.shape[:-1])]
    probs = np.where((kind == 1)[..., None], onehot, probs)
    probs = np.where((kind == 2)[..., None], 1.0 / c, probs).astype(dtype)
    fns = self.variant(_entropy_fns)
    wsi, ent, grad = fns(probs)
    chex.assert_shape(wsi, probs.shape)
    chex.assert_shape(ent, probs.shape[:-1])
    chex.assert_type((wsi, ent), jnp.float32)
    chex.assert_tree_all_finite((wsi, ent, grad))
    np.testing.assert_allclose(wsi, ref_wsi(probs), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ent, ref_wsi(probs).sum(-1), rtol=1e-5,
                               atol=1e-6)
    # p = 0 gives exactly 0 and the finite gradient -log2(eps) / log2(C).
    zero = np.asarray(probs, np.float32) == 0
    np.testing.assert_array_equal(np.asarray(wsi)[zero], 0.0)
    np.testing.assert_allclose(
        np.asarray(grad, np.float32)[zero],
        -np.log2(np.float32(1e-30)) / np.log2(c), rtol=1e-2 if bf16 else 1e-6)
    # Normalised entropy: in [0, 1]; 0 on one-hot rows; 1 on uniform rows
    # (within the rounding of 1/C; bf16 rows do not sum to exactly 1, so the
    # bound [0, 1] only holds up to ~C * 2**-8 there).
    ent = np.asarray(ent)
    slack = 1e-2 if bf16 else 1e-6
    self.assertTrue(np.all(ent >= 0) and np.all(ent <= 1 + slack))
    np.testing.assert_array_equal(ent[kind == 1], 0.0)
    np.testing.assert_allclose(ent[kind == 2], 1.0, rtol=slack)
    # Class permutation: element-wise map is equivariant, entropy invariant.
    cperm = rng.permutation(c)
    wsi_c, ent_c, _ = fns(probs[..., cperm])
    np.testing.assert_array_equal(wsi_c, np.asarray(wsi)[..., cperm])
    np.testing.assert_allclose(ent_c, ent, rtol=1e-6, atol=1e-7)
    with self.assertRaises(ValueError):
      losses.weighted_self_information(np.ones((2, 1), np.float32))

  # -- minent_loss -------------------------------------------------------------

  @chex.variants(with_jit=True, without_jit=True)
  @given(case=prob_cases(dtypes=(np.float32, BF16)), use_mask=st.booleans())
  @PROFILE
  def test_minent_loss(self, case, use_mask):
    probs, rng = case["probs"], case["rng"]
    b, c = probs.shape[0], probs.shape[-1]
    mask = (rng.random(probs.shape[:-1]) < 0.6) if use_mask else None
    vg = self.variant(_minent_vg)
    value, grad = vg(probs, mask)
    chex.assert_shape(value, ())
    chex.assert_type(value, jnp.float32)
    chex.assert_type(grad, probs.dtype)
    chex.assert_tree_all_finite((value, grad))
    ent = ref_wsi(probs).sum(-1)
    np.testing.assert_allclose(value, np_masked_mean(ent, mask), rtol=1e-5,
                               atol=1e-6)
    # In [0, 1] (bf16 rows sum to 1 only within rounding: slack).
    self.assertTrue(
        0 <= float(value) <= 1 + (1e-2 if probs.dtype == BF16 else 1e-6))
    if mask is None:
      # ADVENT's entropy_loss: -sum P log2 P / (N H W log2 C) (no zeros in
      # these softmax outputs).
      p64 = np.asarray(probs, np.float64)
      np.testing.assert_allclose(
          value, -np.sum(p64 * np.log2(p64)) / (ent.size * np.log2(c)),
          rtol=1e-5)
    else:
      other = np_softmax32(rng.standard_normal(probs.shape)).astype(
          probs.dtype)
      self.check_ignored_pixels(
          vg, (probs, mask), ~mask, rng, value, grad,
          changed_first=np.where(mask[..., None], probs, other))
      value_e, grad_e = vg(probs, np.zeros_like(mask))
      self.assertEqual(float(value_e), 0.0)
      np.testing.assert_array_equal(np.asarray(grad_e, np.float32), 0.0)
    perm = rng.permutation(b)
    value_p, _ = vg(probs[perm], None if mask is None else mask[perm])
    np.testing.assert_allclose(value_p, value, rtol=1e-6, atol=1e-7)
    value_c, _ = vg(probs[..., rng.permutation(c)], mask)
    np.testing.assert_allclose(value_c, value, rtol=1e-6, atol=1e-7)

  # -- mrkld_loss --------------------------------------------------------------

  @chex.variants(with_jit=True, without_jit=True)
  @given(case=seg_cases(), use_mask=st.booleans())
  @PROFILE
  def test_mrkld_loss(self, case, use_mask):
    logits, rng = case["logits"], case["rng"]
    dtype = logits.dtype
    b, c = logits.shape[0], logits.shape[-1]
    mask = (rng.random(logits.shape[:-1]) < 0.6) if use_mask else None
    vg = self.variant(_mrkld_vg)
    value, grad = vg(logits, mask)
    chex.assert_shape(value, ())
    chex.assert_type(value, jnp.float32)
    chex.assert_type(grad, dtype)
    chex.assert_tree_all_finite((value, grad))
    lp = np_log_softmax(logits)
    np.testing.assert_allclose(value, np_masked_mean(-lp.mean(-1), mask),
                               **VALUE_TOL)
    inc = np.ones(lp.shape[:-1]) if mask is None else mask
    n = max(inc.sum(), 1)
    np.testing.assert_allclose(np.asarray(grad, np.float32),
                               (np.exp(lp) - 1.0 / c) * inc[..., None] / n,
                               **tol(dtype))
    # KL(uniform || p) + log K >= log K, equality at uniform logits.
    if inc.any():
      self.assertGreaterEqual(float(value), math.log(c) * (1 - 1e-6))
      np.testing.assert_allclose(vg(np.zeros_like(logits), mask)[0],
                                 math.log(c), rtol=1e-6)
    # Invariant to a per-pixel logit shift and to permuting classes / batch.
    if dtype == np.float32:  # (a bf16 shift would round the logits)
      shift = rng.standard_normal(logits.shape[:-1] + (1,)).astype(dtype)
      np.testing.assert_allclose(vg(logits + shift, mask)[0], value,
                                 rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vg(logits[..., rng.permutation(c)], mask)[0],
                               value, rtol=1e-5, atol=1e-6)
    perm = rng.permutation(b)
    np.testing.assert_allclose(
        vg(logits[perm], None if mask is None else mask[perm])[0], value,
        rtol=1e-6, atol=1e-6)
    if mask is not None:
      self.check_ignored_pixels(vg, (logits, mask), ~mask, rng, value, grad)
      self.assertEqual(float(vg(logits, np.zeros_like(mask))[0]), 0.0)

  # -- tpld_bootstrap_loss -----------------------------------------------------

  @chex.variants(with_jit=True, without_jit=True)
  @given(case=seg_cases(), beta=st.sampled_from((0.0, 0.3, 0.9, 1.0)),
         apply_to=st.sampled_from(("labeled", "all")), sg=st.booleans())
  @PROFILE
  def test_tpld_bootstrap_loss(self, case, beta, apply_to, sg):
    logits, labels, weights = case["logits"], case["labels"], case["weights"]
    rng, dtype = case["rng"], logits.dtype
    b, c = logits.shape[0], logits.shape[-1]
    invalid = ~np_valid(labels, c)
    lam = rng.uniform(0.05, 1.0, c).astype(np.float32)
    loss = self.variant(_tpld_vg, static_argnums=(5, 6))
    vg = lambda z, y, l, w: loss(z, y, l, np.float32(beta), w, apply_to, sg)
    value, grad = vg(logits, labels, lam, weights)
    chex.assert_shape(value, ())
    chex.assert_type(value, jnp.float32)
    chex.assert_type(grad, dtype)
    chex.assert_tree_all_finite((value, grad))
    ref_value, ref_grad = ref_bootstrap(
        logits, labels, beta, lam, "soft", apply_to, weights, sg)
    np.testing.assert_allclose(value, ref_value, rtol=2e-5, atol=5e-5)
    np.testing.assert_allclose(np.asarray(grad, np.float32), ref_grad,
                               **tol(dtype))
    # (The value does not depend on the stop-gradient flag: the reference
    # value ignores it, and both flags are drawn.)
    if apply_to == "labeled":
      self.check_ignored_pixels(
          lambda z, w: vg(z, labels, lam, w), (logits, weights), invalid,
          rng, value, grad, weights_index=1)
    # (apply_to='all': unlabelled pixels keep the (1 - beta) p/λ term, so
    # they DO change the value and get a gradient; the reference covers it.)
    # λ ≡ 1 is Reed's soft bootstrapping.
    ones = np.ones(c, np.float32)
    np.testing.assert_allclose(
        vg(logits, labels, ones, weights)[0],
        losses.soft_bootstrap_loss(logits=logits, labels=labels, beta=beta,
                                   apply_to=apply_to, weights=weights),
        rtol=1e-5, atol=1e-6)
    if beta == 1.0 and apply_to == "labeled":
      # beta = 1: CE on labelled pixels shifted by mean_valid w log λ_label,
      # with exactly the CE gradient.
      ce_value, ce_grad = ref_ce(logits, labels, weights)
      valid = ~invalid
      w = valid * (1.0 if weights is None else weights)
      shift = (w * np.log(lam.astype(np.float64))[np.where(valid, labels, 0)]
               ).sum() / max(valid.sum(), 1)
      np.testing.assert_allclose(value, ce_value + shift, rtol=2e-5,
                                 atol=5e-5)
      np.testing.assert_allclose(np.asarray(grad, np.float32), ce_grad,
                                 **tol(dtype))
    # Batch permutation; class permutation with permuted thresholds.
    perm = rng.permutation(b)
    np.testing.assert_allclose(
        vg(logits[perm], labels[perm], lam,
           None if weights is None else weights[perm])[0], value,
        rtol=1e-5, atol=1e-5)
    cperm = rng.permutation(c)
    np.testing.assert_allclose(
        vg(logits[..., cperm], class_perm_labels(labels, cperm, c),
           lam[cperm], weights)[0], value, rtol=1e-5, atol=1e-5)
    if weights is not None:
      self.assertEqual(
          float(vg(logits, labels, lam, np.zeros_like(weights))[0]), 0.0)
    with self.assertRaises(ValueError):
      losses.tpld_bootstrap_loss(logits=logits, labels=labels,
                                 thresholds=lam[:1], beta=beta)
    with self.assertRaises(ValueError):
      losses.tpld_bootstrap_loss(logits=logits, labels=labels,
                                 thresholds=lam, beta=beta, apply_to="some")

  # -- soft_bootstrap_loss -----------------------------------------------------

  @chex.variants(with_jit=True, without_jit=True)
  @given(case=seg_cases(), beta=st.sampled_from((0.0, 0.5, 0.95, 1.0)),
         apply_to=st.sampled_from(("labeled", "all")), sg=st.booleans())
  @PROFILE
  def test_soft_bootstrap_loss(self, case, beta, apply_to, sg):
    logits, labels, weights = case["logits"], case["labels"], case["weights"]
    rng, dtype = case["rng"], logits.dtype
    b, c = logits.shape[0], logits.shape[-1]
    invalid = ~np_valid(labels, c)
    loss = self.variant(_soft_boot_vg, static_argnums=(4, 5))
    vg = lambda z, y, w, bt=beta: loss(z, y, np.float32(bt), w, apply_to, sg)  # pylint: disable=g-long-lambda
    value, grad = vg(logits, labels, weights)
    chex.assert_shape(value, ())
    chex.assert_type(value, jnp.float32)
    chex.assert_type(grad, dtype)
    chex.assert_tree_all_finite((value, grad))
    ref_value, ref_grad = ref_bootstrap(logits, labels, beta, None, "soft",
                                        apply_to, weights, sg)
    np.testing.assert_allclose(value, ref_value, rtol=2e-5, atol=5e-5)
    np.testing.assert_allclose(np.asarray(grad, np.float32), ref_grad,
                               **tol(dtype))
    ce_value, ce_grad = ref_ce(logits, labels, weights)
    if sg:
      # With q held fixed, sum_k q_k d log q_k = 0: the (1 - beta) term has
      # no gradient at all (not even on unlabelled pixels with 'all'), and
      # for 'labeled' the gradient is exactly beta * the CE gradient.
      np.testing.assert_allclose(
          np.asarray(grad, np.float32)[invalid], 0.0, atol=1e-6)
      if apply_to == "labeled":
        np.testing.assert_allclose(np.asarray(grad, np.float32),
                                   beta * ce_grad, **tol(dtype))
    if apply_to == "labeled":
      self.check_ignored_pixels(lambda z, w: vg(z, labels, w),
                                (logits, weights), invalid, rng, value, grad,
                                weights_index=1)
      # beta = 1: plain CE on the labelled pixels (value and gradient).
      value_1, grad_1 = vg(logits, labels, weights, 1.0)
      np.testing.assert_allclose(value_1, ce_value, **VALUE_TOL)
      np.testing.assert_allclose(
          value_1, losses.softmax_cross_entropy(
              logits=logits, labels=labels, weights=weights),
          rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(np.asarray(grad_1, np.float32), ce_grad,
                                 **tol(dtype))
    perm = rng.permutation(b)
    np.testing.assert_allclose(
        vg(logits[perm], labels[perm],
           None if weights is None else weights[perm])[0], value,
        rtol=1e-5, atol=1e-5)
    cperm = rng.permutation(c)
    np.testing.assert_allclose(
        vg(logits[..., cperm], class_perm_labels(labels, cperm, c),
           weights)[0], value, rtol=1e-5, atol=1e-5)

  # -- hard_bootstrap_loss -----------------------------------------------------

  @chex.variants(with_jit=True, without_jit=True)
  @given(case=seg_cases(), beta=st.sampled_from((0.0, 0.5, 0.8, 1.0)),
         apply_to=st.sampled_from(("labeled", "all")))
  @PROFILE
  def test_hard_bootstrap_loss(self, case, beta, apply_to):
    logits, labels, weights = case["logits"], case["labels"], case["weights"]
    rng, dtype = case["rng"], logits.dtype
    b, c = logits.shape[0], logits.shape[-1]
    invalid = ~np_valid(labels, c)
    loss = self.variant(_hard_boot_vg, static_argnums=(4,))
    vg = lambda z, y, w, bt=beta: loss(z, y, np.float32(bt), w, apply_to)  # pylint: disable=g-long-lambda
    value, grad = vg(logits, labels, weights)
    chex.assert_shape(value, ())
    chex.assert_type(value, jnp.float32)
    chex.assert_type(grad, dtype)
    chex.assert_tree_all_finite((value, grad))
    ref_value, ref_grad = ref_bootstrap(logits, labels, beta, None, "hard",
                                        apply_to, weights)
    np.testing.assert_allclose(value, ref_value, rtol=2e-5, atol=5e-5)
    np.testing.assert_allclose(np.asarray(grad, np.float32), ref_grad,
                               **tol(dtype))
    ce_value, ce_grad = ref_ce(logits, labels, weights)
    if apply_to == "labeled":
      self.check_ignored_pixels(lambda z, w: vg(z, labels, w),
                                (logits, weights), invalid, rng, value, grad,
                                weights_index=1)
      value_1, grad_1 = vg(logits, labels, weights, 1.0)
      np.testing.assert_allclose(value_1, ce_value, **VALUE_TOL)
      np.testing.assert_allclose(np.asarray(grad_1, np.float32), ce_grad,
                                 **tol(dtype))
      # Labels that agree with the prediction: t = z, so CE for any beta.
      argmax = np.asarray(logits, np.float32).argmax(-1)
      agree = np.where(invalid, labels, argmax).astype(np.int32)
      np.testing.assert_allclose(vg(logits, agree, weights)[0],
                                 ref_ce(logits, agree, weights)[0],
                                 **VALUE_TOL)
    perm = rng.permutation(b)
    np.testing.assert_allclose(
        vg(logits[perm], labels[perm],
           None if weights is None else weights[perm])[0], value,
        rtol=1e-5, atol=1e-5)
    if dtype == np.float32:
      # Class permutation: only without ties in argmax (first max wins);
      # continuous float32 logits have none.
      cperm = rng.permutation(c)
      np.testing.assert_allclose(
          vg(logits[..., cperm], class_perm_labels(labels, cperm, c),
             weights)[0], value, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Pseudo-labels: ratios, select, lrent_soft_labels (JAX)
# ---------------------------------------------------------------------------


SELECT_TIE_BUG = (
    "FIXED (select now compares p with λ): `select` computed p / λ, which XLA (CPU, jit and eager alike) "
    "rewrites as p * (1/λ) when λ is broadcast over more than one pixel; "
    "that product is not correctly rounded, so for ~15% of float32 λ a pixel "
    "with p_k == λ_k gets p/λ < 1 and is dropped by inclusive selection "
    "(among them the pixel that defines λ_k), and one-ulp neighbours flip "
    "too. The docstring's 'p / λ >= 1 holds exactly when p >= λ' is false "
    "(checked on CPU with and without the tests' XLA flags; GPU unchecked).")


def draw_thresholds(probs, rng, exact_only=False):
  """(C,) float32 λ: p values of random pixels (exact ties), one float32
  ulp above / below them, or uniform in (0.05, 1] (not if exact_only)."""
  c = probs.shape[-1]
  flat = np.asarray(probs, np.float32).reshape(-1, c)
  lam = flat[rng.integers(0, flat.shape[0], c), np.arange(c)]
  kind = rng.integers(0, 3 if exact_only else 4, c)
  lam = np.where(kind == 1, np.nextafter(lam, np.float32(2)), lam)
  lam = np.where(kind == 2, np.nextafter(lam, np.float32(0)), lam)
  lam = np.where(kind == 3, rng.uniform(0.05, 1.0, c), lam)
  return np.clip(lam, np.float32(1e-6), np.float32(1)).astype(np.float32)


class PseudoLabelPropertiesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @given(case=prob_cases(dtypes=(np.float32, BF16)))
  @PROFILE
  def test_ratios_and_select(self, case):
    probs, rng = case["probs"], case["rng"]
    c = probs.shape[-1]
    lam = draw_thresholds(probs, rng)
    fns = self.variant(_select_both)
    r, sel, sel_strict, sel_7 = fns(probs, lam)
    chex.assert_shape(r, probs.shape)
    chex.assert_type(r, jnp.float32)
    chex.assert_shape((sel, sel_strict, sel_7), probs.shape[:-1])
    chex.assert_type((sel, sel_strict, sel_7), jnp.int32)
    # Within 1 ulp of the correctly rounded p / λ: XLA turns a division by a
    # broadcast λ into a multiplication by 1/λ (both variants), so it is NOT
    # bit-exact; `select` therefore compares p with λ (test below).
    p32 = np.asarray(probs, np.float32)
    ref_r = p32 / lam
    np.testing.assert_allclose(r, ref_r, rtol=2.5e-7, atol=0)
    # Selection, on the pixels whose best ratio is clearly off 1 and whose
    # argmax is not a near tie (the exact tie semantics are tested below).
    sorted_r = np.sort(ref_r, -1)
    best, label = sorted_r[..., -1], ref_r.argmax(-1)
    clear = np.abs(best - 1) > 1e-6
    if c > 1:
      clear &= sorted_r[..., -1] > sorted_r[..., -2] * (1 + 1e-6)
    np.testing.assert_array_equal(
        np.asarray(sel)[clear], np.where(best >= 1, label, IGNORE)[clear])
    np.testing.assert_array_equal(
        np.asarray(sel_strict)[clear], np.where(best > 1, label, IGNORE)[clear])
    np.testing.assert_array_equal(
        np.asarray(sel_7)[clear], np.where(best >= 1, label, 7)[clear])
    # Whatever the rounding: exclusive selection is a subset of inclusive
    # selection, with the same labels.
    strict = np.asarray(sel_strict) != IGNORE
    np.testing.assert_array_equal(np.asarray(sel)[strict],
                                  np.asarray(sel_strict)[strict])
    np.testing.assert_array_equal(np.asarray(sel_7) == 7,
                                  np.asarray(sel) == IGNORE)
    # λ at or below every probability selects every pixel with argmax p/λ;
    # λ = 1 selects only saturated pixels.
    _, sel_all, _, _ = fns(probs, np.full(c, 1e-7, np.float32))
    np.testing.assert_array_equal(sel_all, p32.argmax(-1))
    _, sel_one, _, _ = fns(probs, np.ones(c, np.float32))
    np.testing.assert_array_equal(np.asarray(sel_one) != IGNORE,
                                  (p32 >= 1).any(-1))
    # Class permutation (no ties among the computed ratios): relabelled.
    sorted_got = np.sort(np.asarray(r), -1)
    no_tie = sorted_got[..., -1] != sorted_got[..., -2]
    cperm = rng.permutation(c)
    _, sel_c, _, _ = fns(probs[..., cperm], lam[cperm])
    expected = np.where(np.asarray(sel) == IGNORE, IGNORE,
                        np.argsort(cperm)[np.where(sel == IGNORE, 0, sel)])
    np.testing.assert_array_equal(np.asarray(sel_c)[no_tie], expected[no_tie])

  @chex.variants(with_jit=True, without_jit=True)
  @given(case=prob_cases())
  @settings(PROFILE, max_examples=20, phases=[Phase.generate])  # no shrink
  def test_select_keeps_exactly_the_pixels_with_p_at_least_lambda(self, case):
    # Documented (`select`): "p / λ >= 1 holds exactly when p >= λ", so
    # inclusive selection keeps the pixels with some p_k >= λ_k (in
    # particular the pixel that defines λ_k) and exclusive selection those
    # with some p_k > λ_k. λ is drawn at p values and one ulp next to them.
    probs, rng = case["probs"], case["rng"]
    lam = draw_thresholds(probs, rng, exact_only=True)
    select = self.variant(thr.select, static_argnames=("inclusive",))
    p32 = np.asarray(probs, np.float32)
    np.testing.assert_array_equal(np.asarray(select(probs, lam)) != IGNORE,
                                  (p32 >= lam).any(-1))
    np.testing.assert_array_equal(
        np.asarray(select(probs, lam, inclusive=False)) != IGNORE,
        (p32 > lam).any(-1))

  @chex.variants(with_jit=True, without_jit=True)
  @given(case=prob_cases(), alpha=st.sampled_from((0.1, 0.25, 1.0)),
         high_lambda=st.booleans())
  @PROFILE
  def test_lrent_soft_labels(self, case, alpha, high_lambda):
    probs, rng = case["probs"], case["rng"]
    c = probs.shape[-1]
    # High λ (late rounds, few pixels) leaves many pixels unselected.
    lam = (rng.uniform(0.6, 1.0, c).astype(np.float32) if high_lambda
           else draw_thresholds(probs, rng))
    lrent = self.variant(thr.lrent_soft_labels)
    targets, keep = lrent(probs, lam, alpha)
    chex.assert_shape(targets, probs.shape)
    chex.assert_shape(keep, probs.shape[:-1])
    chex.assert_type(targets, jnp.float32)
    self.assertEqual(keep.dtype, jnp.bool_)
    chex.assert_tree_all_finite(targets)
    # Reference. The keep rule sum_k[-s log p + α s log s] < -sum_k s log λ
    # with s = softmax(log(p/λ)/α) simplifies to α logsumexp(log(p/λ)/α) > 0,
    # i.e. sum_k (p_k/λ_k)^(1/α) > 1 (away from the boundary: ε = 1e-32 and
    # rounding decide there).
    with np.errstate(divide="ignore"):
      z = (np.log(probs.astype(np.float64)) - np.log(lam.astype(np.float64))
           ) / alpha
    lse = np.logaddexp.reduce(z, axis=-1)
    soft = np.exp(z - lse[..., None])
    clear = np.abs(lse) > 1e-4
    keep = np.asarray(keep)
    np.testing.assert_array_equal(keep[clear], (lse > 0)[clear])
    np.testing.assert_allclose(np.asarray(targets),
                               soft * keep[..., None], rtol=1e-4, atol=1e-6)
    # Rows: a distribution where kept, zero elsewhere; argmax = argmax p/λ.
    np.testing.assert_allclose(np.asarray(targets).sum(-1), keep * 1.0,
                               rtol=1e-5, atol=1e-6)
    r = probs / lam
    top2 = np.sort(r, -1)[..., -2:]
    clear_top = keep & (top2[..., 1] > top2[..., 0] * (1 + 1e-5))
    np.testing.assert_array_equal(np.asarray(targets).argmax(-1)[clear_top],
                                  r.argmax(-1)[clear_top])
    # Every strictly hard-selected pixel (max p/λ > 1) is kept by LRENT.
    hard = r.max(-1) > 1 + 1e-4
    self.assertTrue(np.all(keep[hard]))
    # Class permutation: targets permuted, keep unchanged (away from the
    # boundary).
    cperm = rng.permutation(c)
    targets_c, keep_c = lrent(probs[..., cperm], lam[cperm], alpha)
    np.testing.assert_array_equal(np.asarray(keep_c)[clear], keep[clear])
    np.testing.assert_allclose(np.asarray(targets_c)[clear],
                               np.asarray(targets)[..., cperm][clear],
                               rtol=1e-5, atol=1e-6)

  # -- streaming histogram -----------------------------------------------------

  @chex.variants(with_jit=True, without_jit=True)
  @given(case=prob_cases(scales=(1.0, 8.0, 40.0)),
         subsample=st.sampled_from((1, 2, 4)), use_valid=st.booleans(),
         num_bins=st.sampled_from((16, 2048)),
         portion=st.floats(0.0, 1.0), leading_zero=st.booleans())
  @PROFILE
  def test_threshold_histogram(self, case, subsample, use_valid, num_bins,
                               portion, leading_zero):
    probs, rng = case["probs"], case["rng"]
    c = probs.shape[-1]
    valid = (rng.random(probs.shape[:-1]) < 0.7) if use_valid else None
    hist0 = thr.init_threshold_histogram(c, num_bins)
    chex.assert_shape(hist0, (c, num_bins))
    chex.assert_type(hist0, jnp.int32)
    np.testing.assert_array_equal(hist0, 0)
    update = self.variant(_hist_update, static_argnums=(3,))
    hist = update(hist0, probs, valid, subsample)
    chex.assert_shape(hist, (c, num_bins))
    chex.assert_type(hist, jnp.int32)
    # Per-class counts = the exact lists' lengths (same subsampling).
    lists = ref_class_confidences(probs, subsample, "conf", valid)
    np.testing.assert_array_equal(np.asarray(hist).sum(1),
                                  [len(v) for v in lists])
    # Histograms add: updating a non-empty histogram adds this batch.
    base = rng.integers(0, 5, (c, num_bins)).astype(np.int32)
    np.testing.assert_array_equal(update(base, probs, valid, subsample),
                                  base + np.asarray(hist))
    # Layout: increasing edges from 1/C to the largest float32 below 1.
    edges = thr.threshold_histogram_edges(c, num_bins)
    self.assertEqual(edges.shape, (num_bins + 1,))
    self.assertTrue(np.all(np.diff(edges) > 0))
    np.testing.assert_allclose(edges[[0, -1]], [1 / c, 1 - 2.0**-24],
                               rtol=1e-12)
    # λ from the histogram: at most the exact λ, in the same bin (compared in
    # logit space, where the bins are uniform; tolerance for float32
    # rounding of the binned logits).
    exact = thr.thresholds_from_confidences(
        lists, portion, mxnet_leading_zero=leading_zero)
    approx = thr.thresholds_from_histogram(
        hist, portion, mxnet_leading_zero=leading_zero)
    chex.assert_shape(approx, (c,))
    self.assertEqual(approx.dtype, np.float32)
    low = -math.log(c - 1)
    width = (math.log1p(-2.0**-24) + math.log(2.0**24) - low) / num_bins
    for k in range(c):
      length = len(lists[k]) + (1 if leading_zero and len(lists[k]) else 0)
      n_sel = math.floor(length * portion)
      if n_sel == 0 or n_sel > len(lists[k]):
        self.assertEqual(approx[k], 1.0)
        self.assertEqual(exact[k], 1.0)
        continue
      self.assertLessEqual(approx[k], exact[k])
      # Near 1 several edges round to the same float32: any of them.
      js = np.nonzero(edges.astype(np.float32) == approx[k])[0]
      self.assertGreater(js.size, 0)
      v = np.float64(exact[k])
      z = math.inf if v >= 1 else math.log(v) - math.log1p(-v)
      if js[0] > 0:
        self.assertGreaterEqual(z, low + width * js[0] - 1e-4)
      if js[-1] < num_bins - 1:
        self.assertLess(z, low + width * (js[-1] + 1) + 1e-4)

  def test_histogram_rejects_bad_arguments(self):
    with self.assertRaises(ValueError):
      thr.init_threshold_histogram(1)
    with self.assertRaises(ValueError):
      thr.init_threshold_histogram(3, 0)
    with self.assertRaises(ValueError):
      thr.thresholds_from_histogram(np.zeros((3, 4), np.int32), 1.5)


# ---------------------------------------------------------------------------
# Host-side NumPy functions (no JAX: plain hypothesis tests, no variants)
# ---------------------------------------------------------------------------


def ref_class_confidences(probs, subsample, kc_value, valid):
  probs = np.asarray(probs, np.float32)
  c = probs.shape[-1]
  out = [[] for _ in range(c)]
  for b in range(probs.shape[0]):
    p = probs[b].reshape(-1, c)
    if valid is not None:
      p = p[np.asarray(valid[b]).reshape(-1)]
    for k in range(c):
      vals = p.max(-1)[p.argmax(-1) == k] if kc_value == "conf" else p[:, k]
      out[k].extend(vals[::subsample])
  return [np.asarray(v, np.float32) for v in out]


def ref_thresholds(lists, portion, leading_zero=False):
  out = []
  for vals in lists:
    vals = sorted(np.asarray(vals, np.float32).tolist(), reverse=True)
    if leading_zero and vals:
      vals.append(0.0)
    n_sel = math.floor(len(vals) * portion)
    lam = vals[n_sel - 1] if n_sel > 0 else 1.0
    out.append(1.0 if leading_zero and lam == 0 else lam)
  return np.asarray(out, np.float32)


@st.composite
def conf_lists(draw):
  rng = np.random.default_rng(draw(SEEDS))
  c = draw(st.integers(1, 5))
  lengths = rng.integers(0, 12, c)
  # Two decimals: many equal values (ties at the order statistic).
  return [np.round(rng.uniform(0.2, 1.0, n), 2).astype(np.float32)
          for n in lengths]


@given(case=prob_cases(scales=(0.5, 4.0)), subsample=st.integers(1, 5),
       kc_value=st.sampled_from(("conf", "prob")), use_valid=st.booleans(),
       pad=st.tuples(st.integers(0, 2), st.integers(0, 2)))
@HOST_PROFILE
def test_class_confidences(case, subsample, kc_value, use_valid, pad):
  probs, rng = case["probs"], case["rng"]
  b, h, w, c = probs.shape
  valid = (rng.random((b, h, w)) < 0.7) if use_valid else None
  got = thr.class_confidences(probs, subsample=subsample, kc_value=kc_value,
                              valid=valid)
  assert len(got) == c
  ref = ref_class_confidences(probs, subsample, kc_value, valid)
  for g, r in zip(got, ref):
    assert g.dtype == np.float32 and g.ndim == 1
    np.testing.assert_array_equal(g, r)
  if subsample == 1 and kc_value == "conf":
    # A partition of the valid pixels' confidences.
    conf = probs.max(-1)[valid] if use_valid else probs.max(-1).reshape(-1)
    np.testing.assert_array_equal(np.sort(np.concatenate(got)),
                                  np.sort(conf))
  # Right/bottom padding masked out by `valid` gives the same lists.
  padded = rng.random((b, h + pad[0], w + pad[1], c)).astype(np.float32)
  padded[:, :h, :w] = probs
  pvalid = np.zeros(padded.shape[:-1], bool)
  pvalid[:, :h, :w] = True if valid is None else valid
  for g, p in zip(got, thr.class_confidences(
      padded, subsample=subsample, kc_value=kc_value, valid=pvalid)):
    np.testing.assert_array_equal(p, g)


@given(lists=conf_lists(), portion=st.floats(0.0, 1.0),
       portion2=st.floats(0.0, 1.0), leading_zero=st.booleans())
@HOST_PROFILE
def test_thresholds_from_confidences(lists, portion, portion2, leading_zero):
  lam = thr.thresholds_from_confidences(lists, portion,
                                        mxnet_leading_zero=leading_zero)
  assert lam.shape == (len(lists),) and lam.dtype == np.float32
  np.testing.assert_array_equal(lam, ref_thresholds(lists, portion,
                                                    leading_zero))
  if not leading_zero:
    for vals, t in zip(lists, lam):
      n_sel = math.floor(len(vals) * portion)
      if n_sel == 0:
        assert t == 1.0  # nothing to select (also: empty list)
      else:  # λ is the n_sel-th largest value: an order statistic.
        assert (vals >= t).sum() >= n_sel > (vals > t).sum()
    # A larger portion never raises a threshold.
    lam2 = thr.thresholds_from_confidences(lists, portion2)
    lo, hi = (lam, lam2) if portion <= portion2 else (lam2, lam)
    assert np.all(hi <= lo)
  np.testing.assert_array_equal(thr.thresholds_from_confidences(lists, 0.0),
                                1.0)
  with pytest.raises(ValueError):
    thr.thresholds_from_confidences(lists, 1.01)


@given(case=prob_cases(scales=(0.5, 4.0)), portion=st.floats(0.0, 1.0),
       subsample=st.integers(1, 4), kc_value=st.sampled_from(("conf", "prob")))
@HOST_PROFILE
def test_class_thresholds(case, portion, subsample, kc_value):
  probs = case["probs"]
  c = probs.shape[-1]
  lam = thr.class_thresholds(probs, portion, subsample=subsample,
                             kc_value=kc_value)
  assert lam.shape == (c,) and lam.dtype == np.float32
  lists = ref_class_confidences(probs, subsample, kc_value, None)
  np.testing.assert_array_equal(lam, ref_thresholds(lists, portion))
  if kc_value == "conf":
    # Coverage of the requested portion: at least floor(n_c * portion) of
    # the (subsampled) pixels predicted c have a confidence >= λ_c.
    for k, vals in enumerate(lists):
      assert (vals >= lam[k]).sum() >= math.floor(len(vals) * portion)


@given(case=prob_cases(scales=(0.5, 4.0)), portion=st.floats(0.0, 0.5))
@settings(HOST_PROFILE, phases=[Phase.generate])  # no shrinking
def test_cbst_selection_covers_the_portion(case, portion):
  # With every pixel counted (subsample 1), `select` with the CBST
  # thresholds keeps at least sum_c floor(n_c * portion) pixels: those
  # predicted c with p_c >= λ_c, which include the pixel defining λ_c.
  probs = case["probs"]
  lam = thr.class_thresholds(probs, portion, subsample=1)
  lists = ref_class_confidences(probs, 1, "conf", None)
  sel = np.asarray(thr.select(probs, lam))
  assert (sel != IGNORE).sum() >= sum(
      math.floor(len(v) * portion) for v in lists)


@given(round_index=st.integers(0, 40),
       init=st.floats(0.0, 0.5), step=st.floats(0.0, 0.2),
       max_portion=st.floats(0.0, 1.0))
@HOST_PROFILE
def test_target_portion(round_index, init, step, max_portion):
  got = thr.target_portion(round_index, init, step, max_portion)
  assert got == min(init + round_index * step, max_portion)
  assert got <= max_portion
  # Non-decreasing over rounds.
  assert thr.target_portion(round_index + 1, init, step, max_portion) >= got
  # CRST defaults: 0.2, +0.05 per round, capped at 0.5 from round 6 on.
  assert thr.target_portion(0) == 0.2
  assert thr.target_portion(round_index + 6) == 0.5
