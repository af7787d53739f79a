"""A fusion boundary for XLA:CPU: one array computed once, then read.

A ResNet's identity shortcuts make a long elementwise chain when BatchNorm
is frozen (an affine map): block n's output is
``relu(a_n * conv3_n + b_n + out_{n-1})``. XLA fuses cheap elementwise
producers into every consumer, duplicating them, so each block's output
fusion (and, in the backward pass, each ReLU-mask fusion) recomputes the
chain from every earlier block's conv output: quadratic work in the depth
(20 blocks of layer3 become one fusion with 120 operands; time it costs:
benchmarks/NOTES.md).

`lax.optimization_barrier` would say "materialise this", but XLA:CPU
removes barriers before fusion. A `lax.cond` whose branches both return
the operand is a real boundary: XLA does not fuse across a conditional, so
the operand is materialised once and every reader loads it.

Platforms: cpu only (`lax.platform_dependent`); the identity on cuda, rocm
and tpu (table: `kernels/platform.py`). Written by hand: neither JAX nor
XLA exposes a fusion-boundary op.
"""

import jax
from jax import lax


def _cond_boundary(x: jax.Array, key: jax.Array) -> jax.Array:
  # Both branches return x, so the value never depends on the predicate
  # (it is False only for a NaN key, and then the other branch returns x
  # too). The predicate is read at run time, so XLA cannot fold the
  # conditional away.
  pred = key == key
  return lax.cond(pred, lambda v: v, lambda v: v * 1, x)


def fusion_boundary(x: jax.Array, key: jax.Array) -> jax.Array:
  """``x`` unchanged, materialised: its producers are not fused into readers.

  Applied on the CPU backend only (measured there); elsewhere the identity:
  a conditional on GPU may read its predicate on the host.

  Args:
    x: any array (a block output).
    key: a scalar computed before ``x`` (e.g. one element of the block's
      input); only its NaN-ness is read. Taking it from ``x`` itself would
      make the predicate recompute ``x``'s producers for one element.

  Returns:
    ``x`` (same values, dtype and shape); gradients pass through unchanged.
  """
  key = lax.stop_gradient(key)
  return lax.platform_dependent(x, key, cpu=_cond_boundary,
                                default=lambda v, _: v)
