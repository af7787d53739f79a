"""Method registry: ``config.method`` -> ``jaxda.methods.base.Method``."""

from jaxda.methods import adaptsegnet
from jaxda.methods.anchor import step as anchor
from jaxda.methods import advent
from jaxda.methods import base
from jaxda.methods import classification
from jaxda.methods import dann
from jaxda.methods.gam import step as gam
from jaxda.methods.self_training import steps as self_training
from jaxda.methods import source_only
from jaxda.methods import tada

METHODS = {
    m.name: m for m in (
        source_only.SOURCE_ONLY,
        source_only.ORACLE,
        adaptsegnet.ADAPTSEGNET,
        advent.ADVENT,
        advent.MINENT,
        self_training.CBST,
        self_training.CRST,
        self_training.TPLD,
        anchor.ANCHOR_TASKS,
        gam.GAM,
        # Classification (config.task = 'classification').
        classification.SOURCE_ONLY_CLS,
        classification.ORACLE_CLS,
        dann.DANN,
        tada.TADA,
    )
}
# Methods of the classification task; the others are segmentation methods.
CLASSIFICATION_METHODS = ("source_only_cls", "oracle_cls", "dann", "tada")


def get_method(name: str) -> base.Method:
  """Looks up a method by name with a clear error for typos."""
  try:
    return METHODS[name]
  except KeyError:
    raise ValueError(
        f"unknown method {name!r}; known methods: {sorted(METHODS)}") from None
