"""CBST / CRST recipe pieces around the thresholds (METHODS.md §6.4-§6.6).

Pure functions (NumPy / jax.numpy; no Flax, no config, no I/O). Random
draws take a NumPy ``Generator`` or explicit seeds, so a caller keyed by
(seed, round) or (seed, step) gets the same draws after a resume.

* **Source portion** (§6.6): each round trains on a random subset of the
  source images, ``source_portion(r)`` of them (CRST: 3% growing by 0.25
  points a round to at most 6%, redrawn each round; CBST: the same
  schedule on nested subsets, ``'cumulative'``): ``source_rows``.
* **Rare-class mining** (§6.5): ``rare_class_ids`` picks the classes whose
  share of predicted pixels is below ``mine_port``; the target loader
  centres a crop on a pixel of one of them (``mine_pixel``,
  ``centred_crop_offset``) with probability ``mine_chance``.
* **Spatial priors** (CBST-SP, §6.4): per-location class frequencies of
  the source labels (``spatial_prior_counts`` -> ``spatial_prior``),
  multiplied into the target probabilities before the thresholds and the
  selection, not renormalised (``apply_spatial_prior``; §13 #16).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxda.types import IGNORE_LABEL

SOURCE_POLICIES = ("redraw", "cumulative")
_SOURCE_SALT = 0x73726370  # Source-subset draws apart from other streams.


# ---------------------------------------------------------------------------
# Source portion
# ---------------------------------------------------------------------------


def source_portion(round_index: int, init: float, step: float,
                   max_portion: float) -> float:
  """Share of the source images round ``round_index`` trains on:
  ``min(init + r * step, max_portion)`` (§6.6; 1.0 = every image)."""
  return min(init + step * round_index, max_portion)


def num_source_rows(n: int, portion: float) -> int:
  """``floor(n * portion)`` rows, at least 1, at most ``n``."""
  if not 0.0 < portion:
    raise ValueError(f"source portion must be > 0, got {portion}")
  if portion >= 1.0:
    return n
  return min(n, max(1, int(math.floor(n * portion))))


def source_rows(n: int, portion: float, *, seed: int, round_index: int,
                policy: str = "redraw") -> np.ndarray:
  """Sorted rows (int64) of the round's source subset.

  Args:
    n: source images (this process's share).
    portion: share to keep (``source_portion``); >= 1 keeps every row.
    seed: the run's seed.
    round_index: the round; ``'redraw'`` draws a new subset per round.
    policy: ``'redraw'`` (CRST ``SRC_SAMPLING_POLICY='r'``: an independent
      random subset each round) or ``'cumulative'`` (CBST: one permutation
      for the run, its first rows, so a round's subset holds the previous
      round's).

  Returns:
    (k,) int64 sorted distinct rows in [0, n), k = ``num_source_rows``.
  """
  if policy not in SOURCE_POLICIES:
    raise ValueError(f"source sampling policy must be one of "
                     f"{SOURCE_POLICIES}, got {policy!r}")
  k = num_source_rows(n, portion)
  if k == n:
    return np.arange(n, dtype=np.int64)
  if policy == "redraw":
    rng = np.random.default_rng([int(seed), _SOURCE_SALT, int(round_index)])
    rows = rng.choice(n, k, replace=False)
  else:
    rng = np.random.default_rng([int(seed), _SOURCE_SALT])
    rows = rng.permutation(n)[:k]
  return np.sort(rows).astype(np.int64)


# ---------------------------------------------------------------------------
# Rare-class mining
# ---------------------------------------------------------------------------


def rare_class_ids(pred_counts, mine_port: float = 1e-3,
                   rare_cls_num: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """``(rare_ids, mine_ids)`` from per-class predicted-pixel counts (§6.5).

  Classes sorted by their share of predicted pixels, ascending (stable:
  ties by class id); ``rare_ids`` are the ``rare_cls_num`` rarest,
  ``mine_ids`` every class with share < ``mine_port`` (CRST ``MINE_PORT``,
  CBST ``--mine-thresh``: 1e-3), rarest first. Never-predicted classes
  have share 0 and are mined (they are simply absent from every label map).

  Args:
    pred_counts: (C,) argmax counts over the target train set.
    mine_port: share below which a class is mined.
    rare_cls_num: number of rarest classes returned.

  Returns:
    Two int64 arrays of class ids.
  """
  counts = np.asarray(pred_counts, np.float64)
  total = counts.sum()
  share = counts / total if total > 0 else np.zeros_like(counts)
  order = np.argsort(share, kind="stable")
  num_mine = int(np.count_nonzero(share < mine_port))
  return order[:rare_cls_num].astype(np.int64), order[:num_mine].astype(
      np.int64)


def mine_pixel(label: np.ndarray, mine_ids, rng: np.random.Generator):
  """A random pixel of a random mined class present in ``label``.

  Args:
    label: (H, W) pseudo-label map (``IGNORE_LABEL`` = none).
    mine_ids: class ids to mine.
    rng: draws one class (uniform over the mined classes present, in
      ``mine_ids`` order) and one of its pixels (uniform, row-major).

  Returns:
    ``(class, row, col)``, or None when no mined class is in ``label``.
  """
  label = np.asarray(label)
  present = [int(c) for c in mine_ids
             if c != IGNORE_LABEL and np.any(label == c)]
  if not present:
    return None
  c = present[int(rng.integers(len(present)))]
  pixels = np.flatnonzero(label == c)
  y, x = divmod(int(pixels[int(rng.integers(len(pixels)))]), label.shape[1])
  return c, y, x


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
  """The size a ``scale`` resize gives (``augment.scale_crop_example``)."""
  return (max(1, int(round(size[0] * scale))),
          max(1, int(round(size[1] * scale))))


def centred_crop_offset(pixel: tuple[int, int], size: tuple[int, int],
                        scale: float, crop: tuple[int, int]) -> np.ndarray:
  """The crop-offset uniforms that centre a crop on ``pixel``.

  ``augment.scale_crop_example`` resizes an (H, W) example by ``scale``
  (nearest for labels: output row i reads row floor((i + 0.5) H / h)),
  pads it to at least the crop and takes the crop whose top-left corner is
  ``int(u * (padded - crop + 1))``. This returns the ``u`` (2,) whose crop
  has the scaled pixel at its centre (row ``crop_h // 2``), shifted inwards
  where the centre would put the crop outside the padded example.
  """
  (h, w), (sh, sw) = size, scaled_size(size, scale)
  out = []
  for p, full, scaled, c in ((pixel[0], h, sh, crop[0]),
                             (pixel[1], w, sw, crop[1])):
    # Output index whose nearest-neighbour source is (about) p.
    q = min(int((p + 0.5) * scaled / full), scaled - 1)
    room = max(c, scaled) - c  # largest corner
    corner = min(max(q - c // 2, 0), room)
    out.append((corner + 0.5) / (room + 1))
  return np.asarray(out, np.float64)


# ---------------------------------------------------------------------------
# Spatial priors (CBST-SP)
# ---------------------------------------------------------------------------


def spatial_prior_counts(labels, num_classes: int) -> np.ndarray:
  """(H, W, C) int64: how often each class labels each pixel location.

  Args:
    labels: (N, H, W) class ids; ``IGNORE_LABEL`` (and ids >= C) are not
      counted.
    num_classes: C.
  """
  labels = np.asarray(labels)
  counts = np.zeros(labels.shape[1:] + (num_classes,), np.int64)
  for c in range(num_classes):
    counts[..., c] = np.count_nonzero(labels == c, axis=0)
  return counts


def spatial_prior(counts, smoothing: float = 1.0) -> np.ndarray:
  """Per-location class frequencies (H, W, C) float32 from counts.

  ``(count_c + s) / (sum_k count_k + C s)`` at each location: a
  distribution over classes; ``s`` (additive smoothing) keeps a class
  never seen at a location selectable there. A location without any label
  and ``s = 0`` gets the uniform 1/C. (The original prior's construction is
  UNVERIFIED, §6.4; a user with the original ``prior_array.mat`` passes the
  file instead.)
  """
  if smoothing < 0:
    raise ValueError(f"smoothing must be >= 0, got {smoothing}")
  counts = np.asarray(counts, np.float64)
  num_classes = counts.shape[-1]
  total = counts.sum(axis=-1, keepdims=True) + num_classes * smoothing
  prior = np.where(total > 0, (counts + smoothing) / np.maximum(total, 1e-300),
                   1.0 / num_classes)
  return prior.astype(np.float32)


def resize_prior(prior, size: tuple[int, int]) -> jax.Array:
  """(h, w, C) prior -> (H, W, C) float32, bilinear (identity at size)."""
  prior = jnp.asarray(prior, jnp.float32)
  if tuple(prior.shape[:2]) == tuple(size):
    return prior
  return jax.image.resize(prior, tuple(size) + prior.shape[2:], "bilinear")


def apply_spatial_prior(probs, prior, renormalize: bool = False):
  """CBST-SP scores ``prior ⊙ p`` (B, H, W, C), not renormalised (§6.4).

  Args:
    probs: (B, H, W, C) probabilities.
    prior: (H, W, C) per-location class prior.
    renormalize: divide by the sum over classes (option
      ``spatial_prior_renormalize``; the original does not).
  """
  q = jnp.asarray(probs) * jnp.asarray(prior, jnp.float32)[None]
  if renormalize:
    q = q / jnp.maximum(jnp.sum(q, axis=-1, keepdims=True), 1e-30)
  return q
