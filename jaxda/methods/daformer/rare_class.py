"""Rare-class sampling statistics and a host-side sampler (METHODS.md §17.3.5).

Drawing a class first, with probability rising steeply as its source pixel
share falls, then an image that holds enough of it, lets rare classes (rider,
train, bicycle) appear in training often enough to be learnt. NumPy only: the
statistics are computed once per dataset and the draws happen in the loader.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses

import numpy as np

from jaxda.types import IGNORE_LABEL


def image_class_counts(labels: Iterable[np.ndarray], num_classes: int,
                       ignore_label: int = IGNORE_LABEL) -> np.ndarray:
  """(N, num_classes) int64 pixel counts of each class in each label map.

  Counts come from the full-resolution labels (the original's
  ``sample_class_stats.json``); ignored and out-of-range pixels are dropped.
  """
  rows = []
  for lab in labels:
    lab = np.asarray(lab).ravel().astype(np.int64)
    lab = lab[(lab != ignore_label) & (lab >= 0) & (lab < num_classes)]
    rows.append(np.bincount(lab, minlength=num_classes))
  if not rows:
    return np.zeros((0, num_classes), np.int64)
  return np.stack(rows).astype(np.int64)


def class_probabilities(counts: np.ndarray, temperature: float = 0.01
                        ) -> tuple[np.ndarray, np.ndarray]:
  """P(c) = softmax((1 - f_c) / T) over the classes present in the source.

  f_c = n_c / sum n with n_c the pixels of c summed over all images; classes
  with n_c = 0 are excluded (the original never lists them).

  Args:
    counts: (N, C) per-image counts or (C,) totals.
    temperature: T (0.01).

  Returns:
    (classes int64, probabilities float64), ordered by ascending count (ties
    by class id), as the original orders them.
  """
  n = np.asarray(counts, np.float64)
  if n.ndim == 2:
    n = n.sum(0)
  classes = np.nonzero(n > 0)[0]
  classes = classes[np.lexsort((classes, n[classes]))]
  f = n[classes] / n[classes].sum()
  z = (1.0 - f) / temperature
  p = np.exp(z - z.max())
  return classes.astype(np.int64), p / p.sum()


@dataclasses.dataclass(frozen=True)
class RareClassStats:
  """What the sampler needs, computed once per source dataset.

  classes / probs: the RCS class distribution; images[c]: indices of the
  images holding more than ``min_pixels`` pixels of class ``classes[c]``.
  """
  classes: np.ndarray
  probs: np.ndarray
  images: tuple[np.ndarray, ...]
  min_pixels: int

  def to_json(self) -> dict:
    """Plain-JSON form, to cache the statistics beside a run."""
    return {'classes': self.classes.tolist(), 'probs': self.probs.tolist(),
            'images': [i.tolist() for i in self.images],
            'min_pixels': int(self.min_pixels)}

  @classmethod
  def from_json(cls, d: dict) -> 'RareClassStats':
    return cls(np.asarray(d['classes'], np.int64),
               np.asarray(d['probs'], np.float64),
               tuple(np.asarray(i, np.int64) for i in d['images']),
               int(d['min_pixels']))


def rare_class_stats(counts: np.ndarray, temperature: float = 0.01,
                     min_pixels: int = 3000) -> RareClassStats:
  """Class distribution and per-class candidate images from (N, C) counts.

  An image is a candidate for class c iff it has strictly more than
  ``min_pixels`` pixels of c. Classes without any candidate keep their
  probability mass removed and the rest renormalised (the original would fail
  on them; with real datasets every class has candidates).
  """
  counts = np.asarray(counts, np.int64)
  classes, probs = class_probabilities(counts, temperature)
  images = tuple(np.nonzero(counts[:, c] > min_pixels)[0].astype(np.int64)
                 for c in classes)
  has = np.array([len(i) > 0 for i in images], bool)
  if not has.any():
    raise ValueError(f'no image has more than {min_pixels} pixels of any class')
  probs = np.where(has, probs, 0.0)
  probs = probs / probs.sum()
  return RareClassStats(classes, probs, images, int(min_pixels))


class RareClassSampler:
  """Draws (class, source image index) pairs: a class ~ P, then an image
  uniformly among its candidates."""

  def __init__(self, stats: RareClassStats,
               rng: np.random.Generator | int | None = None):
    self.stats = stats
    self.rng = np.random.default_rng(rng)

  def sample(self) -> tuple[int, int]:
    i = self.rng.choice(len(self.stats.classes), p=self.stats.probs)
    images = self.stats.images[i]
    return int(self.stats.classes[i]), int(images[self.rng.integers(
        len(images))])

  def sample_many(self, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n independent draws: (classes (n,), image indices (n,))."""
    out = [self.sample() for _ in range(n)]
    return (np.array([c for c, _ in out], np.int64),
            np.array([i for _, i in out], np.int64))


def accepted_crop(crop_class_pixels: Sequence[int], min_pixels: int = 3000,
                  min_crop_ratio: float = 0.5, max_checks: int = 10) -> int:
  """Index of the random crop the original keeps for the sampled class.

  Crops 0 .. max_checks - 1 are checked in turn; the first holding more than
  ``min_pixels * min_crop_ratio`` pixels of the class is used, otherwise crop
  ``max_checks`` (the 11th) is used unchecked. ``min_crop_ratio <= 0``: crop 0.
  """
  if min_crop_ratio <= 0:
    return 0
  for j in range(max_checks):
    if crop_class_pixels[j] > min_pixels * min_crop_ratio:
      return j
  return max_checks
