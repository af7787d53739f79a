"""Task registry: a method's ``task`` name -> ``jaxda.tasks.task.Task``.

A task is what a run predicts and how it is scored (segmentation: mIoU,
classification: accuracy, depth: δ<1.25); the run loop calls its hooks.
"""

from jaxda.tasks import task as base
from jaxda.tasks import classification
from jaxda.tasks import depth
from jaxda.tasks import normals
from jaxda.tasks import segmentation

TASKS = {t.name: t for t in (segmentation.SEGMENTATION,
                             classification.CLASSIFICATION, depth.DEPTH,
                             normals.NORMALS)}
# The task of configs without a ``task`` field.
DEFAULT_TASK = segmentation.SEGMENTATION.name


def get_task(name: str) -> base.Task:
  """Looks up a task by name (``ValueError`` naming the known ones)."""
  try:
    return TASKS[name]
  except KeyError:
    raise ValueError(
        f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


def config_task(config) -> str:
  """``config.task``; configs without the field are ``DEFAULT_TASK``."""
  return config.get("task", DEFAULT_TASK)
