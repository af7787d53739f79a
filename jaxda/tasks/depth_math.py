"""Depth as a dense main task: loss and the standard metrics (pure math).

Ground truth marks invalid pixels (sky, beyond the sensor range) with depth
<= 0; they contribute to nothing. The network predicts log-depth; the loss
is the L1 distance of log-depths (scale-aware, robust to the long tail of
far pixels). Metrics are the usual monocular-depth set (Eigen et al. 2014):

  abs_rel  = mean |d - d*| / d*          sq_rel = mean (d - d*)^2 / d*
  rmse     = sqrt(mean (d - d*)^2)       rmse_log = sqrt(mean (ln d - ln d*)^2)
  delta_k  = fraction with max(d / d*, d* / d) < 1.25^k, k = 1, 2, 3

averaged over every valid pixel of the evaluation set (pixel-weighted, not
per-image): ``metric_sums`` runs on device per batch, the host adds the
sums and ``metrics_from_sums`` divides.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DELTA_BASE = 1.25
SUM_KEYS = ("count", "abs_rel", "sq_rel", "sq_err", "sq_log_err", "delta1",
            "delta2", "delta3")


def valid_depth(depth: jax.Array) -> jax.Array:
  """Boolean mask of pixels with ground truth (depth > 0), same shape."""
  return depth > 0


def log_depth_l1_loss(pred_log_depth: jax.Array, depth: jax.Array) -> jax.Array:
  """Mean |pred - ln d*| over valid pixels.

  Args:
    pred_log_depth: (B, H, W) predicted natural-log depth.
    depth: (B, H, W) ground-truth depth; <= 0 marks invalid pixels.

  Returns:
    Scalar float32; 0 when no pixel is valid.
  """
  if pred_log_depth.shape != depth.shape:
    raise ValueError(f"prediction {pred_log_depth.shape} and depth"
                     f" {depth.shape} differ in shape")
  valid = valid_depth(depth)
  target = jnp.log(jnp.where(valid, depth, 1.0))
  err = jnp.where(valid, jnp.abs(pred_log_depth.astype(jnp.float32) - target),
                  0.0)
  return jnp.sum(err) / jnp.maximum(jnp.sum(valid), 1)


def predicted_depth(pred_log_depth: jax.Array, *, min_depth: float,
                    max_depth: float) -> jax.Array:
  """``exp`` of the log-depth, clipped to [min_depth, max_depth] (eval)."""
  return jnp.clip(jnp.exp(pred_log_depth.astype(jnp.float32)), min_depth,
                  max_depth)


def metric_sums(pred_depth: jax.Array,
                depth: jax.Array) -> dict[str, jax.Array]:
  """Per-batch sums behind every metric (add over batches, then divide).

  Args:
    pred_depth: (B, H, W) predicted depth, > 0.
    depth: (B, H, W) ground-truth depth; <= 0 marks invalid pixels.

  Returns:
    ``{key: float32 scalar}`` for ``SUM_KEYS``; ``count`` is the number of
    valid pixels.
  """
  valid = valid_depth(depth)
  gt = jnp.where(valid, depth, 1.0).astype(jnp.float32)
  pred = jnp.where(valid, pred_depth, 1.0).astype(jnp.float32)
  diff = pred - gt
  ratio = jnp.maximum(pred / gt, gt / pred)
  log_diff = jnp.log(pred) - jnp.log(gt)
  per_pixel = {
      "count": jnp.ones_like(gt),
      "abs_rel": jnp.abs(diff) / gt,
      "sq_rel": diff**2 / gt,
      "sq_err": diff**2,
      "sq_log_err": log_diff**2,
  }
  for k in (1, 2, 3):
    per_pixel[f"delta{k}"] = (ratio < DELTA_BASE**k).astype(jnp.float32)
  return {k: jnp.sum(jnp.where(valid, v, 0.0)) for k, v in per_pixel.items()}


def metrics_from_sums(sums: dict[str, float]) -> dict[str, float]:
  """Final metrics from summed ``metric_sums`` (host, float64).

  Returns:
    ``{'abs_rel', 'sq_rel', 'rmse', 'rmse_log', 'delta1', 'delta2',
    'delta3', 'num_pixels'}``; NaN metrics when no pixel was valid.
  """
  n = float(sums["count"])
  mean = lambda k: float(sums[k]) / n if n > 0 else float("nan")
  return {
      "abs_rel": mean("abs_rel"),
      "sq_rel": mean("sq_rel"),
      "rmse": float(np.sqrt(mean("sq_err"))),
      "rmse_log": float(np.sqrt(mean("sq_log_err"))),
      "delta1": mean("delta1"),
      "delta2": mean("delta2"),
      "delta3": mean("delta3"),
      "num_pixels": int(n),
  }
