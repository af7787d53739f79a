"""The splits a run reads, loaded from ``config.source`` / ``config.target``.

Shared by the segmentation and classification tasks: which splits load (and
whether target training labels do) depends only on the method's facts.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jaxda import parallel
from jaxda.data import pipeline
from jaxda.models import forward

# config.eval.batch_size = AUTO: sized to the device (``eval_batch_size``).
AUTO = 0
# Auto never exceeds this many images per device (diminishing returns).
AUTO_MAX_PER_DEVICE = 64
# Share of the device's bytes_limit an inference pass may use (the state,
# allocator fragmentation and the next batch's transfer need the rest).
AUTO_MEMORY_FRACTION = 0.6
_AUTO_CACHE: dict[tuple, int | None] = {}
_COST_FNS: dict[tuple, tuple] = {}  # models kept alive: ids stay unique


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
            "resize_mismatched_labels", False),
        # Train splits only: the originals' image lists (CRST: 505 images).
        list_file=(domain_cfg.get("list_file", "") or None)
        if split == "train" else None)

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


def eval_batch_size(run, *, bytes_limit: int | None = None) -> int:
  """The global batch of evaluation and pseudo-labelling passes.

  ``config.eval.batch_size`` > 0: that, rounded down to the devices (at
  least one image per device). ``0`` (``AUTO``, the default): where the
  backend reports device memory (GPU/TPU ``bytes_limit``, or
  ``bytes_limit`` given), the largest batch whose compiled inference
  forward fits ``AUTO_MEMORY_FRACTION`` of it (``fitting_batch_size``,
  at most ``AUTO_MAX_PER_DEVICE`` per device); on CPU, which reports none,
  ``config.eval.host_batch_size`` (host RAM is the limit there).
  """
  n = run.mesh.devices.size
  size = int(run.config.eval.batch_size)
  if size == AUTO:
    limit = (parallel.device_memory_bytes(run.mesh) if bytes_limit is None
             else int(bytes_limit))
    size = None
    if limit is not None:
      shape = eval_image_size(run)
      key = (id(run.models), n, limit, shape)
      if key not in _AUTO_CACHE:
        _AUTO_CACHE[key] = fitting_batch_size(
            inference_bytes_fn(run, shape), n,
            int(limit * AUTO_MEMORY_FRACTION))
      size = _AUTO_CACHE[key]
    if size is None:
      size = int(run.config.eval.get("host_batch_size", 32))
  return max(n, (size // n) * n)


def eval_image_size(run) -> tuple[int, int]:
  """``(H, W)`` of the images a pass feeds: the target val images' own
  size where loaded as an array, else the target's configured size."""
  shape = getattr(run.data.get("target_val"), "images", None)
  shape = getattr(shape, "shape", None)
  if shape is not None and len(shape) == 4:
    return int(shape[1]), int(shape[2])
  return domain_size(run.config, "target")


def inference_bytes_fn(run, size: tuple[int, int]
                       ) -> Callable[[int], int | None]:
  """``bytes(global_batch)``: per-device bytes of the compiled inference
  forward (running BN statistics) on ``(batch, *size, 3)`` images.

  The network of ``run.models`` (segmenter or classifier); dense outputs
  (a dict of levels) are upsampled to ``size`` and softmaxed in float32,
  as the evaluation and pseudo-label passes do. Abstract shapes only:
  nothing is allocated. Memoised per (models, devices, size) and batch.
  """
  key = (id(run.models), run.mesh.devices.size, tuple(size))
  if key not in _COST_FNS:
    _COST_FNS[key] = (run.models, _inference_bytes_fn(run, tuple(size)))
  return _COST_FNS[key][1]


def _inference_bytes_fn(run, size):
  net = getattr(run.models, "segmenter", None)
  if net is None:
    net = run.models.classifier
  key = jax.random.key(0)
  params, stats, _ = jax.eval_shape(
      lambda: run.task.init_variables(run, key))
  variables = {"params": params, "batch_stats": stats}
  align = bool(run.config.model.get("upsample_align_corners", False))

  def infer(variables, images):
    out = net.apply(variables, images, train_bn=False)
    if isinstance(out, dict):
      up = forward.upsample_outputs({"main": out["main"]}, size,
                                    align_corners=align)["main"]
      out = jax.nn.softmax(up.astype(jnp.float32), axis=-1)
    return out

  jitted = jax.jit(infer, in_shardings=(parallel.replicated(run.mesh),
                                        parallel.batch_sharded(run.mesh)),
                   out_shardings=parallel.batch_sharded(run.mesh))

  known: dict[int, int | None] = {}

  def cost(batch: int) -> int | None:
    if batch not in known:
      images = jax.ShapeDtypeStruct((batch, *size, 3), jnp.float32)
      known[batch] = parallel.compiled_bytes(
          jitted.lower(variables, images).compile())
    return known[batch]

  return cost


def fitting_batch_size(cost: Callable[[int], int | None], num_devices: int,
                       budget: int,
                       max_per_device: int = AUTO_MAX_PER_DEVICE
                       ) -> int | None:
  """The largest ``k * num_devices`` (k <= ``max_per_device``) with
  ``cost(batch) <= budget``; None if ``cost`` cannot tell.

  Memory grows about linearly in the batch, so two compiles (k = 1, 2)
  give the estimate and a few more confirm it (k shrinks by a quarter
  until it fits): a handful of compiles, not one per candidate.
  At least one image per device even if that does not fit.
  """
  known: dict[int, int | None] = {}

  def bytes_at(k):
    if k not in known:
      known[k] = cost(k * num_devices)
    return known[k]

  def fits(k):
    b = bytes_at(k)
    return b is not None and b <= budget

  if bytes_at(1) is None:
    return None
  if max_per_device <= 1 or not fits(1):
    return num_devices
  if bytes_at(2) is None or not fits(2):
    return num_devices
  per = max(1, bytes_at(2) - bytes_at(1))
  fixed = bytes_at(1) - per
  k = int(min(max_per_device, max(2, (budget - fixed) // per)))
  while k > 2 and not fits(k):
    k = max(2, (k * 3) // 4)
  return k * num_devices
