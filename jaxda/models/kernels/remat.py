"""Rematerialisation whose recomputation waits for the output cotangent.

`nn.remat` / `jax.checkpoint` drop a block's activations after the forward
pass and recompute them in the backward pass from the saved block input. The
recomputation depends only on that saved input, so nothing stops XLA from
scheduling it early: XLA:CPU's scheduler runs every block's recomputation at
the start of the backward pass, all blocks' activations are alive together
again, and the remat step can use more memory than the plain one
(benchmarks/NOTES.md).

`gated_remat` makes the order explicit: in the backward pass the saved input
is read through a data dependency on the incoming cotangent (`after`), so a
block can only be recomputed once the cotangent of its output exists, i.e.
after every later block's backward pass; and the block's input cotangent is
released only together with its parameter gradients, so the weight-gradient
products cannot be deferred to the end either. One block's activations are
alive at a time.

Platforms: all (the order is a data dependency, valid on any backend);
its memory effect was measured on XLA:CPU only (`kernels/platform.py`).
Written by hand: neither Flax nor JAX offers a remat tied to the cotangent.
A block may update its BatchNorm statistics (train_bn): the forward pass's
update flows out as usual, and the recomputation, which normalises with the
same batch statistics, discards its own.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def after(x: Any, *dependencies: Any) -> Any:
  """`x` unchanged, as a value that exists only once `dependencies` do.

  `lax.optimization_barrier` would say this, but XLA:CPU removes barriers
  before scheduling (they only block CSE there), so the order is forced by
  data instead: one element of every dependency leaf, times zero, is added
  to every leaf of `x`. Float `s * 0` is not folded by XLA (it is NaN for an
  infinite `s`), so the dependency survives optimisation; for finite
  dependencies the values are exactly `x` (a non-finite gradient is
  non-finite whatever this adds). Cost: one elementwise pass over `x`.

  Args:
    x: pytree of arrays.
    *dependencies: pytrees of arrays that must be computed first.

  Returns:
    `x`, element for element.
  """
  leaves = jax.tree.leaves(dependencies)
  token = sum(jnp.ravel(d)[0].astype(jnp.float32) for d in leaves) * 0.0
  return jax.tree.map(lambda a: a + token.astype(a.dtype), x)


def gated_remat(block: nn.Module, x: jax.Array, *args: Any,
                rngs: dict[str, jax.Array] | None = None) -> jax.Array:
  """`block(x, *args)`, rematerialised once the output cotangent arrives.

  Same value and gradients as `block(x, *args)` (with respect to `x` and the
  block's 'params'); only the block input is kept for the backward pass.

  Args:
    block: an unbound-to-call Flax module (created inside the caller's
      compact method, as for a plain call); it may update 'batch_stats'
      (not together with ``rngs``).
    x: the block input, the only differentiated argument.
    *args: hashable static arguments (e.g. Python bools) passed through.
    rngs: keys of the block's random streams (e.g. DropPath's 'dropout');
      the forward and the recomputation both run on them, so they draw the
      same masks.

  Returns:
    The block output.
  """
  # The module re-applied in the backward pass: same attributes, no parent,
  # so that `apply` can run it on a snapshot of the variables.
  standalone = block.clone(parent=None, name=None)

  def call(module, inputs):
    if rngs:
      return standalone.apply(module.variables, inputs, *args, rngs=rngs)
    return module(inputs, *args)

  def forward(module, inputs):
    return call(module, inputs), (inputs, module.variables)

  def backward(residuals, cotangent):
    inputs, variables = residuals
    # The recomputation reads `inputs` through a data dependency on the
    # cotangent, so it cannot start before the cotangent is computed.
    inputs = after(inputs, cotangent)
    # Under train_bn the block updates its statistics again: kept local.
    mutable = ['batch_stats'] if 'batch_stats' in variables else False

    def apply(params, inputs):
      out = standalone.apply({**variables, 'params': params}, inputs, *args,
                             rngs=rngs, mutable=mutable)
      return out[0] if mutable else out

    _, vjp = jax.vjp(apply, variables['params'], inputs)
    params_grad, inputs_grad = vjp(cotangent)
    # And the input cotangent (what the previous block waits for) is only
    # released with the parameter gradients: otherwise the scheduler may
    # defer the weight-gradient products to the end of the backward pass,
    # keeping every block's recomputed activations alive until then.
    inputs_grad = after(inputs_grad, params_grad)
    return {'params': params_grad}, inputs_grad

  return nn.custom_vjp(call, forward_fn=forward, backward_fn=backward)(
      block, x)
