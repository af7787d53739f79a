"""DACS ClassMix with static shapes (METHODS.md §17.3.3).

Half of the source classes (image and label) are pasted onto the target image
and its pseudo label, so the student sees source objects in target context.
The class draw uses random priorities over a fixed class axis (the ignore label
is one extra slot) instead of `np.random.choice`, so it jits and vmaps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxda.types import IGNORE_LABEL


def _slots(labels: jax.Array, num_classes: int,
           ignore_label: int = IGNORE_LABEL) -> jax.Array:
  """Label ids -> class slots; the ignore label goes to slot ``num_classes``."""
  labels = labels.astype(jnp.int32)
  return jnp.where(labels == ignore_label, num_classes, labels)


def present_classes(labels: jax.Array, num_classes: int,
                    ignore_label: int = IGNORE_LABEL) -> jax.Array:
  """(..., num_classes + 1) bool: which slots occur in each (H, W) label map.

  ``labels`` is (H, W) or (B, H, W); the last slot is the ignore label.
  """
  slots = _slots(labels, num_classes, ignore_label)
  onehot = jax.nn.one_hot(slots, num_classes + 1, dtype=jnp.int32)
  return jnp.any(onehot > 0, axis=(-3, -2))


def choose_classes(key: jax.Array, present: jax.Array) -> jax.Array:
  """Uniformly chooses ceil(n/2) of the n present slots, without replacement.

  Args:
    key: PRNG key (one per image).
    present: (K,) bool candidate slots.

  Returns:
    (K,) bool, the chosen slots (a subset of ``present``).
  """
  n = jnp.sum(present.astype(jnp.int32))
  k = (n + n % 2) // 2
  scores = jnp.where(present, jax.random.uniform(key, present.shape), 2.0)
  rank = jnp.argsort(jnp.argsort(scores))
  return present & (rank < k)


def class_mask(labels: jax.Array, chosen: jax.Array, num_classes: int,
               ignore_label: int = IGNORE_LABEL) -> jax.Array:
  """(H, W) float32 mask: 1 where the label's slot is chosen."""
  return chosen[_slots(labels, num_classes, ignore_label)].astype(jnp.float32)


def one_mix(mask: jax.Array, source: jax.Array, target: jax.Array) -> jax.Array:
  """mask * source + (1 - mask) * target; ``mask`` (H, W) broadcasts over C."""
  m = mask.astype(jnp.float32)
  if source.ndim == mask.ndim + 1:
    m = m[..., None]
  out = m * source.astype(jnp.float32) + (1.0 - m) * target.astype(jnp.float32)
  return out.astype(jnp.result_type(source.dtype, target.dtype))


def class_mix(key: jax.Array, source_image: jax.Array,
              source_label: jax.Array, target_image: jax.Array,
              target_label: jax.Array, target_weight: jax.Array,
              num_classes: int, pool: str = 'batch',
              include_ignore: bool = True,
              ignore_label: int = IGNORE_LABEL) -> dict[str, jax.Array]:
  """ClassMix of a batch, one class draw per image.

  Args:
    key: PRNG key; split into one key per image.
    source_image, target_image: (B, H, W, 3).
    source_label: (B, H, W) int, ``ignore_label`` where void.
    target_label: (B, H, W) int teacher pseudo labels.
    target_weight: (B, H, W) float pseudo-label weights.
    num_classes: number of real classes.
    pool: 'batch' draws from the classes of the whole source batch (the
      original: a chosen class can be absent from the image); 'image' from
      the image's own classes (the paper).
    include_ignore: whether the ignore label is a candidate (the original:
      yes, so void regions are pasted).
    ignore_label: the void label.

  Returns:
    dict with 'image' (B, H, W, 3), 'label' (B, H, W) int32, 'weight'
    (B, H, W) float32 (1 on pasted source pixels), 'mask' (B, H, W) float32
    and 'chosen' (B, num_classes + 1) bool.
  """
  b = source_label.shape[0]
  present = present_classes(source_label, num_classes, ignore_label)
  if pool == 'batch':
    present = jnp.broadcast_to(jnp.any(present, axis=0), present.shape)
  elif pool != 'image':
    raise ValueError(f'pool must be batch or image, got {pool!r}')
  if not include_ignore:
    present = present.at[:, num_classes].set(False)
  chosen = jax.vmap(choose_classes)(jax.random.split(key, b), present)
  masks = jax.vmap(lambda lab, c: class_mask(lab, c, num_classes,
                                             ignore_label))(source_label,
                                                            chosen)
  mix = jax.vmap(one_mix)
  image = mix(masks, source_image, target_image)
  label = jnp.where(masks > 0, source_label.astype(jnp.int32),
                    target_label.astype(jnp.int32))
  weight = mix(masks, jnp.ones_like(masks), target_weight.astype(jnp.float32))
  return {'image': image, 'label': label, 'weight': weight, 'mask': masks,
          'chosen': chosen}
