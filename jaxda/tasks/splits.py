"""The splits a run reads, loaded from ``config.source`` / ``config.target``.

Shared by the segmentation and classification tasks: which splits load (and
whether target training labels do) depends only on the method's facts.
"""

from __future__ import annotations

import dataclasses

from jaxda import parallel
from jaxda.data import pipeline


def domain_size(config, role: str) -> tuple[int, int]:
  """``(height, width)`` of ``role``'s images: ``config.<role>.height/width``
  where set (> 0), else the shared ``config.data`` size."""
  cfg = config[role]
  return (int(cfg.get("height", 0) or config.data.height),
          int(cfg.get("width", 0) or config.data.width))


def load_data(config, method) -> dict[str, pipeline.Domain]:
  """Loads the splits the method needs; target train labels only if allowed.

  An unsupervised method never gets target training labels: the target
  ``train`` split is loaded with ``require_labels=False`` and its labels are
  dropped, whatever the directory holds.

  Each domain loads at its own size (``domain_size``: the originals train
  GTA5 at 720x1280 and Cityscapes at 512x1024), target val at the target's.

  Returns:
    ``{'target_val', 'source_train'?, 'target_train'?}``, this process's
    share of each.
  """

  def load(role, split, require_labels, num_images):
    domain_cfg = config[role]
    height, width = domain_size(config, role)
    return pipeline.load_domain(
        domain_cfg.name, role=role, data_dir=domain_cfg.data_dir or None,
        split=split, height=height, width=width, num_images=num_images,
        seed=config.data.seed, require_labels=require_labels,
        resize_mismatched_labels=config.data.get(
            "resize_mismatched_labels", False))

  data = {}
  if method.uses_source_images:
    data["source_train"] = load("source", "train", True,
                                config.data.num_train_images)
  if method.uses_target_images:
    gt = method.target_labels == "ground_truth"
    target = load("target", "train", gt, config.data.num_train_images)
    if not gt:
      target = dataclasses.replace(target, labels=None)
    data["target_train"] = target
  data["target_val"] = load("target", "val", True, config.data.num_val_images)
  for name, d in data.items():
    if len(d.images) == 0:
      raise pipeline.DataError(
          f"{name} is empty; check config.{name.split('_')[0]}.data_dir")
  names = {tuple(d.class_names) for d in data.values()}
  if len(names) != 1:
    raise pipeline.DataError(
        f"source and target class lists differ: {sorted(names)}; both domains"
        " must share one label space (classes.txt)")
  # Each process keeps only its contiguous share of every split (all of it
  # in a single process); batches and passes never touch the others' rows.
  return {name: process_share(d) for name, d in data.items()}


def process_share(domain: pipeline.Domain) -> pipeline.Domain:
  """The rows of ``domain`` this process owns (``parallel.process_shard``)."""
  rows = parallel.process_shard(len(domain.images))
  return dataclasses.replace(
      domain, images=domain.images[rows],
      labels=None if domain.labels is None else domain.labels[rows])


def eval_batch_size(run) -> int:
  """``config.eval.batch_size`` rounded down to the devices (at least one
  image per device)."""
  n = run.mesh.devices.size
  return max(n, (run.config.eval.batch_size // n) * n)
