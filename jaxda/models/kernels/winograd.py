"""3×3 stride-1 convolution by Winograd's minimal filtering, F(2×2, 3×3).

A 2×2 block of outputs of a 3×3 conv needs 36 multiplications per input /
output channel pair done directly, 16 in Winograd's form (Lavin & Gray,
"Fast Algorithms for Convolutional Neural Networks", 2016):

  Y = A^T [(G g G^T) ⊙ (B^T d B)] A

for a 4×4 input tile d and the 3×3 kernel g; summed over input channels the
⊙ becomes 16 independent matrix products, (tiles, C_in) @ (C_in, C_out). So
every product of a 3×3 conv (forward, input gradient, weight gradient) does
2.25× fewer FLOPs than the im2col matmul; ResNet-101's bottleneck 3×3s are
about half of DeepLab-v2's FLOPs. The tile transforms are additions and
halvings, memory-bound passes over a buffer 4× the input (im2col writes 9×).

A conv with dilation d is d² undilated convs on the interleaved sub-grids
x[r::d, s::d] (each output of sub-grid (r, s) reads only inputs of that
sub-grid), so dilated 3×3s run the same way.

Numerics: the transforms' coefficients are 0, ±1 and ±1/2, so F(2, 3) keeps
float32 results within a few ulps of the direct sum's error (measured in
tests/test_winograd.py against a float64 NumPy conv).

The transforms have hand-written transposes: autodiff's transpose of a
stride-2 slice is an interior-padded copy, and XLA:CPU evaluates every
padded copy for every element, with the cotangent's producer inlined into
each (the same pattern as the taps conv's; benchmarks/NOTES.md).
Platforms: cpu under conv_impl='auto' (measured there); on cuda, rocm and
tpu only when asked for (conv_impl='winograd'), since 'auto' runs XLA's
conv there (`kernels/platform.py`). Written by hand: neither XLA:CPU nor
Flax offers a Winograd convolution.
"""

from collections.abc import Sequence
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jaxda.models.kernels import matmul as matmul_lib

# F(2, 3): B^T (4×4), G (4×3), A^T (2×4).
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]],
              np.float32)
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _combine(coefficients: Sequence[float], parts: Sequence[jax.Array]):
  """sum_i c_i parts[i] over the nonzero c_i; ±1 as adds and subtractions."""
  out = None
  for c, p in zip(coefficients, parts):
    if c == 0:
      continue
    term = p if abs(c) == 1 else float(abs(c)) * p
    if out is None:
      out = term if c > 0 else -term
    else:
      out = out + term if c > 0 else out - term
  return out


def _tile_rows(s: jax.Array, axis: int, tiles: int) -> list[jax.Array]:
  """The 4 stride-2 views s[α + 2t] (t < tiles) along `axis`, α = 0..3."""
  views = []
  for alpha in range(4):
    start = [0] * s.ndim
    limit = list(s.shape)
    strides = [1] * s.ndim
    start[axis] = alpha
    limit[axis] = alpha + 2 * (tiles - 1) + 1
    strides[axis] = 2
    views.append(lax.slice(s, start, limit, strides))
  return views


def _untile_rows(parts: Sequence[jax.Array], axis: int) -> jax.Array:
  """Transpose of `_tile_rows`: overlap-adds 4 (…, tiles, …) views.

  Row 2t gets parts[0][t] + parts[2][t - 1], row 2t + 1 gets
  parts[1][t] + parts[3][t - 1]: 2 tiles + 2 rows along `axis`.
  """
  def shift(p, before, after):
    pads = [(0, 0, 0)] * p.ndim
    pads[axis] = (before, after, 0)
    return lax.pad(p, jnp.zeros((), p.dtype), pads)
  even = shift(parts[0], 0, 1) + shift(parts[2], 1, 0)
  odd = shift(parts[1], 0, 1) + shift(parts[3], 1, 0)
  both = jnp.stack([even, odd], axis=axis + 1)
  shape = list(even.shape)
  shape[axis] *= 2
  return both.reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def input_transform(s: jax.Array, tiles_h: int,
                    tiles_w: int) -> tuple[jax.Array, ...]:
  """V = B^T d B for every 4×4 tile (stride 2) of s.

  Args:
    s: (N, 2 tiles_h + 2, 2 tiles_w + 2, C).
    tiles_h: tiles per column.
    tiles_w: tiles per row.

  Returns:
    16 arrays (N * tiles_h * tiles_w, C); entry ξ * 4 + ν holds
    (B^T d B)[ξ, ν]. Separate arrays, not one stacked one: the transpose of
    indexing a stack is a zero-padded full-size copy per index.
  """
  rows = _tile_rows(s, 1, tiles_h)
  out = []
  for xi in range(4):
    r = _combine(_BT[xi], rows)
    cols = _tile_rows(r, 2, tiles_w)
    out.extend(_combine(_BT[nu], cols) for nu in range(4))
  return tuple(v.reshape(-1, s.shape[-1]) for v in out)


def _input_transform_fwd(s, tiles_h, tiles_w):
  return input_transform(s, tiles_h, tiles_w), s.shape[0]


def _input_transform_bwd(tiles_h, tiles_w, n, dv):
  c = dv[0].shape[-1]
  dv = [d.reshape(n, tiles_h, tiles_w, c) for d in dv]
  # d(view α) = sum_ξ B^T[ξ, α] d(R_ξ): the columns of B^T.
  bt_cols = [tuple(_BT[xi][alpha] for xi in range(4)) for alpha in range(4)]
  dr = []
  for xi in range(4):
    dcols = [_combine(bt_cols[beta], [dv[xi * 4 + nu] for nu in range(4)])
             for beta in range(4)]
    dr.append(_untile_rows(dcols, 2))
  drows = [_combine(bt_cols[alpha], dr) for alpha in range(4)]
  return (_untile_rows(drows, 1),)


input_transform.defvjp(_input_transform_fwd, _input_transform_bwd)


@jax.custom_vjp
def output_transform(m: Sequence[jax.Array]) -> jax.Array:
  """Y = A^T M A per tile, the 2×2 outputs interleaved back into an image.

  Args:
    m: 16 arrays (N, tiles_h, tiles_w, C), the products; entry ξ * 4 + ν
      holds M[ξ, ν].

  Returns:
    (N, 2 tiles_h, 2 tiles_w, C).
  """
  p = [[_combine(_AT[j], [m[xi * 4 + nu] for nu in range(4)])
        for j in range(2)]
       for xi in range(4)]
  y = [[_combine(_AT[i], [p[xi][j] for xi in range(4)]) for j in range(2)]
       for i in range(2)]
  # (N, th, 2, tw, 2, C) -> (N, 2 th, 2 tw, C).
  out = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)
  n, th, _, tw, _, c = out.shape
  return out.reshape(n, 2 * th, 2 * tw, c)


def _output_transform_fwd(m):
  return output_transform(m), None


def _output_transform_bwd(_, dy):
  n, h2, w2, c = dy.shape
  dy = dy.reshape(n, h2 // 2, 2, w2 // 2, 2, c)
  dyij = [[dy[:, :, i, :, j] for j in range(2)] for i in range(2)]
  at_cols = [tuple(_AT[i][xi] for i in range(2)) for xi in range(4)]
  dp = [[_combine(at_cols[xi], [dyij[i][j] for i in range(2)])
         for j in range(2)] for xi in range(4)]
  dm = [[_combine(at_cols[nu], [dp[xi][j] for j in range(2)])
         for nu in range(4)] for xi in range(4)]
  return (tuple(d for row in dm for d in row),)


output_transform.defvjp(_output_transform_fwd, _output_transform_bwd)


@jax.custom_vjp
def kernel_transform(kernel: jax.Array) -> tuple[jax.Array, ...]:
  """U = G g G^T: (3, 3, C_in, C_out) -> 16 (C_in, C_out), kernel's dtype.

  Entry ξ * 4 + ν holds U[ξ, ν], computed in float32.
  """
  g = [[kernel[a, c].astype(jnp.float32) for c in range(3)] for a in range(3)]
  rows = [[_combine(_G[xi], [g[a][c] for a in range(3)]) for c in range(3)]
          for xi in range(4)]
  return tuple(_combine(_G[nu], rows[xi]).astype(kernel.dtype)
               for xi in range(4) for nu in range(4))


def _kernel_transform_fwd(kernel):
  return kernel_transform(kernel), None


def _kernel_transform_bwd(_, du):
  # dg[a, c] = sum_(ξ, ν) G[ξ, a] G[ν, c] dU[ξ, ν], stacked once: autodiff's
  # transpose of `kernel[a, c]` is 9 zero-padded kernel-sized copies summed,
  # evaluated for every kernel element.
  dtype = du[0].dtype  # the kernel's: U has its dtype
  du = [d.astype(jnp.float32) for d in du]
  rows = [[_combine(_G[:, c], du[xi * 4:xi * 4 + 4]) for c in range(3)]
          for xi in range(4)]
  dg = [[_combine(_G[:, a], [rows[xi][c] for xi in range(4)])
         for c in range(3)] for a in range(3)]
  return (jnp.stack([jnp.stack(r) for r in dg]).astype(dtype),)


kernel_transform.defvjp(_kernel_transform_fwd, _kernel_transform_bwd)


def winograd_conv3x3(x: jax.Array, kernel: jax.Array,
                     padding: Sequence[tuple[int, int]],
                     dilation: Sequence[int] = (1, 1)) -> jax.Array:
  """Stride-1 3×3 convolution (cross-correlation, like `lax.conv`), F(2×2, 3×3).

  Args:
    x: (B, H, W, C_in).
    kernel: (3, 3, C_in, C_out), x's dtype.
    padding: ((top, bottom), (left, right)) zero padding.
    dilation: (dh, dw).

  Returns:
    (B, h, w, C_out) in x.dtype (float32 accumulation),
    h = H + top + bottom - 2 dh (likewise w).
  """
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f'winograd_conv3x3 needs a 3x3 kernel, got {kernel.shape}')
  b, h, w, cin = x.shape
  cout = kernel.shape[-1]
  (top, bottom), (left, right) = padding
  dh, dw = dilation
  oh, ow = h + top + bottom - 2 * dh, w + left + right - 2 * dw
  if oh <= 0 or ow <= 0:
    raise ValueError(f'empty output {oh}x{ow} for input {h}x{w}')
  # Each of the dh x dw sub-grids gets 2 * tiles outputs; the output is
  # rounded up to whole tiles (the extra rows read zero padding, cropped).
  th, tw = -(-oh // (2 * dh)), -(-ow // (2 * dw))
  hp, wp = (2 * th + 2) * dh, (2 * tw + 2) * dw
  xp = lax.pad(x, jnp.zeros((), x.dtype),
               ((0, 0, 0), (top, hp - h - top, 0), (left, wp - w - left, 0),
                (0, 0, 0)))
  # (B, hs, dh, ws, dw, C) -> (B, dh, dw, hs, ws, C): sub-grid (r, s) is
  # rows r, r + dh, ... of the padded input.
  sub = xp.reshape(b, hp // dh, dh, wp // dw, dw, cin)
  sub = sub.transpose(0, 2, 4, 1, 3, 5).reshape(
      b * dh * dw, hp // dh, wp // dw, cin)
  v = input_transform(sub, th, tw)
  u = kernel_transform(kernel)
  # 16 products with K = C_in; kept separate (XLA:CPU's tuned dots are 2-D).
  m = [matmul_lib.matmul_f32(v[k], u[k]).reshape(b * dh * dw, th, tw, cout)
       for k in range(16)]
  y = output_transform(tuple(m))
  y = y.reshape(b, dh, dw, 2 * th, 2 * tw, cout).transpose(0, 3, 1, 4, 2, 5)
  y = y.reshape(b, 2 * th * dh, 2 * tw * dw, cout)
  return y[:, :oh, :ow].astype(x.dtype)
