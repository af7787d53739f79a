"""Winograd F(2×2, 3×3) conv against a float64 NumPy conv, and its transposes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.models.kernels import winograd


def _numpy_conv3x3(x, w, padding, dilation):
  """out[b, i, j] = sum_(a, c) xpad[b, i + a dh, j + c dw] @ w[a, c], float64."""
  (pt, pb), (pl, pr) = padding
  dh, dw = dilation
  xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  oh, ow = xp.shape[1] - 2 * dh, xp.shape[2] - 2 * dw
  out = np.zeros((x.shape[0], oh, ow, w.shape[-1]))
  for a in range(3):
    for c in range(3):
      out += np.einsum('bhwi,io->bhwo',
                       xp[:, a * dh:a * dh + oh, c * dw:c * dw + ow],
                       w[a, c].astype(np.float64))
  return out


def _numpy_conv3x3_grads(x, w, g, padding, dilation):
  """(dL/dx, dL/dw) of sum(conv(x, w) * g), float64 loops over taps."""
  (pt, pb), (pl, pr) = padding
  dh, dw = dilation
  xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  oh, ow = g.shape[1:3]
  dxp = np.zeros_like(xp)
  dwk = np.zeros(w.shape)
  for a in range(3):
    for c in range(3):
      rows = slice(a * dh, a * dh + oh)
      cols = slice(c * dw, c * dw + ow)
      dwk[a, c] = np.einsum('bhwi,bhwo->io', xp[:, rows, cols], g)
      dxp[:, rows, cols] += np.einsum('bhwo,io->bhwi', g, w[a, c])
  return dxp[:, pt:pt + x.shape[1], pl:pl + x.shape[2]], dwk


CASES = [
    # (input size, padding, dilation)
    ((9, 12), ((1, 1), (1, 1)), (1, 1)),        # 'same', odd / even sizes
    ((33, 65), ((2, 2), (2, 2)), (2, 2)),       # DeepLab layer3
    ((33, 65), ((4, 4), (4, 4)), (4, 4)),       # DeepLab layer4
    ((7, 10), ((0, 3), (2, 0)), (2, 3)),        # asymmetric, unequal dilation
    ((3, 3), ((0, 0), (0, 0)), (1, 1)),         # 'valid': one output pixel
    ((5, 4), ((6, 6), (6, 6)), (6, 6)),         # taps wholly in the padding
]


@pytest.mark.parametrize('size,padding,dilation', CASES)
def test_value_and_gradients_match_numpy(size, padding, dilation):
  rng = np.random.default_rng(sum(size))
  x = rng.normal(size=(2,) + size + (5,)).astype(np.float32)
  w = rng.normal(size=(3, 3, 5, 4)).astype(np.float32)
  want = _numpy_conv3x3(x, w, padding, dilation)
  got = winograd.winograd_conv3x3(jnp.asarray(x), jnp.asarray(w), padding,
                                  dilation)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
  g = rng.normal(size=want.shape)
  dx, dw = jax.grad(lambda x, w: jnp.sum(winograd.winograd_conv3x3(
      x, w, padding, dilation) * g.astype(np.float32)), (0, 1))(x, w)
  want_dx, want_dw = _numpy_conv3x3_grads(x, w, g, padding, dilation)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=5e-5)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=2e-4)


def test_float32_error_is_that_of_a_direct_conv():
  # F(2, 3) adds a few roundings per output; at DeepLab's widths (K = 9 *
  # 256 terms) its error against float64 stays within 4x the direct float32
  # conv's (XLA's, highest precision).
  rng = np.random.default_rng(3)
  x = rng.normal(size=(1, 17, 19, 256)).astype(np.float32)
  w = (rng.normal(size=(3, 3, 256, 64)) / 48).astype(np.float32)
  padding, dilation = ((2, 2), (2, 2)), (2, 2)
  want = _numpy_conv3x3(x, w, padding, dilation)
  direct = jax.lax.conv_general_dilated(
      x, w, (1, 1), padding, rhs_dilation=dilation,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)
  got = winograd.winograd_conv3x3(x, w, padding, dilation)
  err_direct = np.max(np.abs(np.asarray(direct, np.float64) - want))
  err = np.max(np.abs(np.asarray(got, np.float64) - want))
  assert err <= 4 * err_direct, (err, err_direct)


def test_bfloat16_inputs_accumulate_in_float32():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(1, 10, 11, 16)).astype(np.float32)
  w = (rng.normal(size=(3, 3, 16, 8)) / 12).astype(np.float32)
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  got = winograd.winograd_conv3x3(xb, wb, ((1, 1), (1, 1)))
  assert got.dtype == jnp.bfloat16
  want = _numpy_conv3x3(np.asarray(xb, np.float32), np.asarray(wb, np.float32),
                        ((1, 1), (1, 1)), (1, 1))
  # bfloat16 output rounding (2^-8 relative) plus the transformed inputs'.
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=3e-2,
                             atol=3e-2)


@pytest.mark.parametrize('transform,plain,make_input', [
    (lambda s: winograd.input_transform(s, 3, 4),
     lambda s: winograd.input_transform.fun(s, 3, 4),
     lambda rng: rng.normal(size=(2, 8, 10, 3))),
    (winograd.output_transform, winograd.output_transform.fun,
     lambda rng: tuple(rng.normal(size=(2, 3, 4, 3)) for _ in range(16))),
    (winograd.kernel_transform, winograd.kernel_transform.fun,
     lambda rng: rng.normal(size=(3, 3, 4, 5))),
])
def test_hand_written_transposes_match_autodiff(transform, plain, make_input):
  # All three transforms are linear: their custom backward must equal the
  # transpose autodiff derives from the forward code (`.fun`, no custom rule).
  rng = np.random.default_rng(8)
  primal = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), make_input(rng))
  out, vjp = jax.vjp(transform, primal)
  cotangent = jax.tree.map(
      lambda o: jnp.asarray(rng.normal(size=o.shape), jnp.float32), out)
  (have,) = vjp(cotangent)
  _, plain_vjp = jax.vjp(plain, primal)
  (want,) = plain_vjp(cotangent)
  for a, b in zip(jax.tree.leaves(have), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)


def test_kernel_transform_is_g_g_gt():
  rng = np.random.default_rng(9)
  k = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
  g = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]])
  want = np.einsum('xa,yc,acio->xyio', g, g, k).reshape(16, 4, 5)
  got = np.stack(winograd.kernel_transform(jnp.asarray(k)))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_rejects_other_kernels():
  with pytest.raises(ValueError, match='3x3'):
    winograd.winograd_conv3x3(jnp.ones((1, 8, 8, 2)), jnp.ones((5, 5, 2, 2)),
                              ((2, 2), (2, 2)))
