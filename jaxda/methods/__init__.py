"""Method registry: ``config.method`` -> ``jaxda.methods.base.Method``."""

from jaxda.methods import adaptsegnet
from jaxda.methods import advent
from jaxda.methods import base
from jaxda.methods import self_training
from jaxda.methods import source_only

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
    )
}


def get_method(name: str) -> base.Method:
  """Looks up a method by name with a clear error for typos."""
  try:
    return METHODS[name]
  except KeyError:
    raise ValueError(
        f"unknown method {name!r}; known methods: {sorted(METHODS)}") from None
