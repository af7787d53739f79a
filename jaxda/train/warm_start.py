"""Warm starts: the source-only base model a method adapts from.

Self-training (and GAM) start from a model trained on the source alone; when
``model.init_checkpoint`` is unset their drivers train (or reuse) one here.
"""

from __future__ import annotations

import os

import ml_collections

from jaxda.train import loop


def ensure_base_model(config, workdir: str, log, base_method, *,
                      base_steps: int | None = None,
                      base_learning_rate: float | None = None,
                      base_optim: ml_collections.ConfigDict | None = None
                      ) -> str:
  """Returns the init checkpoint path, training a source-only base if needed.

  Args:
    config: the method's config; the base run is a copy with method
      ``base_method.name``.
    workdir: the base run goes to ``workdir/base_<method name>`` (reused
      when finished, resumed when interrupted).
    log: ``log(message)``.
    base_method: the ``Method`` the base run trains (source-only; TPLD may
      use AdaptSegNet, ``self_training.base_method``).
    base_steps: steps of the base run; default
      ``config.self_training.base_steps``.
    base_learning_rate: its LR; default
      ``config.self_training.base_learning_rate``.
    base_optim: a whole ``optim`` block for the base run (GAM: the
      source-only recipe, since its own ``optim`` is the adaptation's);
      default: the method's ``optim`` with the LR above, poly 0.9.
  """
  if config.model.init_checkpoint:
    return config.model.init_checkpoint
  if base_steps is None:
    base_steps = config.self_training.base_steps
  if base_learning_rate is None:
    base_learning_rate = config.self_training.base_learning_rate
  base_dir = os.path.join(workdir, f"base_{base_method.name}")
  if os.path.exists(os.path.join(base_dir, "summary.json")):
    log(f"Base model: reusing {base_dir}")
    return base_dir
  base = ml_collections.ConfigDict(config.to_dict())
  base.method = base_method.name
  base.num_steps = base_steps
  if base_optim is not None:
    base.optim = ml_collections.ConfigDict(base_optim.to_dict())
  base.optim.learning_rate = base_learning_rate
  base.optim.power = 0.9
  base.optim.schedule_steps = -1
  log(f"Base model: no model.init_checkpoint given, training"
      f" {base_method.name} for {base_steps} steps in {base_dir}")
  loop.train_and_evaluate(base, base_dir, base_method)
  return base_dir
