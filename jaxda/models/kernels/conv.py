"""`Conv`: `nn.Conv`'s parameters, run as matrix products where that is faster.

Same parameter tree as `flax.linen.Conv` ('kernel' (kh, kw, C_in, C_out),
'bias' (C_out,)), so checkpoints and weight importers do not care which
implementation ran. Why not `nn.Conv` everywhere (on XLA:CPU; timings in
benchmarks/NOTES.md):

* XLA:CPU runs a convolution's weight gradient as a convolution with an
  image-sized window, slower than the same contraction written as a matrix
  product, which XLA hands to its tuned dot library. A 1×1 conv *is* a
  matrix product (strided: of the strided slice), so `impl='auto'` always
  runs it as one.
* A stride-1 k×k conv is a sum over taps of shifted products. Multiplying
  the input once by all taps' kernels side by side and summing shifted
  slices of the result (`output_taps_conv`) makes it one large dot (in
  bfloat16 it runs on AMX; XLA:CPU's conv converts to float32). The shifted
  sum (`shifted_tap_sum`) has a hand-written transpose: each cotangent pixel
  lands in one channel block of dZ, a concatenation, instead of autodiff's
  sum of kh·kw padded copies.
* Elsewhere in float32 the im2col matmul (`patches_matmul`, which keeps
  only its input for the backward pass) beats XLA's conv for stride 1;
  strided float32 convs keep XLA's.

`choose_impl` holds the rule. All of the above is XLA:CPU's: on cuda,
rocm and tpu 'auto' runs XLA's own conv for every conv (nothing measured
there yet; the per-platform table is `kernels/platform.py`), chosen when
the step is lowered (`platform.per_platform`).

Products accumulate in float32 and return the compute dtype; their
gradients are computed the same way (cotangent cast to the compute dtype,
float32 accumulation), which is what makes the backward pass use AMX too.
Written by hand: Flax has no matmul-backed convolution.
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from jaxda.models.kernels import platform as platform_lib
from jaxda.models.kernels import remat
from jaxda.models.kernels import winograd
from jaxda.models.kernels.matmul import matmul
from jaxda.models.kernels.matmul import matmul_f32

IMPLS = ('auto', 'lax', 'dot', 'taps', 'winograd')

# Float32 convs narrower than this keep XLA's conv under 'auto': the CPU
# test networks (8-32 channels) gain little from the matmul forms and their
# compile time doubled with them.
MIN_MATMUL_CHANNELS = 64


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def patches_matmul(x: jax.Array, kernel: jax.Array,
                   geometry: tuple) -> jax.Array:
  """`im2col(x, *geometry) @ kernel` that keeps only `x` for the backward.

  A plain `matmul(im2col(x), ...)` keeps the kh·kw-times larger patches
  alive from the forward to the backward pass (the step's memory grows by
  that much). Here the
  backward pass rebuilds the patches from `x` (a copy, no FLOPs) and sends
  the patch gradient back through im2col's transpose.

  Args:
    x: (B, H, W, C_in) input.
    kernel: (kh, kw, C_in, C_out), same dtype as x.
    geometry: (kernel_size, strides, padding, dilation) as `im2col` takes
      them, as hashable tuples.

  Returns:
    (B, h, w, C_out) in x.dtype (float32 accumulation).
  """
  patches = im2col(x, *geometry)
  return matmul(patches, kernel.reshape(-1, kernel.shape[-1]))


def _patches_matmul_fwd(x, kernel, geometry):
  return patches_matmul(x, kernel, geometry), (x, kernel)


def _patches_matmul_bwd(geometry, res, g):
  x, kernel = res
  # Read x through a data dependency on g: otherwise XLA merges this im2col
  # with the forward one (CSE) and keeps the patches alive in between.
  x = remat.after(x, g)
  patches, im2col_vjp = jax.vjp(lambda v: im2col(v, *geometry), x)
  w2 = kernel.reshape(-1, kernel.shape[-1])
  _, matmul_vjp = jax.vjp(matmul, patches, w2)
  patches_grad, w_grad = matmul_vjp(g)
  (x_grad,) = im2col_vjp(patches_grad)
  # Released with the weight gradient, so that its product (which reads the
  # patches) is not deferred to the end of the backward pass.
  x_grad = remat.after(x_grad, w_grad)
  return x_grad, w_grad.reshape(kernel.shape)


patches_matmul.defvjp(_patches_matmul_fwd, _patches_matmul_bwd)


def output_taps_conv(x: jax.Array, kernel: jax.Array,
                     padding: Sequence[tuple[int, int]],
                     dilation: Sequence[int]) -> jax.Array:
  """Stride-1 convolution as one matmul into per-tap outputs, then shifts.

  A convolution is a sum over kernel taps of shifted products,
  y[i, j] = sum_(a, c) (x @ W[a, c])[i + a dh - top, j + c dw - left]
  (zero outside the image). Multiplying x once by all taps' kernels side by
  side, Z = x @ [W[0, 0] | W[0, 1] | ...] with (kh kw C_out) columns, and
  summing shifted slices of Z gives the same output with a buffer of
  kh kw C_out channels instead of im2col's kh kw C_in (for DeepLab's ASPP,
  2048 -> 19 channels: 171 instead of 18,432 per pixel), and one dot with
  K = C_in instead of a K = 9 C_in dot with N = 19. The gradient needs only
  x (and the small dZ).

  Args:
    x: (B, H, W, C_in) input.
    kernel: (kh, kw, C_in, C_out), same dtype as x.
    padding: ((top, bottom), (left, right)) zero padding.
    dilation: (dh, dw).

  Returns:
    (B, h, w, C_out) float32, h = H + top + bottom - dh (kh - 1) (likewise w).
  """
  kh, kw, cin, cout = kernel.shape
  # (C_in, kh * kw * C_out), column block a * kw + c holds tap (a, c).
  w_all = kernel.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)
  z = matmul_f32(x, w_all)
  return shifted_tap_sum(z, (kh, kw), tuple(map(tuple, padding)),
                         tuple(dilation))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def shifted_tap_sum(z: jax.Array, kernel_size: tuple, padding: tuple,
                    dilation: tuple) -> jax.Array:
  """y[i, j] = sum over taps (a, c) of Z_(a, c)[i + a dh - top, j + c dw - left].

  The second half of `output_taps_conv` (zero outside the image). Its
  transpose puts each cotangent pixel, shifted, into exactly one channel
  block of dZ: a concatenation of shifted slices. Autodiff's transpose of
  the sum is instead a sum of kh kw zero-padded copies of the cotangent,
  which XLA:CPU evaluates for every element of dZ, with the cotangent's
  producer (ReLU mask, BatchNorm scale, ...) inlined kh kw times.

  Args:
    z: (B, H, W, kh * kw * C_out) per-tap products; channel block a * kw + c
      holds tap (a, c).
    kernel_size: (kh, kw).
    padding: ((top, bottom), (left, right)).
    dilation: (dh, dw).

  Returns:
    (B, h, w, C_out), h = H + top + bottom - dh (kh - 1) (likewise w).
  """
  (kh, kw), ((top, bottom), (left, right)), (dh, dw) = (
      kernel_size, padding, dilation)
  cout = z.shape[-1] // (kh * kw)
  z = jnp.pad(z, ((0, 0), (top, bottom), (left, right), (0, 0)))
  b, hp, wp, _ = z.shape
  oh, ow = hp - dh * (kh - 1), wp - dw * (kw - 1)
  taps = [lax.slice(z, (0, a * dh, c * dw, (a * kw + c) * cout),
                    (b, a * dh + oh, c * dw + ow, (a * kw + c + 1) * cout))
          for a in range(kh) for c in range(kw)]
  return sum(taps[1:], taps[0])


def _shifted_tap_sum_fwd(z, kernel_size, padding, dilation):
  # Linear: the backward pass needs only z's shape, which g's shape and the
  # geometry determine.
  return shifted_tap_sum(z, kernel_size, padding, dilation), None


def _shifted_tap_sum_bwd(kernel_size, padding, dilation, _, g):
  (kh, kw), ((top, bottom), (left, right)), (dh, dw) = (
      kernel_size, padding, dilation)
  b, oh, ow, _ = g.shape
  h = oh + dh * (kh - 1) - top - bottom
  w = ow + dw * (kw - 1) - left - right
  # dZ_(a, c)[p, q] = g[p + top - a dh, q + left - c dw] (zero outside g).
  # Pad g so that every tap's window is an in-bounds slice; negative pads
  # crop rows no tap reads.
  pt, pl = dh * (kh - 1) - top, dw * (kw - 1) - left
  pb, pr = h + top - oh, w + left - ow
  gp = lax.pad(g, jnp.zeros((), g.dtype),
               ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  # In gp, g[r] sits at r + pt, so tap (a, c) starts at row top - a dh + pt.
  blocks = [lax.slice(gp, (0, top - a * dh + pt, left - c * dw + pl, 0),
                      (b, top - a * dh + pt + h, left - c * dw + pl + w,
                       g.shape[-1]))
            for a in range(kh) for c in range(kw)]
  return (jnp.concatenate(blocks, axis=-1),)


shifted_tap_sum.defvjp(_shifted_tap_sum_fwd, _shifted_tap_sum_bwd)


def space_to_depth_conv(x: jax.Array, kernel: jax.Array,
                        strides: Sequence[int],
                        padding: Sequence[tuple[int, int]]) -> jax.Array:
  """A strided conv as a stride-1 `output_taps_conv` on space-to-depth input.

  With stride s and kernel size k divisible by s, window (i, j) reads padded
  rows s i + a = s (i + a // s) + a % s: the conv is a (k/s)×(k/s) stride-1
  conv over the input cut into s×s blocks (s² C_in channels). For the FC
  discriminator's 4×4/2 convs that is a 2×2 conv with 4 C_in channels, one
  AMX-sized dot per layer in bfloat16 instead of an im2col of 16 C_in.

  Args:
    x: (B, H, W, C_in) input.
    kernel: (kh, kw, C_in, C_out), kh % sh == kw % sw == 0, x's dtype.
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)) zero padding.

  Returns:
    (B, h, w, C_out) float32, h = (H + top + bottom - kh) // sh + 1.
  """
  kh, kw, cin, cout = kernel.shape
  sh, sw = strides
  (top, bottom), (left, right) = padding
  b, h, w, _ = x.shape
  oh = (h + top + bottom - kh) // sh + 1
  ow = (w + left + right - kw) // sw + 1
  # Rows (columns) the windows read, rounded up to whole blocks; rows past
  # the last window's reach are cropped, missing ones are zeros.
  hp, wp = (oh - 1 + kh // sh) * sh, (ow - 1 + kw // sw) * sw
  xp = jnp.pad(x, ((0, 0), (top, max(0, hp - h - top)),
                   (left, max(0, wp - w - left)), (0, 0)))[:, :hp, :wp]
  # (B, hp/sh, wp/sw, (r, q, C_in)) with (r, q) the offset in the block.
  blocks = xp.reshape(b, hp // sh, sh, wp // sw, sw, cin)
  blocks = blocks.transpose(0, 1, 3, 2, 4, 5).reshape(
      b, hp // sh, wp // sw, sh * sw * cin)
  # kernel[a' sh + r, c' sw + q] -> (a', c', (r, q, C_in), C_out).
  k2 = kernel.reshape(kh // sh, sh, kw // sw, sw, cin, cout)
  k2 = k2.transpose(0, 2, 1, 3, 4, 5).reshape(
      kh // sh, kw // sw, sh * sw * cin, cout)
  return output_taps_conv(blocks, k2, ((0, 0), (0, 0)), (1, 1))


def choose_impl(impl: str, kernel_size: Sequence[int], strides: Sequence[int],
                padding: Sequence[tuple[int, int]], c_in: int, c_out: int,
                dtype: Any, platform: str | None = 'cpu') -> str:
  """The way a conv runs on `platform`: 'matmul', 'taps', 'space_to_depth',
  'winograd', 'patches' or 'lax'.

  'auto' follows `platform_lib.CONV_AUTO`: the CPU rules below on 'cpu',
  'lax' on cuda, rocm and tpu (unmeasured there). Explicit impls run as
  asked on every platform.

  Float32 stride-1 3×3s with C_in >= MIN_MATMUL_CHANNELS that are not
  'taps' (below) take 'winograd' (`winograd.winograd_conv3x3`: 2.25× fewer
  FLOPs); 'patches' below is what other float32 stride-1 k×k convs take.

  'auto' (the fastest measured per case on XLA:CPU; benchmarks/NOTES.md):

  * 1×1 (any stride): 'matmul', the strided input times the kernel.
  * stride-1 k×k in low precision: 'taps' (`output_taps_conv`: one large
    bfloat16 dot on AMX, no im2col copy).
  * stride-1 k×k in float32 with C_in >= MIN_MATMUL_CHANNELS: 'taps'
    where Z is no larger than the input (kh kw C_out <= C_in: ASPP's
    2048 -> 19), else 'patches'; narrower ones 'lax'. (A float32 taps sum
    is a cheap elementwise producer that XLA:CPU duplicates into the
    backward pass's fusions, keeping each bottleneck's Z, 9x its output,
    alive from the forward pass; a bfloat16 output is materialised by its
    cast, and nothing is duplicated.)
  * strided k×k (stem, discriminators): in low precision 'space_to_depth'
    where the stride divides the kernel (the discriminators' 4×4/2), else
    'patches' (the 7×7/2 stem); 'lax' in float32.

  Args:
    impl: 'auto', 'lax', 'dot' (im2col matmul for every conv) or 'taps'.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).
    c_in: input channels.
    c_out: output channels.
    dtype: compute dtype.
    platform: lowering platform ('cpu', 'cuda', 'rocm', 'tpu'; None: one
      the rule table does not list).

  Returns:
    One of 'matmul', 'taps', 'space_to_depth', 'patches', 'lax'.
  """
  if impl not in IMPLS:
    raise ValueError(f'conv impl {impl!r} not in {IMPLS}')
  platform_lib.check_conv_impl(impl, platform)
  if impl == 'auto' and platform_lib.conv_auto_rule(platform) == 'lax':
    return 'lax'
  kh, kw = kernel_size
  unit_stride = tuple(strides) == (1, 1)
  pointwise = (kh, kw) == (1, 1) and tuple(padding) == ((0, 0), (0, 0))
  if impl == 'taps' and not unit_stride:
    raise ValueError(f"conv impl 'taps' needs stride 1, got {tuple(strides)}")
  if impl == 'lax':
    return 'lax'
  if pointwise and impl in ('auto', 'dot'):
    return 'matmul'
  if impl == 'dot':
    return 'patches'
  if impl == 'taps':
    return 'taps'
  winograd_shape = (kh, kw) == (3, 3) and unit_stride
  if impl == 'winograd' and winograd_shape:
    return 'winograd'
  low_precision = jnp.dtype(dtype) != jnp.float32
  if low_precision:
    if unit_stride:
      return 'taps'
    divisible = kh % strides[0] == 0 and kw % strides[1] == 0
    return 'space_to_depth' if divisible else 'patches'
  if not unit_stride or c_in < MIN_MATMUL_CHANNELS:
    return 'lax'
  if kh * kw * c_out <= c_in:
    return 'taps'
  return 'winograd' if winograd_shape else 'patches'


def run_impl(impl: str, geometry: tuple, x: jax.Array,
             kernel: jax.Array) -> jax.Array:
  """The conv by `impl` (a `choose_impl` result), no bias, x.dtype out.

  Args:
    impl: 'matmul', 'taps', 'space_to_depth', 'winograd', 'patches' or
      'lax'.
    geometry: (kernel_size, strides, padding, dilation), hashable tuples.
    x: (B, H, W, C_in) input in the compute dtype.
    kernel: (kh, kw, C_in, C_out), x's dtype.
  """
  _, strides, padding, dilation = geometry
  if impl == 'matmul':
    # The (strided) input itself is the patch matrix: nothing to rebuild.
    return matmul(im2col(x, *geometry), kernel.reshape(-1, kernel.shape[-1]))
  if impl == 'taps':
    return output_taps_conv(x, kernel, padding, dilation).astype(x.dtype)
  if impl == 'space_to_depth':
    return space_to_depth_conv(x, kernel, strides, padding).astype(x.dtype)
  if impl == 'winograd':
    return winograd.winograd_conv3x3(x, kernel, padding, dilation)
  if impl == 'patches':
    return patches_matmul(x, kernel, geometry)
  return lax.conv_general_dilated(
      x, kernel, strides, padding, rhs_dilation=dilation,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


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
    impl: 'auto' (the measured fastest per conv on the platform the step
      is lowered for, see `choose_impl`: CPU rules on cpu, 'lax' on
      cuda/rocm/tpu), 'lax' (XLA's conv only, like `nn.Conv`), 'dot'
      (every conv as an im2col matmul), 'taps' (stride-1 convs as
      `output_taps_conv`) or 'winograd' (3×3 stride-1 convs by Winograd).
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
    """Applies the convolution (the impl per lowering platform).

    Args:
      x: (B, H, W, C_in) input.

    Returns:
      (B, h, w, features) in the compute dtype.
    """
    kh, kw = self.kernel_size
    kernel = self.param('kernel', self.kernel_init,
                        (kh, kw, x.shape[-1], self.features),
                        self.param_dtype)
    dtype = jnp.float32 if self.dtype is None else jnp.dtype(self.dtype)
    x = x.astype(dtype)
    kernel = kernel.astype(dtype)
    padding = (((0, 0), (0, 0)) if self.padding == 'VALID'
               else tuple(tuple(p) for p in self.padding))
    geometry = ((kh, kw), tuple(self.strides), padding,
                tuple(self.kernel_dilation))
    choose = functools.partial(choose_impl, self.impl, (kh, kw),
                               self.strides, padding, x.shape[-1],
                               self.features, dtype)
    # One function per distinct impl; None: platforms the table omits.
    impls = {p: choose(platform=p) for p in (*platform_lib.PLATFORMS, None)}
    run = {i: functools.partial(run_impl, i, geometry)
           for i in set(impls.values())}
    default = run[impls.pop(None)]
    y = platform_lib.per_platform({p: run[i] for p, i in impls.items()},
                                  default, x, kernel)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,),
                        self.param_dtype)
      y = y + bias.astype(dtype)
    return y
