"""Array operations shared by the segmentation methods.

* `upsample_bilinear`: bilinear resizing with PyTorch semantics. The original
  code bases upsample logits with `nn.Upsample(mode='bilinear')`, which under
  PyTorch <= 0.3 (and explicitly in AdaptSegNet's `pytorch_0.4/` branch) means
  `align_corners=True`. `jax.image.resize` uses half-pixel centres, i.e.
  `align_corners=False`, and is therefore not equivalent (METHODS.md §3.5).
* `gradient_reversal`: DANN's gradient reversal layer (METHODS.md §12).

Pure JAX; every function is jit-able.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _interpolation_matrix(
    in_size: int, out_size: int, align_corners: bool
) -> np.ndarray:
  """Linear-interpolation weights along one axis, PyTorch semantics.

  Built with NumPy at trace time: sizes are static, so the matrix is a
  compile-time constant.

  Args:
    in_size: input length n_in >= 1.
    out_size: output length n_out >= 1.
    align_corners: PyTorch's `align_corners` flag.

  Returns:
    (out_size, in_size) float64 matrix M; the resized signal is M @ x. Each
    row has at most two non-zeros and sums to 1.
  """
  out_idx = np.arange(out_size, dtype=np.float64)
  if align_corners:
    # Corner pixels of input and output are aligned: src = i * (n_in-1) /
    # (n_out-1). PyTorch uses scale 0 when n_out == 1 (every output samples
    # input index 0).
    scale = 0.0 if out_size == 1 else (in_size - 1) / (out_size - 1)
    src = out_idx * scale
  else:
    # Half-pixel centres; PyTorch clamps negative source positions to 0
    # (no antialiasing when downsampling).
    src = (out_idx + 0.5) * (in_size / out_size) - 0.5
    src = np.maximum(src, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = src - i0
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  # `add` (not assignment) so that i0 == i1 at the border keeps weight 1.
  np.add.at(matrix, (rows, i0), 1.0 - frac)
  np.add.at(matrix, (rows, i1), frac)
  return matrix


def upsample_bilinear(
    x: jax.Array,
    size: Sequence[int],
    *,
    align_corners: bool = True,
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
) -> jax.Array:
  """Bilinear resize of a channels-last batch with PyTorch semantics.

  Equals `torch.nn.functional.interpolate(x, size, mode='bilinear',
  align_corners=align_corners)` on the NCHW transpose, for up- and
  downsampling (no antialiasing, like PyTorch). Implemented as two small
  interpolation matrices applied with `einsum` (separable bilinear).

  Args:
    x: (B, h, w, C) array (floating point).
    size: (H, W) output spatial size; static Python ints.
    align_corners: True (default) aligns the corner pixels, as the original
      AdaptSegNet/ADVENT/CRST code does (option `upsample_align_corners`).
      False uses half-pixel centres, equal to `jax.image.resize(...,
      method='bilinear', antialias=False)`.
    precision: matmul precision of the two contractions. HIGHEST by default
      so that GPUs/TPUs do not silently use TF32/bf16 passes on float32
      logits.

  Returns:
    (B, H, W, C) array with the dtype of `x`.
  """
  if x.ndim != 4:
    raise ValueError(f"expected (B, h, w, C), got shape {x.shape}")
  out_h, out_w = (int(s) for s in size)
  if out_h < 1 or out_w < 1:
    raise ValueError(f"size must be positive, got {tuple(size)}")
  _, in_h, in_w, _ = x.shape
  if (in_h, in_w) == (out_h, out_w):
    # Both conventions give the identity at equal size; skip the matmuls.
    return x
  mat_h = jnp.asarray(_interpolation_matrix(in_h, out_h, align_corners),
                      x.dtype)
  mat_w = jnp.asarray(_interpolation_matrix(in_w, out_w, align_corners),
                      x.dtype)
  y = jnp.einsum("Hh,bhwc->bHwc", mat_h, x, precision=precision)
  return jnp.einsum("Ww,bHwc->bHWc", mat_w, y, precision=precision)


@jax.custom_vjp
def _reverse_gradient(x: jax.Array, scale: jax.Array) -> jax.Array:
  return x


def _reverse_gradient_fwd(x, scale):
  return x, scale


def _reverse_gradient_bwd(scale, g):
  # `scale` is a schedule value, not a learnable quantity: zero cotangent.
  return (-scale * g).astype(g.dtype), jnp.zeros_like(scale)


_reverse_gradient.defvjp(_reverse_gradient_fwd, _reverse_gradient_bwd)


def gradient_reversal(x: jax.Array, scale: jax.Array | float) -> jax.Array:
  """Gradient reversal layer: identity forward, -scale * g backward.

  `scale` is an ordinary (possibly traced) array argument, so a jitted step
  that feeds a new λ from a schedule every iteration does not retrace.

  Args:
    x: array of any shape (floating point).
    scale: scalar (or array broadcastable to `x`) GRL coefficient λ >= 0. It
      receives a zero cotangent.

  Returns:
    `x` unchanged (same shape and dtype); its cotangent is -scale * g.
  """
  scale = jnp.asarray(scale)
  if not jnp.issubdtype(scale.dtype, jnp.floating):
    # An integer scale would need a float0 cotangent; use a float instead.
    scale = scale.astype(jnp.float32)
  return _reverse_gradient(x, scale)
