"""Train-state containers: plain pytrees of arrays, nothing static.

Optimiser transformations are not stored here; each method's step closes over
them. That keeps the state a pure pytree that Orbax saves and restores and
that ``jit`` donates as a whole.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from one step to the next.

  Attributes:
    step: global step counter (int32 scalar).
    params: segmentation/classification network parameters.
    batch_stats: BatchNorm running statistics (may be an empty dict).
    opt_state: optimiser state of ``params``.
    disc_params: discriminator parameters keyed by name (``{}`` if none).
    disc_opt_state: optimiser state of ``disc_params`` (``{}`` if none).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any

  @classmethod
  def create(cls, *, params, batch_stats, tx, disc_params=None,
             disc_tx=None) -> "TrainState":
    disc_params = disc_params or {}
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats or {},
        opt_state=tx.init(params),
        disc_params=disc_params,
        disc_opt_state=disc_tx.init(disc_params) if disc_tx else {},
    )


@flax.struct.dataclass
class FrozenSourceTrainState(TrainState):
  """``TrainState`` plus a frozen source model (DAM / GAM).

  A subclass rather than a new ``TrainState`` field, so the other methods'
  pytrees and their existing checkpoints are unchanged.

  Attributes:
    source: ``{'params', 'batch_stats'}`` of the frozen source network; no
      optimiser sees it and steps read it under ``stop_gradient``.
  """
  source: Any = flax.struct.field(default_factory=dict)


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """Scalar bool: every floating leaf of ``tree`` is finite.

  Jitted: one compile per tree structure, instead of two eager ops (each
  compiled for its shape) per leaf at every checkpoint.
  """
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
