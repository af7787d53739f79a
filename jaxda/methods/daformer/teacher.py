"""EMA teacher and its pseudo labels (METHODS.md §17.3.1, §17.3.2).

The teacher is the student's exponential moving average with a warm-up that
makes it the plain mean of the first iterates, so early pseudo labels do not
lean on the random initial weights. Its pseudo labels are weighted by the share
of confident pixels, which damps the target loss while the teacher is unsure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax


def ema_alpha(step: jax.Array | int, alpha: float = 0.999) -> jax.Array:
  """Teacher momentum before iteration ``step``: min(1 - 1/(step + 1), alpha).

  ``step`` counts the optimizer steps the student has taken. At 0 the value is
  0 (the update copies the student), which is the original's initial copy.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(1.0 - 1.0 / (step + 1.0), alpha)


def ema_update(teacher: Any, student: Any, step: jax.Array | int,
               alpha: float = 0.999) -> Any:
  """teacher <- a * teacher + (1 - a) * student, a = `ema_alpha(step, alpha)`.

  Works on any pytree of float arrays (pass parameters only: the original does
  not average BatchNorm buffers). Apply after the optimizer update of step t
  with ``step = t + 1``; ``step = 0`` initialises the teacher as a copy.
  """
  a = ema_alpha(step, alpha)
  return optax.incremental_update(student, teacher, 1.0 - a)


def _margin_mask(shape: tuple[int, int, int],
                 margins: Sequence[int]) -> jax.Array:
  """(B, H, W) float mask, 0 on ``(top, bottom, left, right)`` margins."""
  top, bottom, left, right = (int(m) for m in margins)
  _, h, w = shape
  rows = jnp.arange(h)
  cols = jnp.arange(w)
  keep_r = (rows >= top) & (rows < h - bottom)
  keep_c = (cols >= left) & (cols < w - right)
  return jnp.broadcast_to((keep_r[:, None] & keep_c[None, :]).astype(
      jnp.float32), shape)


def pseudo_label_and_weight(
    teacher_logits: jax.Array, tau: float = 0.968,
    margins: Sequence[int] = (0, 0, 0, 0),
    valid_mask: jax.Array | None = None,
    scope: str = 'batch') -> tuple[jax.Array, jax.Array]:
  """Pseudo labels and per-pixel weights from teacher logits.

  ``q`` = share of pixels whose max softmax probability is >= ``tau``
  (``ge`` as in the original's ``pseudo_prob.ge``): one number for the whole
  batch (``scope='batch'``, the original) or one per image (``'image'``, the
  paper's wording). The weight map is ``q`` everywhere; margins and
  ``valid_mask`` are zeroed afterwards, so margin pixels count in ``q``.

  Args:
    teacher_logits: (B, H, W, C) logits at the input size.
    tau: confidence threshold.
    margins: (top, bottom, left, right) pixels whose weight is set to 0
      (DAFormer: (15, 120, 0, 0) crop rows).
    valid_mask: optional (B, H, W) multiplier (HRDA's image-margin mask,
      cropped and flipped with the image).
    scope: 'batch' or 'image'.

  Returns:
    (labels int32 (B, H, W), weights float32 (B, H, W)).
  """
  probs = jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1)
  conf = jnp.max(probs, axis=-1)
  labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  confident = (conf >= tau).astype(jnp.float32)
  if scope == 'batch':
    q = jnp.broadcast_to(jnp.mean(confident), conf.shape)
  elif scope == 'image':
    q = jnp.broadcast_to(jnp.mean(confident, axis=(1, 2))[:, None, None],
                         conf.shape)
  else:
    raise ValueError(f'scope must be batch or image, got {scope!r}')
  weights = q * _margin_mask(conf.shape, margins)
  if valid_mask is not None:
    weights = weights * valid_mask.astype(jnp.float32)
  return labels, weights
