"""Target BatchNorm statistics for self-training (AdaBN, Li et al. 2016).

With ``self_training.target_bn_stats`` every round starts by re-estimating
the BatchNorm running statistics on the target train images with the model
as it is, before the round's pseudo-labelling pass; the round's labels,
its target training passes and the evaluation then normalise target images
with target statistics. Why: a source-only base normalises target
activations with source statistics, and on a low-level shift (lighting,
blur, palette) that alone costs several mIoU points and makes the first
round's pseudo labels worse than they need be.

Under ``model.bn_mode='source'`` the driver switches the rounds to
``'split'`` (domain-specific statistics): source passes keep normalising
with their own batch statistics, as the base model trained, and no longer
write the running statistics, which now hold the target's. Under
``'frozen'`` every pass, source ones included, uses the target statistics
(AdaBN proper).

The estimate is the mean over full batches of each layer's batch mean and
(biased) variance (``forward.batch_statistics``), the cumulative average
of PyTorch's ``momentum=None``; the images that do not fill a last batch
are left out, so every batch has one shape and the estimate does not
depend on padding.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from jaxda import parallel
from jaxda.data import pipeline
from jaxda.models import forward
from jaxda.tasks import splits
from jaxda.train import loop as train_loop
from jaxda.train.exceptions import ConfigError

# model.bn_mode of the base -> the mode the rounds run in.
ROUND_BN_MODES = {"source": "split", "frozen": "frozen"}


def enabled(config: ml_collections.ConfigDict) -> bool:
  return bool(config.self_training.get("target_bn_stats", False))


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """One line per invalid combination (``recipe.problems`` calls it)."""
  mode = config.model.bn_mode
  if enabled(config) and mode not in ROUND_BN_MODES and mode != "split":
    return [f"self_training.target_bn_stats needs model.bn_mode 'source' or"
            f" 'frozen' (got {mode!r}: training passes would overwrite the"
            " target statistics); set --config.model.bn_mode=source"]
  return []


def round_config(config: ml_collections.ConfigDict
                 ) -> ml_collections.ConfigDict:
  """``config`` with the rounds' BatchNorm mode (after the base is made)."""
  if enabled(config):
    config.model.bn_mode = ROUND_BN_MODES.get(config.model.bn_mode,
                                              config.model.bn_mode)
  return config


def _batch_size(run, num_images: int) -> int:
  """Per-process batch: the evaluation batch, at most the smallest share."""
  local_devices = sum(d.process_index == jax.process_index()
                      for d in run.mesh.devices.flat)
  smallest = -parallel.max_over_processes(-num_images)
  size = min(parallel.local_batch_size(splits.eval_batch_size(run)),
             smallest // local_devices * local_devices)
  if size < 1:
    raise ConfigError(
        f"self_training.target_bn_stats needs at least {local_devices}"
        f" target train images per process (has {smallest}); set it False")
  return size


@functools.lru_cache(maxsize=8)
def _stats_fn(models: forward.Models, mesh):
  """``forward.batch_statistics`` jitted for ``mesh``, once per run (every
  round reuses the compiled program)."""
  return jax.jit(
      functools.partial(forward.batch_statistics, models),
      in_shardings=(parallel.replicated(mesh),) * 2
      + (parallel.batch_sharded(mesh),),
      out_shardings=parallel.replicated(mesh))


def estimate(run, state):
  """The target train set's BatchNorm statistics under ``state.params``.

  Returns:
    a tree like ``state.batch_stats`` (replicated on ``run.mesh``).
  """
  images = run.data["target_train"].images  # this process's share
  size = _batch_size(run, len(images))
  count = -parallel.max_over_processes(-len(images)) // size
  stats_fn = _stats_fn(run.models, run.mesh)
  total = None
  for i in range(count):
    batch = pipeline.normalize(images[i * size:(i + 1) * size],
                               run.config.data.normalization)
    stats = stats_fn(state.params, state.batch_stats,
                     parallel.shard_batch(np.asarray(batch), run.mesh))
    total = stats if total is None else jax.tree.map(
        lambda a, b: a + b, total, stats)
  return jax.tree.map(lambda t: t / count, total)


def at_round_start(run, state, r: int, base_miou: float | None):
  """Re-estimates the statistics at the start of round ``r``.

  Returns:
    ``(state, base_miou)``: the state with the target statistics and, at
    round 0, the base model's target mIoU with them (how much of a run's
    gain is the statistics alone), else ``base_miou`` unchanged.
  """
  state = state.replace(batch_stats=estimate(run, state))
  run.log(f"round {r}: BatchNorm statistics re-estimated on the target"
          " train set")
  if r:
    return state, base_miou
  miou = train_loop.evaluate_target(run, state, 0,
                                    prefix="target_with_target_bn")["miou"]
  run.log(f"base model with target BatchNorm statistics: target mIoU"
          f" {100 * miou:.2f}%")
  return state, miou
