"""The model self-training adapts from (``self_training.base_method``).

The papers start CBST/CRST/TPLD from a source-only model. Later
self-training work starts from an adversarially adapted one instead, which
gives the first round's pseudo labels a better base on a hard shift (issue
23: TPLD barely moves from a weak source-only model). Both are trained here,
with the same steps and LR, when ``model.init_checkpoint`` is unset.
"""

from __future__ import annotations

from typing import Callable

import ml_collections

from jaxda.methods import adaptsegnet
from jaxda.methods import base
from jaxda.methods import source_only
from jaxda.train import exceptions as errors
from jaxda.train import warm_start

# self_training.base_method -> the method that trains the base model.
BASE_METHODS: dict[str, base.Method] = {
    "source_only": source_only.SOURCE_ONLY,
    "adaptsegnet": adaptsegnet.ADAPTSEGNET,
}


def base_method(config: ml_collections.ConfigDict) -> base.Method:
  """The registered method of ``config.self_training.base_method``."""
  name = config.self_training.get("base_method", "source_only")
  if name not in BASE_METHODS:
    raise errors.ConfigError(
        f"self_training.base_method={name!r} is not one of"
        f" {sorted(BASE_METHODS)}; set --config.self_training.base_method to"
        " one of them (or give a trained run as model.init_checkpoint)")
  return BASE_METHODS[name]


def ensure_base(config: ml_collections.ConfigDict, workdir: str,
                log: Callable[[str], None]) -> str:
  """Path of the base model: ``model.init_checkpoint``, else trained (or
  reused) in ``workdir/base_<method>`` by the base method."""
  method = base_method(config)
  st = config.self_training
  return warm_start.ensure_base_model(
      config, workdir, log, method, base_steps=st.base_steps,
      base_learning_rate=st.base_learning_rate)
