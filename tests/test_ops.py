"""Tests for jaxda.ops against loop-based NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda import ops


def _np_source_coord(i, in_size, out_size, align_corners):
  """PyTorch's source coordinate of output index i (one axis)."""
  if align_corners:
    if out_size == 1:
      return 0.0
    return i * (in_size - 1) / (out_size - 1)
  return max((i + 0.5) * in_size / out_size - 0.5, 0.0)


def _np_bilinear(x, out_h, out_w, align_corners):
  """Loop reference of torch bilinear interpolate on (B, h, w, C)."""
  x = np.asarray(x, np.float64)
  b, h, w, c = x.shape
  out = np.zeros((b, out_h, out_w, c))
  for oy in range(out_h):
    sy = _np_source_coord(oy, h, out_h, align_corners)
    y0 = min(int(np.floor(sy)), h - 1)
    y1 = min(y0 + 1, h - 1)
    fy = sy - y0
    for ox in range(out_w):
      sx = _np_source_coord(ox, w, out_w, align_corners)
      x0 = min(int(np.floor(sx)), w - 1)
      x1 = min(x0 + 1, w - 1)
      fx = sx - x0
      out[:, oy, ox] = ((1 - fy) * (1 - fx) * x[:, y0, x0]
                        + (1 - fy) * fx * x[:, y0, x1]
                        + fy * (1 - fx) * x[:, y1, x0]
                        + fy * fx * x[:, y1, x1])
  return out


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize(
    "in_hw,out_hw",
    [((3, 5), (7, 11)),   # upsampling, non-integer ratios
     ((5, 4), (9, 13)),
     ((8, 9), (3, 4)),    # downsampling
     ((1, 4), (5, 6)),    # h == 1
     ((4, 3), (1, 7)),    # H == 1
     ((1, 1), (3, 2)),
     ((6, 7), (6, 7))])   # identity
def test_upsample_bilinear_matches_numpy_reference(in_hw, out_hw,
                                                   align_corners):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2,) + in_hw + (3,)).astype(np.float32)
  y = ops.upsample_bilinear(jnp.asarray(x), out_hw,
                            align_corners=align_corners)
  chex.assert_shape(y, (2,) + out_hw + (3,))
  chex.assert_type(y, jnp.float32)
  np.testing.assert_allclose(
      y, _np_bilinear(x, *out_hw, align_corners), rtol=1e-5, atol=1e-5)


def test_upsample_bilinear_identity_at_equal_size():
  x = np.random.default_rng(1).normal(size=(1, 4, 5, 2)).astype(np.float32)
  for align_corners in (True, False):
    y = ops.upsample_bilinear(jnp.asarray(x), (4, 5),
                              align_corners=align_corners)
    np.testing.assert_array_equal(y, x)


def test_upsample_bilinear_hand_worked_align_corners():
  # [[0, 1], [2, 3]] -> 3x3: corners kept, midpoints averaged.
  x = jnp.arange(4.0).reshape(1, 2, 2, 1)
  y = ops.upsample_bilinear(x, (3, 3))
  expected = [[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]]
  np.testing.assert_allclose(y[0, :, :, 0], expected, atol=1e-6)


def test_upsample_bilinear_hand_worked_half_pixel():
  # PyTorch, align_corners=False: [0, 1] -> 4 samples at source -0.25
  # (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1).
  x = jnp.asarray([0.0, 1.0]).reshape(1, 1, 2, 1)
  y = ops.upsample_bilinear(x, (1, 4), align_corners=False)
  np.testing.assert_allclose(y[0, 0, :, 0], [0.0, 0.25, 0.75, 1.0],
                             atol=1e-6)
  # The same with align_corners=True samples 0, 1/3, 2/3, 1.
  y = ops.upsample_bilinear(x, (1, 4), align_corners=True)
  np.testing.assert_allclose(y[0, 0, :, 0], [0.0, 1 / 3, 2 / 3, 1.0],
                             atol=1e-6)


def test_half_pixel_agrees_with_jax_image_resize_but_align_corners_not():
  x = np.random.default_rng(2).normal(size=(1, 5, 6, 2)).astype(np.float32)
  ours = ops.upsample_bilinear(jnp.asarray(x), (11, 13), align_corners=False)
  theirs = jax.image.resize(x, (1, 11, 13, 2), method="bilinear",
                            antialias=False)
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  aligned = ops.upsample_bilinear(jnp.asarray(x), (11, 13))
  assert np.max(np.abs(np.asarray(aligned) - np.asarray(theirs))) > 1e-2


def test_upsample_bilinear_jit_dtype_and_gradient():
  x = jnp.asarray(
      np.random.default_rng(3).normal(size=(2, 3, 4, 5)), jnp.bfloat16)
  fn = jax.jit(lambda v: ops.upsample_bilinear(v, (7, 9)))
  y = fn(x)
  chex.assert_shape(y, (2, 7, 9, 5))
  chex.assert_type(y, jnp.bfloat16)
  # Each output is a convex combination, so the gradient of the sum spreads
  # exactly (H*W)/(h*w)-many units over the input: total mass = H*W per
  # (batch, channel).
  x32 = x.astype(jnp.float32)
  grad = jax.grad(lambda v: ops.upsample_bilinear(v, (7, 9)).sum())(x32)
  chex.assert_tree_all_finite(grad)
  np.testing.assert_allclose(grad.sum(axis=(1, 2)), 63.0, rtol=1e-5)


def test_upsample_bilinear_rejects_bad_input():
  with pytest.raises(ValueError):
    ops.upsample_bilinear(jnp.zeros((3, 4, 2)), (5, 5))
  with pytest.raises(ValueError):
    ops.upsample_bilinear(jnp.zeros((1, 3, 4, 2)), (0, 5))


def test_gradient_reversal_forward_is_identity():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 4)), jnp.float32)
  y = ops.gradient_reversal(x, 0.7)
  chex.assert_type(y, jnp.float32)
  np.testing.assert_array_equal(y, x)


def test_gradient_reversal_backward_scales_by_minus_scale():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  w = rng.normal(size=(3, 4)).astype(np.float32)
  scale = jnp.float32(0.3)

  def head(v):  # a non-linear head after the GRL
    return jnp.sum(w * jnp.tanh(v) ** 2)

  gx, gscale = jax.grad(
      lambda v, s: head(ops.gradient_reversal(v, s)), argnums=(0, 1))(x,
                                                                    scale)
  # d/dx sum(w * tanh(x)^2) = w * 2 tanh(x) (1 - tanh(x)^2), then * -scale.
  t = np.tanh(np.asarray(x, np.float64))
  expected = -0.3 * w * 2 * t * (1 - t ** 2)
  np.testing.assert_allclose(gx, expected, rtol=1e-5, atol=1e-6)
  assert float(gscale) == 0.0


def test_gradient_reversal_check_grads_reasoning():
  # With scale = -1 the backward pass is the identity's, so the VJP must
  # agree with finite differences; with any other scale it must not.
  x = jnp.asarray(np.random.default_rng(6).normal(size=(5,)), jnp.float32)
  f_ok = lambda v: jnp.sin(ops.gradient_reversal(v, -1.0))
  jax.test_util.check_grads(f_ok, (x,), order=1, modes=("rev",), eps=1e-2,
                            atol=1e-2, rtol=1e-2)
  f_rev = lambda v: jnp.sin(ops.gradient_reversal(v, 1.0))
  with pytest.raises(AssertionError):
    jax.test_util.check_grads(f_rev, (x,), order=1, modes=("rev",), eps=1e-2,
                              atol=1e-2, rtol=1e-2)


def test_gradient_reversal_traced_scale_does_not_retrace():
  x = jnp.ones((4,), jnp.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def grad_fn(v, s):
    return jax.grad(lambda u: jnp.sum(ops.gradient_reversal(u, s)))(v)

  for s in (0.0, 0.5, 2.0):
    np.testing.assert_allclose(grad_fn(x, jnp.float32(s)), -s * np.ones(4))


def test_gradient_reversal_integer_scale_and_bf16():
  x = jnp.ones((2,), jnp.bfloat16)
  g = jax.grad(lambda v: jnp.sum(ops.gradient_reversal(v, 2)).astype(
      jnp.float32))(x)
  chex.assert_type(g, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(g, np.float32), [-2.0, -2.0])
