"""DAM / GAM activation matching as pure JAX functions (METHODS.md §10).

Huang, Huang & Krähenbühl (ECCV 2018) adapt a *target* copy F_t of a frozen
source network F_s by matching the distributions of activations at several
layers, plus a weight-drift penalty:

    min_θt  Σ_i w_i · GAN_i(Â_i^t, A_i^s)  +  λ ‖θ_t − θ_s‖²

**Gaussian i.i.d. matching** maps each channel k of a target activation to
the source model's per-channel statistics before anything else sees it:

    Â_k = (A_k − μ_t,k) / σ_t,k · σ_s,k + μ_s,k.

This is AdaBN with the source affine kept: a BatchNorm layer normalising with
target statistics and re-scaling with (σ_s, μ_s) computes exactly Â, so
inserting it after a layer is "recompute BN statistics on the target"
(Li et al. 2016) for networks whose matched layer is not followed by BN.

Everything here works on *pytrees* of activations: a dict {layer: array}
for segmentation ((B, H, W, C) arrays) or for classification ((B, C)
arrays, e.g. LeNet's fc3 / fc4); statistics are per last-axis channel over
every other axis. Statistics are ``ChannelStats(mean, var)`` leaves of shape
(C,). No Flax, no config, no I/O.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# Added to both variances before the square roots: a dead (constant) channel
# then maps to A − μ_t + μ_s instead of 0/0. Same value as BatchNorm's.
EPSILON = 1e-5

DRIFT_REDUCTIONS = ("sum", "mean_per_variable")


class ChannelStats(NamedTuple):
  """Per-channel first and second central moments of one activation.

  Attributes:
    mean: (C,) float32 per-channel mean.
    var: (C,) float32 per-channel (biased) variance.
  """
  mean: jax.Array
  var: jax.Array


class Moments(NamedTuple):
  """Running sums from which ``ChannelStats`` over many batches follow.

  Attributes:
    count: () float32 number of positions summed (examples × pixels).
    sum: (C,) float32 Σ x.
    sum_sq: (C,) float32 Σ x².
  """
  count: jax.Array
  sum: jax.Array
  sum_sq: jax.Array


def _is_stats(x) -> bool:
  return isinstance(x, (ChannelStats, Moments))


def _channel_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1))


def _example_weights(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """(B, 1, ..., 1) float32 weights broadcastable to ``x`` (1 = counted)."""
  if mask is None:
    return jnp.ones((x.shape[0],) + (1,) * (x.ndim - 1), jnp.float32)
  return jnp.reshape(mask.astype(jnp.float32),
                     (x.shape[0],) + (1,) * (x.ndim - 1))


def channel_stats(activations: Any, mask: jax.Array | None = None) -> Any:
  """Per-channel mean and variance of every activation in a pytree.

  Args:
    activations: pytree of (B, ..., C) arrays.
    mask: optional (B,) bool/float; examples with 0 are left out (padding of
      an evaluation batch).

  Returns:
    The pytree with a ``ChannelStats`` of (C,) float32 arrays per leaf
    (biased variance, as BatchNorm's batch statistics).
  """
  return jax.tree.map(
      lambda x: stats_from_moments(moments(x, mask)), activations)


def moments(x: jax.Array, mask: jax.Array | None = None) -> Moments:
  """Sums of one (B, ..., C) array over every axis but the last.

  Args:
    x: (B, ..., C) activations.
    mask: optional (B,) example weights (0 drops an example).

  Returns:
    ``Moments`` with (C,) sums; add two of them with ``add_moments``.
  """
  x = x.astype(jnp.float32)
  w = _example_weights(x, mask)
  axes = _channel_axes(x)
  per_example = x[0].size // x.shape[-1] if x.ndim > 1 else 1
  return Moments(count=jnp.sum(w) * per_example,
                 sum=jnp.sum(x * w, axis=axes),
                 sum_sq=jnp.sum(jnp.square(x) * w, axis=axes))


def tree_moments(activations: Any, mask: jax.Array | None = None) -> Any:
  """``moments`` of every leaf of a pytree of (B, ..., C) arrays."""
  return jax.tree.map(lambda x: moments(x, mask), activations)


def add_moments(a: Any, b: Any) -> Any:
  """Adds two pytrees of ``Moments`` (accumulating over batches)."""
  return jax.tree.map(jnp.add, a, b)


def stats_from_moments(m: Any) -> Any:
  """``Moments`` -> ``ChannelStats`` (leaf-wise over a pytree).

  The variance is E[x²] − E[x]², clipped at 0 against rounding.
  """
  def one(m):
    n = jnp.maximum(m.count, 1.0)
    mean = m.sum / n
    return ChannelStats(mean=mean,
                        var=jnp.maximum(m.sum_sq / n - jnp.square(mean), 0.0))
  return jax.tree.map(one, m, is_leaf=_is_stats)


def gaussian_match(activations: Any, target_stats: Any, source_stats: Any,
                   eps: float = EPSILON) -> Any:
  """Gaussian i.i.d. matching of target activations to source statistics.

  Per leaf and channel k:
  ``(x − μ_t,k) / sqrt(var_t,k + eps) · sqrt(var_s,k + eps) + μ_s,k``.
  When ``target_stats`` are the statistics of ``activations`` themselves
  (training, like BatchNorm's batch statistics) the result has exactly the
  source mean and, up to ``eps``, the source standard deviation; gradients
  flow through the batch statistics as through BatchNorm.

  Args:
    activations: pytree of (B, ..., C) arrays.
    target_stats: same structure with a ``ChannelStats`` of (C,) per leaf.
    source_stats: same structure with a ``ChannelStats`` of (C,) per leaf.
    eps: added to both variances.

  Returns:
    Pytree of arrays shaped and typed like ``activations``.
  """
  def one(x, t, s):
    scale = jnp.sqrt(s.var + eps) * jax.lax.rsqrt(t.var + eps)
    y = (x.astype(jnp.float32) - t.mean) * scale + s.mean
    return y.astype(x.dtype)
  return jax.tree.map(one, activations, target_stats, source_stats)


def ema_stats(running: Any, batch: Any, momentum: float) -> Any:
  """BatchNorm-style running average ``m · running + (1 − m) · batch``.

  Args:
    running: pytree of ``ChannelStats``.
    batch: same structure.
    momentum: weight of the old value (Flax BatchNorm convention; 0.9 is
      PyTorch's momentum 0.1).

  Returns:
    The updated pytree.
  """
  return jax.tree.map(lambda r, b: momentum * r + (1.0 - momentum) * b,
                      running, batch)


def stats_gap(target_stats: Any, source_stats: Any,
              eps: float = EPSILON) -> Any:
  """How far target statistics are from source ones, in source std units.

  Per leaf: ``mean_gap = mean_k |μ_t,k − μ_s,k| / σ_s,k`` and
  ``std_gap = mean_k |σ_t,k − σ_s,k| / σ_s,k`` with σ = sqrt(var + eps).
  0 means matched first and second moments; normalising by σ_s makes layers
  of different scales comparable.

  Args:
    target_stats: pytree of ``ChannelStats``.
    source_stats: same structure.
    eps: added to the variances.

  Returns:
    Pytree with a dict ``{'mean_gap': (), 'std_gap': ()}`` per leaf.
  """
  def one(t, s):
    sd_s = jnp.sqrt(s.var + eps)
    sd_t = jnp.sqrt(t.var + eps)
    return {"mean_gap": jnp.mean(jnp.abs(t.mean - s.mean) / sd_s),
            "std_gap": jnp.mean(jnp.abs(sd_t - sd_s) / sd_s)}
  return jax.tree.map(one, target_stats, source_stats, is_leaf=_is_stats)


def weight_drift(target_params: Any, source_params: Any, *,
                 reduction: str = "sum") -> jax.Array:
  """Weight-drift penalty ‖θ_t − θ_s‖² (without its coefficient λ).

  The source parameters are under ``stop_gradient``: the gradient is
  2 (θ_t − θ_s) for ``'sum'`` and only reaches the target tree.

  Args:
    target_params: pytree of arrays.
    source_params: same structure and shapes.
    reduction: ``'sum'`` (the paper: Σ over every weight) or
      ``'mean_per_variable'`` (the released DAM code: Σ over variables of
      the mean squared difference within each variable).

  Returns:
    Scalar float32.
  """
  if reduction not in DRIFT_REDUCTIONS:
    raise ValueError(
        f"reduction must be one of {DRIFT_REDUCTIONS}, got {reduction!r}")
  source_params = jax.lax.stop_gradient(source_params)
  reduce = jnp.sum if reduction == "sum" else jnp.mean
  terms = jax.tree.map(
      lambda t, s: reduce(jnp.square(t.astype(jnp.float32)
                                     - s.astype(jnp.float32))),
      target_params, source_params)
  return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))
