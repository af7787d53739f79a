"""Names every layer shares: the ignore label, the batch contract, a step.

The lowest module of jaxda (imports only JAX): losses, metrics, data readers,
models and methods all take the ignore label and the batch layout from here.
"""

from __future__ import annotations

from typing import Any, Callable, TypedDict

import jax
import numpy as np

# Label value of pixels (or examples) that count nowhere: no loss, no
# gradient, no metric. Cityscapes' trainId convention, used by every original.
IGNORE_LABEL = 255

Array = jax.Array | np.ndarray


class DomainBatch(TypedDict, total=False):
  """One domain's half of a training batch (B = per-process batch).

  image: (B, H, W, 3) float32, normalised (``data.pipeline.normalize``).
  label: (B, H, W) int32 class ids (segmentation) or (B,) (classification);
    ``IGNORE_LABEL`` where unknown. Absent for unlabelled target batches.
  index: (B,) int32 row of each example in its split (pseudo labels, extras).
  flipped: (B,) bool, the example was mirrored horizontally.
  depth: (B, H, W) float32 metres, <= 0 where invalid (anchor tasks).
  pl_label / pl_weight / ...: per-pixel extras a driver adds (self-training).
  """
  image: Array
  label: Array
  index: Array
  flipped: Array
  depth: Array


class Batch(TypedDict, total=False):
  """The paired contract every step reads: ``{'source': ..., 'target': ...}``.

  A method that reads no source (target) images gets no ``source``
  (``target``) entry.
  """
  source: DomainBatch
  target: DomainBatch


# (state, batch, rng) -> (new_state, metrics): the pure, jit-able train step
# every method's factory returns; metrics are scalars (averaged when logged).
StepFn = Callable[[Any, Batch, jax.Array], tuple[Any, dict[str, jax.Array]]]
