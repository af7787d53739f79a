"""Matrix products with float32 accumulation and backward passes on the fast path.

The building block of every matmul-backed conv (`conv`, `winograd`): the
forward product and both gradient products run in the inputs' dtype with
float32 accumulation, and on XLA:CPU the low-precision weight gradient
takes the layout that its tuned dot library (YNNPACK) accepts
(benchmarks/NOTES.md). Platforms: the products run everywhere the conv
forms run (CPU under 'auto', any platform for an explicit `conv_impl`); the
layout-pinned transpose of `weight_gradient` is cpu only
(`lax.platform_dependent`; table: `kernels/platform.py`). Written by hand:
no library exposes these rules.
"""

from jax import lax
from jax.experimental import layout
import jax
import jax.numpy as jnp


@jax.custom_vjp
def matmul_f32(x: jax.Array, w: jax.Array) -> jax.Array:
  """(..., K) @ (K, N) -> (..., N) in float32 (float32 accumulation).

  Its gradients are computed in the inputs' dtype with float32
  accumulation: with bfloat16 inputs all three products run on the same
  bfloat16 (AMX) path.

  Args:
    x: (..., K) activations (float32 or bfloat16).
    w: (K, N) weights, same dtype as x.

  Returns:
    (..., N) float32.
  """
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _matmul_fwd(x, w):
  return matmul_f32(x, w), (x, w)


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
  dw = weight_gradient(x2, g2)
  return dx.astype(x.dtype).reshape(x.shape), dw.astype(w.dtype)


matmul_f32.defvjp(_matmul_fwd, _matmul_bwd)


def _contract_rows(x: jax.Array, g: jax.Array) -> jax.Array:
  return lax.dot_general(x, g, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _contract_rows_transposed(x: jax.Array, g: jax.Array) -> jax.Array:
  # XLA:CPU hands a dot to its AMX-capable library (YNNPACK) only when the
  # left operand contracts over its minor axis; `x^T g` contracts over
  # x's major one and falls back to a slower float32 Eigen product. A
  # row-major x^T, pinned by a layout constraint so that XLA cannot fold the
  # transpose back into the dot, costs one transpose and keeps the fast path.
  xt = layout.with_layout_constraint(x.T, layout.Layout((0, 1)))
  return jnp.dot(xt, g, preferred_element_type=jnp.float32)


def weight_gradient(x: jax.Array, g: jax.Array) -> jax.Array:
  """x^T g: the weight gradient of `x @ w`, float32 accumulation.

  Args:
    x: (M, K) inputs (M = every pixel of the batch).
    g: (M, N) output cotangents, x's dtype.

  Returns:
    (K, N) float32.
  """
  if x.dtype == jnp.float32:
    return _contract_rows(x, g)
  # The transposed form only pays on XLA:CPU (measured there).
  return lax.platform_dependent(x, g, cpu=_contract_rows_transposed,
                                default=_contract_rows)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """(..., K) @ (K, N) -> (..., N), float32 accumulation, x's dtype out.

  Args:
    x: (..., K) activations (float32 or bfloat16).
    w: (K, N) weights, same dtype as x.

  Returns:
    (..., N) in x.dtype.
  """
  # The cast's transpose hands `matmul_f32` a float32 cotangent that holds
  # x.dtype values exactly, so the backward products are unchanged.
  return matmul_f32(x, w).astype(x.dtype)
