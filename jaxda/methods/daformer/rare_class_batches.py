"""Rare-class sampling of the source stream (DAFormer's RCS), host side.

Each source example of step ``s`` is drawn as the original draws it: a class
``c`` with ``P(c) ∝ exp((1 - f_c) / T)``, then uniformly an image holding more
than ``rcs_min_pixels`` pixels of ``c``, then (with a crop size set) up to 10
random crops until one holds more than ``rcs_min_pixels * rcs_min_crop_ratio``
pixels of ``c`` (else the 11th, unchecked), and a mirror with probability 1/2
when ``data.flip``. Draws depend on (seed, step) only, so a resumed run sees
the batches an uninterrupted one would.

The statistics (``rare_class.rare_class_stats``) come from the loaded source
labels, at the training size the domain was loaded at (the original counts
full-resolution labels: scale ``rcs_min_pixels`` with the pixel count), and
are cached in ``workdir/rcs_class_stats.json``.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxda.data import pipeline
from jaxda.methods.daformer import rare_class
from jaxda.train.exceptions import ConfigError

_SALT = 0x52435321  # Independent of the pipeline's permutations and flips.
_CHUNK = 64


def config_problems(config) -> list[str]:
  """RCS values the stream cannot honour, one line each."""
  d = config.daformer
  if not d.rcs:
    return []
  problems = []
  if d.rcs_temperature <= 0:
    problems.append("config.daformer.rcs_temperature must be > 0, got"
                    f" {d.rcs_temperature}")
  if d.rcs_min_pixels < 0:
    problems.append("config.daformer.rcs_min_pixels must be >= 0")
  if (config.data.get("scale_min", 1.0), config.data.get("scale_max", 1.0)
      ) != (1.0, 1.0):
    problems.append("config.daformer.rcs draws its own source crops; random"
                    " scaling (config.data.scale_min/max) is not supported"
                    " with it")
  return problems


def class_counts(labels, num_classes: int) -> np.ndarray:
  """(N, C) per-image pixel counts, read in chunks (lazy label views)."""
  rows = []
  for i in range(0, len(labels), _CHUNK):
    rows.append(rare_class.image_class_counts(
        np.asarray(labels[i:i + _CHUNK]), num_classes))
  return np.concatenate(rows) if rows else np.zeros((0, num_classes),
                                                    np.int64)


def load_or_compute_stats(run) -> rare_class.RareClassStats:
  """The source split's RCS statistics, cached beside the run."""
  d = run.config.daformer
  labels = run.data["source_train"].labels
  key = {"num_images": int(len(labels)), "num_classes": run.num_classes,
         "shape": list(np.shape(labels)[1:]),
         "temperature": float(d.rcs_temperature),
         "min_pixels": int(d.rcs_min_pixels),
         "process": int(jax.process_index())}
  path = run.path(f"rcs_class_stats_p{key['process']}.json"
                  if jax.process_count() > 1 else "rcs_class_stats.json")
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get("key") == key:
      return rare_class.RareClassStats.from_json(cached["stats"])
  counts = class_counts(labels, run.num_classes)
  try:
    stats = rare_class.rare_class_stats(counts, float(d.rcs_temperature),
                                        int(d.rcs_min_pixels))
  except ValueError as e:
    raise ConfigError(f"config.daformer.rcs_min_pixels: {e}") from None
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"key": key, "stats": stats.to_json()}, f)
  os.replace(tmp, path)
  probs = ", ".join(f"{run.class_names[c]} {p:.2f}"
                    for c, p in zip(stats.classes[::-1], stats.probs[::-1]))
  run.log(f"  rare-class sampling: P(class) {probs}")
  return stats


def _crop(rng, label: np.ndarray, cls: int, crop: tuple[int, int],
          min_pixels: float) -> tuple[int, int]:
  """Top-left corner of the crop kept for ``cls`` (``accepted_crop``)."""
  h, w = label.shape
  ch, cw = min(crop[0], h), min(crop[1], w)
  corners = [(int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)))
             for _ in range(11)]
  counts = [int(np.sum(label[y:y + ch, x:x + cw] == cls))
            for y, x in corners[:10]]
  return corners[rare_class.accepted_crop(
      counts + [0], min_pixels=1, min_crop_ratio=float(min_pixels))]


def source_batches(domain, stats: rare_class.RareClassStats, config, *,
                   batch_size: int, seed: int, start_step: int = 0):
  """Infinite RCS source batches (``pipeline.train_batches``' contract)."""
  d = config.daformer
  crop = (int(config.data.get("crop_height", 0)),
          int(config.data.get("crop_width", 0)))
  crop = crop if all(crop) else None
  threshold = float(d.rcs_min_pixels) * float(d.rcs_min_crop_ratio)
  step = start_step
  while True:
    rng = np.random.default_rng([seed, _SALT, step])
    classes, idx = rare_class.RareClassSampler(stats, rng).sample_many(
        batch_size)
    images = np.array(domain.images[idx], np.uint8)
    labels = np.array(domain.labels[idx], np.uint8)
    if crop is not None:
      out_i, out_l = [], []
      for b in range(batch_size):
        y, x = _crop(rng, labels[b], int(classes[b]), crop, threshold)
        out_i.append(images[b, y:y + crop[0], x:x + crop[1]])
        out_l.append(labels[b, y:y + crop[0], x:x + crop[1]])
      images, labels = np.stack(out_i), np.stack(out_l)
    batch = {}
    if config.data.flip:
      flipped = rng.random(batch_size) < 0.5
      images[flipped] = images[flipped, :, ::-1]
      labels[flipped] = labels[flipped, :, ::-1]
      batch["flipped"] = flipped
    batch["image"] = pipeline.normalize(images, config.data.normalization)
    batch["label"] = labels.astype(np.int32)
    batch["index"] = idx.astype(np.int32)
    yield batch
    step += 1
