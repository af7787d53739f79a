"""Method registry: ``config.method`` -> ``jaxda.methods.base.Method``.

Each entry names its task, its step factory (and later phases' factories)
and, for multi-stage methods, its driver. ``train_and_evaluate(config,
workdir)`` is what every entry point runs: the method's driver, or the
default loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxda.methods import adaptsegnet
from jaxda.methods import advent
from jaxda.methods import base
from jaxda.methods import classification_steps as classification
from jaxda.methods import dann
from jaxda.methods import source_only
from jaxda.methods import tada
from jaxda.methods.anchor import headfreeze
from jaxda.methods.anchor import multitask_step as anchor
from jaxda.methods.daformer import ema_driver as daformer
from jaxda.methods.gam import activation_step as gam
from jaxda.methods.gam import driver as gam_driver
from jaxda.methods.self_training import rounds
from jaxda.methods.self_training import steps as self_training
from jaxda.train import exceptions as errors
from jaxda.train import loop

_ROUNDS = rounds.train_and_evaluate

METHODS: dict[str, base.Method] = {
    m.name: m for m in (
        source_only.SOURCE_ONLY,
        source_only.ORACLE,
        adaptsegnet.ADAPTSEGNET,
        advent.ADVENT,
        advent.MINENT,
        dataclasses.replace(self_training.CBST, driver=_ROUNDS),
        dataclasses.replace(self_training.CRST, driver=_ROUNDS),
        # Phase 2 puts one discriminator on the main output.
        dataclasses.replace(
            self_training.TPLD, driver=_ROUNDS,
            phase_steps={"phase2": self_training.make_phase2_step},
            discriminator_levels=("main",)),
        dataclasses.replace(
            anchor.ANCHOR_TASKS,
            driver=headfreeze.train_and_evaluate),
        dataclasses.replace(
            anchor.ANCHOR_NORMALS,
            driver=headfreeze.train_and_evaluate),
        dataclasses.replace(gam.GAM,
                            driver=gam_driver.train_and_evaluate),
        dataclasses.replace(gam.GAM_CLS,
                            driver=gam_driver.train_and_evaluate),
        # Classification.
        classification.SOURCE_ONLY_CLS,
        classification.ORACLE_CLS,
        dann.DANN,
        tada.TADA,
        # Segmentation, EMA-teacher self-training (own driver).
        daformer.DAFORMER,
        daformer.MIC,
    )
}


def get_method(name: str) -> base.Method:
  """Looks up a method by name; an unknown one is a one-line config error."""
  try:
    return METHODS[name]
  except KeyError:
    raise errors.ConfigError(
        f"unknown method {name!r}; known methods: {sorted(METHODS)}") from None


def methods_of_task(task: str) -> tuple[str, ...]:
  """Names of the registered methods of ``task``."""
  return tuple(name for name, m in METHODS.items() if m.task == task)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs ``config.method``: its driver, or the default loop.

  Returns:
    The run's summary (also in ``workdir/summary.json``).
  """
  method = get_method(config.method)
  if method.driver is not None:
    return method.driver(config, workdir, method)
  return loop.train_and_evaluate(config, workdir, method)
