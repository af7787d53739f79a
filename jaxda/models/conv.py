"""`Conv`: `nn.Conv`'s parameters, run as matrix products where that is faster.

Same parameter tree as `flax.linen.Conv` ('kernel' (kh, kw, C_in, C_out),
'bias' (C_out,)), so checkpoints and weight importers do not care which
implementation ran. Why not `nn.Conv` everywhere (benchmarks/NOTES.md,
measured on a 2-core AVX-512/AMX CPU, jax 0.10.2):

* XLA:CPU runs a convolution's weight gradient as a convolution with an
  image-sized window; for a 1×1 conv that is 3-4× slower than the same
  contraction written as a matrix product, which XLA hands to its tuned dot
  library (YNNPACK). A 1×1 conv *is* a matrix product (strided: of the
  strided slice), so `impl='auto'` always runs it as one.
* XLA:CPU converts bfloat16 convolutions to float32 (no AMX), while a
  bfloat16 × bfloat16 → float32 dot runs on the AMX tiles (~5× the float32
  rate). With a bfloat16 compute dtype, k×k convs therefore run as im2col
  (the kh·kw shifted slices concatenated on the channel axis) times the
  reshaped kernel. In float32, XLA's own k×k convolution is kept: it is as
  fast as im2col and needs no kh·kw-times larger buffer.

Products accumulate in float32 and return the compute dtype; their
gradients are computed the same way (cotangent cast to the compute dtype,
float32 accumulation), which is what makes the backward pass use AMX too.
Written by hand: Flax has no matmul-backed convolution.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

IMPLS = ('auto', 'lax', 'dot')


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """(..., K) @ (K, N) -> (..., N), float32 accumulation, x's dtype out.

  Args:
    x: (..., K) activations (float32 or bfloat16).
    w: (K, N) weights, same dtype as x.

  Returns:
    (..., N) in x.dtype.
  """
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _matmul_fwd(x, w):
  return matmul(x, w), (x, w)


def _matmul_bwd(res, g):
  x, w = res
  # The cotangent in the compute dtype keeps both backward products on the
  # same (bfloat16: AMX) path as the forward one.
  g = g.astype(x.dtype)
  k, n = w.shape
  x2 = x.reshape(-1, k)
  g2 = g.reshape(-1, n)
  dx = lax.dot_general(g2, w, (((1,), (1,)), ((), ())),
                       preferred_element_type=jnp.float32)
  dw = lax.dot_general(x2, g2, (((0,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32)
  return dx.astype(x.dtype).reshape(x.shape), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def im2col(x: jax.Array, kernel_size: Sequence[int], strides: Sequence[int],
           padding: Sequence[tuple[int, int]],
           dilation: Sequence[int]) -> jax.Array:
  """Patches of a k×k window as channels, in (row, column, channel) order.

  Args:
    x: (B, H, W, C) input.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)) zero padding.
    dilation: (dh, dw) kernel dilation.

  Returns:
    (B, h, w, kh * kw * C) with h = (H + top + bottom - dh (kh - 1) - 1)
    // sh + 1 (likewise w); channel block i * kw + j holds tap (i, j).
  """
  (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  b, hp, wp, c = xp.shape
  oh = (hp - dh * (kh - 1) - 1) // sh + 1
  ow = (wp - dw * (kw - 1) - 1) // sw + 1
  taps = [
      lax.slice(xp, (0, i * dh, j * dw, 0),
                (b, i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1, c),
                (1, sh, sw, 1))
      for i in range(kh) for j in range(kw)]
  return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


class Conv(nn.Module):
  """2-D NHWC convolution with `nn.Conv`'s parameters (see module doc).

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: 'VALID' or ((top, bottom), (left, right)).
    kernel_dilation: (dh, dw).
    use_bias: add a bias.
    kernel_init: kernel initializer.
    bias_init: bias initializer.
    dtype: compute dtype (None: float32); parameters stay `param_dtype`.
    param_dtype: dtype of the stored parameters.
    impl: 'auto' (1×1 as matmul; k×k as matmul in low precision, XLA conv
      in float32), 'lax' (XLA conv only, like `nn.Conv`) or 'dot' (every
      conv as a matmul).
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Any = 'VALID'
  kernel_dilation: Sequence[int] = (1, 1)
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the convolution.

    Args:
      x: (B, H, W, C_in) input.

    Returns:
      (B, h, w, features) in the compute dtype.
    """
    if self.impl not in IMPLS:
      raise ValueError(f'conv impl {self.impl!r} not in {IMPLS}')
    kh, kw = self.kernel_size
    kernel = self.param('kernel', self.kernel_init,
                        (kh, kw, x.shape[-1], self.features),
                        self.param_dtype)
    dtype = jnp.float32 if self.dtype is None else jnp.dtype(self.dtype)
    x = x.astype(dtype)
    kernel = kernel.astype(dtype)
    padding = (((0, 0), (0, 0)) if self.padding == 'VALID'
               else tuple(tuple(p) for p in self.padding))
    pointwise = (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0))
    as_matmul = (self.impl == 'dot' or
                 (self.impl == 'auto'
                  and (pointwise or dtype != jnp.float32)))
    if as_matmul:
      patches = im2col(x, (kh, kw), self.strides, padding,
                       self.kernel_dilation)
      y = matmul(patches, kernel.reshape(-1, self.features))
    else:
      y = lax.conv_general_dilated(
          x, kernel, tuple(self.strides), padding,
          rhs_dilation=tuple(self.kernel_dilation),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,),
                        self.param_dtype)
      y = y + bias.astype(dtype)
    return y
