"""Initial weights from elsewhere: another run's (``model.init_checkpoint``)
or converted ones (``model.init_weights``).

``run`` below is a ``jaxda.train.loop.Run`` (only ``run.tx`` and
``run.log`` are read); the optimiser state is re-initialised, since a warm
start is not a resume.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxda import checkpoint as checkpoint_lib
from jaxda import optim
from jaxda.weights import torch_import


def load_init_weights(run, state, path: str):
  """Overlays converted (e.g. PyTorch ImageNet) weights onto ``state``.

  ``path`` is an ``experiments.import_weights`` output. Leaves it lacks (the
  ASPP heads of a backbone-only file) keep their random init; a leaf it has
  that the model lacks, or a shape mismatch, is an error.
  """
  weights = checkpoint_lib.load_weights(path)
  try:
    params, kept = torch_import.overlay(state.params, weights["params"],
                                        "params", path)
    stats, _ = torch_import.overlay(state.batch_stats, weights["batch_stats"],
                                    "batch_stats", path)
  except torch_import.WeightImportError as e:
    raise checkpoint_lib.CheckpointError(str(e)) from None
  modules = sorted({k.rsplit("/", 1)[0] for k in kept})
  run.log(f"Initialised the segmenter from converted weights {path}; random"
          f" init kept in {len(modules)} modules: {', '.join(modules[:10])}"
          + (" ..." if len(modules) > 10 else ""))
  return state.replace(params=params, batch_stats=stats,
                       opt_state=jax.jit(run.tx.init)(params))


def load_segmenter_weights(run, state, path: str):
  """Copies params and BN statistics of another run into ``state``.

  The optimiser state is re-initialised: a warm start, not a resume.
  Shapes must match the configured model exactly.
  """
  weights = checkpoint_lib.load_weights(path)
  try:
    params = _like(state.params, weights["params"], "params", path)
    stats = _like(state.batch_stats, weights["batch_stats"], "batch_stats",
                  path)
  except ValueError as e:
    raise checkpoint_lib.CheckpointError(str(e)) from None
  return state.replace(params=params, batch_stats=stats,
                       opt_state=jax.jit(run.tx.init)(params))


def _like(target, loaded, what: str, path: str):
  """Places ``loaded`` with the structure/sharding of ``target``."""
  t_flat = jax.tree_util.tree_flatten_with_path(target)[0]
  l_flat = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  out = []
  for key, leaf in t_flat:
    name = optim.param_path(key)
    if key not in l_flat:
      raise ValueError(
          f"init checkpoint {path} has no {what} '{name}': it was written for"
          " a different architecture; check config.model.*")
    value = np.asarray(l_flat[key])
    if value.shape != leaf.shape:
      raise ValueError(
          f"init checkpoint {path}: {what} '{name}' has shape {value.shape},"
          f" the model expects {leaf.shape}; check config.model.* and"
          " the number of classes")
    out.append(jax.device_put(value.astype(leaf.dtype), leaf.sharding))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target),
                                      out)
