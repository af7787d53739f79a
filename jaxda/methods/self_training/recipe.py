"""The CBST / CRST recipe around the round driver (METHODS.md §6.2-§6.6).

Each piece is a ``config.self_training`` field whose default leaves a run
as it was (the embedded benchmark's results do not move); the ``paper``
presets set the originals' values (experiments/configs/tpld.py):

* ``source_portion`` / ``source_portion_step`` / ``source_portion_max`` /
  ``source_sampling``: each round trains on a random subset of the source
  images (CRST 3% + 0.25 points a round, at most 6%, redrawn each round;
  1.0 = all). The subset is a function of (seed, round): a resumed round
  trains on the same images (``round_source``).
* ``score_scales`` / ``score_flip``: the pseudo-labelling pass scores the
  target images at these input scales (and mirrored), averaging the
  softmax outputs at the image size (CRST: 0.9 x flip, §6.3 step 1).
* ``mine_chance`` / ``mine_port`` / ``rare_cls_num``: rare-class mining
  (§6.5): classes predicted on < ``mine_port`` of the target pixels are
  mined; with probability ``mine_chance`` a target example's crop is
  centred on a random pixel of a random mined class its pseudo labels hold
  (``round_batches``); 0 = off.
* ``spatial_prior`` ('' | 'source' | a .npy / .mat file),
  ``spatial_prior_smoothing``, ``spatial_prior_renormalize``: CBST-SP
  (§6.4): the probabilities are multiplied by a per-location class prior
  before the thresholds and the selection.
* ``target_loss = 'lrent'`` with ``lrent_alpha``: CRST-LRENT soft labels
  (§6.2); they are stored as float16 memory-mapped files next to the round's
  labels (``pseudo_labels/round_<r>_soft_p<process>.npy``), read a batch at
  a time.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxda import parallel
from jaxda.data import augment
from jaxda.data import pipeline
from jaxda.methods.self_training import recipe_math
from jaxda.methods.self_training import target_statistics
from jaxda.tasks import evaluation
from jaxda.train import loop as train_loop
from jaxda.train.exceptions import ConfigError

# Histogram floor of prior x softmax scores (they go below 1/C).
PRIOR_FLOOR = 1e-6
_MINE_SALT = 0x6D696E65  # Mining draws apart from the pipeline's streams.
_TARGET_LOSSES = ("bootstrap", "ce", "lrent")


def _get(st, name, default):
  return st.get(name, default)


def problems(config) -> list[str]:
  """The recipe fields' invalid values, one line each."""
  st = config.self_training
  out = []
  init = float(_get(st, "source_portion", 1.0))
  step = float(_get(st, "source_portion_step", 0.0))
  top = float(_get(st, "source_portion_max", 1.0))
  if not (0 < init <= 1 and 0 < top <= 1 and step >= 0 and top >= init):
    out.append("self_training.source_portion / source_portion_max must be"
               " in (0, 1] with max >= source_portion, source_portion_step"
               f" >= 0; got {init}, {top}, {step}")
  if _get(st, "bootstrap_apply_to", "labeled") not in ("labeled", "all"):
    out.append("self_training.bootstrap_apply_to must be 'labeled' or 'all',"
               f" got {st.bootstrap_apply_to!r}")
  if _get(st, "confidence_count", "argmax") not in ("argmax", "pseudo"):
    out.append("self_training.confidence_count must be 'argmax' or 'pseudo',"
               f" got {st.confidence_count!r}")
  decay = float(_get(st, "round_lr_decay", 1.0))
  if not 0 < decay <= 1:
    out.append(f"self_training.round_lr_decay must be in (0, 1], got {decay}")
  policy = _get(st, "source_sampling", "redraw")
  if policy not in recipe_math.SOURCE_POLICIES:
    out.append(f"self_training.source_sampling must be one of"
               f" {recipe_math.SOURCE_POLICIES}, got {policy!r}")
  scales = tuple(_get(st, "score_scales", (1.0,)))
  if not scales or not all(float(s) > 0 for s in scales):
    out.append(f"self_training.score_scales must be positive, got {scales}")
  if not 0 <= float(_get(st, "mine_chance", 0.0)) <= 1:
    out.append("self_training.mine_chance must be in [0, 1]")
  if not 0 <= float(_get(st, "mine_port", 1e-3)) <= 1:
    out.append("self_training.mine_port must be in [0, 1]")
  if int(_get(st, "rare_cls_num", 3)) < 0:
    out.append("self_training.rare_cls_num must be >= 0")
  prior = _get(st, "spatial_prior", "")
  if prior not in ("", "source") and not os.path.isfile(prior):
    out.append(f"self_training.spatial_prior={prior!r}: use '', 'source'"
               " or an existing .npy / .mat file")
  if float(_get(st, "spatial_prior_smoothing", 1.0)) < 0:
    out.append("self_training.spatial_prior_smoothing must be >= 0")
  if st.target_loss not in _TARGET_LOSSES:
    out.append(f"self_training.target_loss must be one of {_TARGET_LOSSES},"
               f" got {st.target_loss!r}")
  if st.target_loss == "lrent":
    if float(_get(st, "lrent_alpha", 0.25)) <= 0:
      out.append("self_training.lrent_alpha must be > 0")
    if st.voting:
      out.append("self_training.target_loss='lrent' (soft labels) cannot be"
                 " densified by voting; set self_training.voting=False")
  return out + target_statistics.problems(config)


def check(config) -> None:
  """Raises the first of ``problems`` as a one-line ``ConfigError``."""
  found = problems(config)
  if found:
    raise ConfigError(found[0])


# --------------------------------------------------------------------------
# Scoring: views, probabilities, spatial prior
# --------------------------------------------------------------------------


def round_schedule(config, steps_per_round: int):
  """``config`` whose optimiser multiplies the LR by ``round_lr_decay`` at
  each new round (CBST's MXNet recipe: ÷√2; the base model, made before,
  keeps its own schedule). The rounds share one optimiser whose count starts
  at 0 at round 0, so round r trains at ``decay ** r`` x LR."""
  decay = float(_get(config.self_training, "round_lr_decay", 1.0))
  if decay != 1.0:
    config.optim.decay_every = int(steps_per_round)
    config.optim.decay_factor = decay
  return config


def views(config) -> tuple[tuple[float, bool], ...]:
  """``(scale, mirrored)`` of every scoring view, in order."""
  st = config.self_training
  flips = (False, True) if _get(st, "score_flip", False) else (False,)
  return tuple((float(s), f) for s in _get(st, "score_scales", (1.0,))
               for f in flips)


def single_view(config) -> bool:
  """True for the plain pass (one view at scale 1, not mirrored)."""
  return views(config) == ((1.0, False),)


def make_view_logits(run):
  """Jitted ``fn(state, images) -> tuple`` of each view's output-stride
  logits (a mirrored view's logits are left mirrored)."""
  logits_fn = evaluation.make_logits_fn(run.models,
                                        bn_mode=run.config.model.bn_mode)
  spec = views(run.config)

  def fn(state, images):
    b, h, w, c = images.shape
    out = []
    for scale, mirrored in spec:
      x = images if scale == 1.0 else jax.image.resize(
          images, (b,) + recipe_math.scaled_size((h, w), scale) + (c,),
          "bilinear")
      out.append(logits_fn(state, x[:, :, ::-1] if mirrored else x))
    return tuple(out)

  return parallel.jit_inference(fn, run.mesh)


def make_view_probs(run, size):
  """Jitted ``fn(view logits) -> (B, *size, C)`` softmax averaged over the
  views (each upsampled to ``size``, mirrored views mirrored back)."""
  spec = views(run.config)
  align = run.config.model.upsample_align_corners

  def fn(logits):
    total = 0.0
    for (_, mirrored), x in zip(spec, logits):
      p = evaluation.probs_from_logits(x, tuple(size), align_corners=align)
      total = total + (p[:, :, ::-1] if mirrored else p)
    return total / len(spec)

  return jax.jit(fn)


def _read_prior_file(path: str, num_classes: int) -> np.ndarray:
  if path.endswith(".mat"):
    from scipy import io as scipy_io  # pylint: disable=g-import-not-at-top
    mat = scipy_io.loadmat(path)
    keys = [k for k in mat if not k.startswith("__")]
    prior = mat["prior_array"] if "prior_array" in mat else mat[keys[0]]
  else:
    prior = np.load(path)
  prior = np.asarray(prior, np.float32)
  if prior.ndim == 3 and prior.shape[0] == num_classes and (
      prior.shape[-1] != num_classes):
    prior = prior.transpose(1, 2, 0)  # (C, H, W), as prior_array.mat
  if prior.ndim != 3 or prior.shape[-1] != num_classes:
    raise ConfigError(f"self_training.spatial_prior {path}: expected a"
                      f" (H, W, {num_classes}) or ({num_classes}, H, W) array,"
                      f" got shape {prior.shape}")
  return prior


def source_prior_counts(run) -> np.ndarray:
  """(H, W, C) class counts per location over the source train labels at
  their training size (summed over processes), cached in the workdir."""
  path = run.path("spatial_prior_counts.npy")
  if os.path.exists(path):
    return np.load(path)
  labels = run.data["source_train"].labels
  if labels is None or np.ndim(labels) != 3:
    raise ConfigError("self_training.spatial_prior='source' needs source"
                      " label maps")
  counts = 0
  for i in range(0, len(labels), 16):  # bounded memory for lazy real data
    counts = counts + recipe_math.spatial_prior_counts(
        np.asarray(labels[i:i + 16]), run.num_classes)
  counts = parallel.sum_over_processes(np.asarray(counts, np.int64))
  if run.is_main:
    np.save(path + ".tmp.npy", counts)
    os.replace(path + ".tmp.npy", path)
  return counts


def load_spatial_prior(run, size) -> jax.Array | None:
  """The (H, W, C) prior at ``size``, or None when off."""
  st = run.config.self_training
  spec = _get(st, "spatial_prior", "")
  if not spec:
    return None
  if spec == "source":
    prior = recipe_math.spatial_prior(
        source_prior_counts(run), float(_get(st, "spatial_prior_smoothing",
                                             1.0)))
  else:
    prior = _read_prior_file(spec, run.num_classes)
  return recipe_math.resize_prior(prior, size)


def make_prior_fn(run, prior):
  """Jitted ``probs -> prior x probs`` (None without a prior)."""
  if prior is None:
    return None
  renorm = bool(_get(run.config.self_training, "spatial_prior_renormalize",
                     False))
  return jax.jit(lambda p: recipe_math.apply_spatial_prior(p, prior, renorm))


def histogram_floor(config):
  """The threshold histogram's floor: None (1/C), or ``PRIOR_FLOOR`` under a
  spatial prior."""
  return PRIOR_FLOOR if _get(config.self_training, "spatial_prior", "") \
      else None


_count_predictions = jax.jit(
    lambda p, valid: jnp.zeros(p.shape[-1], jnp.int32).at[
        jnp.argmax(p, -1).reshape(-1)].add(valid.reshape(-1).astype(
            jnp.int32)))


def count_predictions(scores, valid):
  """(C,) argmax counts of valid pixels (device; summed by XLA)."""
  return _count_predictions(scores, valid)


def mining_ids(config, pred_counts) -> dict:
  """``{'rare_ids', 'mine_ids'}`` (class ids, lists) from argmax counts."""
  st = config.self_training
  rare, mine = recipe_math.rare_class_ids(
      pred_counts, float(_get(st, "mine_port", 1e-3)),
      int(_get(st, "rare_cls_num", 3)))
  return {"rare_ids": rare.tolist(), "mine_ids": mine.tolist()}


# --------------------------------------------------------------------------
# Source portion and rare-class mining: the round's batches
# --------------------------------------------------------------------------


def _take(array, rows):
  take = getattr(array, "take_rows", None)
  return take(rows) if take is not None else np.asarray(array)[rows]


def round_source(run, r: int):
  """``(run, info)``: ``run`` with round ``r``'s source subset (itself when
  the portion is 1 or the method reads no source) and ``{'source_portion',
  'num_source_images'}`` (None when every image is used)."""
  st = run.config.self_training
  portion = recipe_math.source_portion(
      r, float(_get(st, "source_portion", 1.0)),
      float(_get(st, "source_portion_step", 0.0)),
      float(_get(st, "source_portion_max", 1.0)))
  domain = run.data.get("source_train")
  if domain is None or portion >= 1.0:
    return run, None
  rows = recipe_math.source_rows(
      len(domain.images), portion,
      seed=parallel.process_seed(run.config.seed), round_index=r,
      policy=_get(st, "source_sampling", "redraw"))
  subset = pipeline.Domain(
      _take(domain.images, rows),
      None if domain.labels is None else _take(domain.labels, rows),
      domain.class_names)
  info = {"source_portion": float(portion), "num_source_images": int(
      parallel.sum_over_processes(np.asarray(len(rows))))}
  return dataclasses.replace(run, data=dict(run.data,
                                            source_train=subset)), info


def mined_scale_crop(batches, *, seed: int, start_step: int, data_cfg,
                     mine_ids, chance: float, label_key: str = "pl_label"):
  """``augment.scale_crop_batches`` whose crop, with probability
  ``chance`` per example, is centred on a random pixel of a random mined
  class in the example's ``label_key`` map (§6.5). Draws depend on (seed,
  step) only."""
  crop_size = (int(data_cfg.get("crop_height", 0)),
               int(data_cfg.get("crop_width", 0)))
  crop_size = crop_size if all(crop_size) else None
  step = start_step
  for batch in batches:
    n, height, width = batch["image"].shape[:3]
    crop = crop_size or (height, width)
    rng = np.random.default_rng([seed, _MINE_SALT, step])
    scales = augment.draw_scales(
        rng, n, float(data_cfg.get("scale_min", 1.0)),
        float(data_cfg.get("scale_max", 1.0)),
        float(data_cfg.get("scale_step", 0.0)))
    offsets = rng.random((n, 2))
    for i in range(n):
      if rng.random() < chance:
        hit = recipe_math.mine_pixel(batch[label_key][i], mine_ids, rng)
        if hit is not None:
          offsets[i] = recipe_math.centred_crop_offset(
              hit[1:], (height, width), scales[i], crop)
    spatial = [k for k, v in batch.items()
               if isinstance(v, np.ndarray) and v.ndim >= 3
               and v.shape[1:3] == (height, width)]
    fill = {k: (255 if k != "image" and batch[k].dtype.kind in "iu" else 0)
            for k in spatial}
    outs = [augment.scale_crop_example({k: batch[k][i] for k in spatial},
                                       scales[i], crop, offsets[i], fill)
            for i in range(n)]
    new = dict(batch)
    for k in spatial:
      new[k] = np.stack([o[k] for o in outs])
    yield new
    step += 1


def _without_scale_crop(config) -> ml_collections.ConfigDict:
  plain = ml_collections.ConfigDict(config.to_dict())
  plain.data.scale_min = plain.data.scale_max = 1.0
  plain.data.crop_height = plain.data.crop_width = 0
  return plain


def round_batches(run, begin: int, extras: dict, mine_ids):
  """The round's paired batches: ``train_loop.paired_batches``, or with
  mining on (``mine_chance`` > 0 and mined classes) the same source stream
  and a target stream whose scale / crop is ``mined_scale_crop``'s."""
  chance = float(_get(run.config.self_training, "mine_chance", 0.0))
  if not chance or mine_ids is None or not len(mine_ids):
    return train_loop.paired_batches(run, begin, target_extras=extras)
  source = None
  if "source_train" in run.data:
    source = train_loop.paired_batches(dataclasses.replace(
        run, data={"source_train": run.data["source_train"]}), begin)
  target = train_loop.paired_batches(dataclasses.replace(
      run, config=_without_scale_crop(run.config),
      data={"target_train": run.data["target_train"]}), begin,
                                     target_extras=extras)
  mined = mined_scale_crop(
      (b["target"] for b in target),
      seed=parallel.process_seed(run.config.seed * 2 + 2), start_step=begin,
      data_cfg=run.config.data, mine_ids=list(mine_ids), chance=chance)

  def paired():
    while True:
      batch = {"target": next(mined)}
      if source is not None:
        batch["source"] = next(source)["source"]
      yield batch

  size = int(run.config.data.get("prefetch", 2))
  return pipeline.prefetch(paired(), size) if size > 0 else paired()


# --------------------------------------------------------------------------
# LRENT soft labels on disk
# --------------------------------------------------------------------------


def soft_path(run, r: int) -> str:
  return run.path("pseudo_labels",
                  f"round_{r}_soft_p{jax.process_index()}.npy")


class SoftLabelWriter:
  """Writes this process's (N, H, W, C) float16 soft labels row block by
  row block into a memory-mapped .npy (renamed into place on ``close``)."""

  def __init__(self, path: str, num_rows: int):
    self.path, self.num_rows, self.filled, self.array = path, num_rows, 0, None

  def add(self, rows: np.ndarray) -> None:
    if self.array is None:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      self.array = np.lib.format.open_memmap(
          self.path + ".tmp.npy", mode="w+", dtype=np.float16,
          shape=(self.num_rows,) + rows.shape[1:])
    self.array[self.filled:self.filled + len(rows)] = rows
    self.filled += len(rows)

  def close(self) -> None:
    if self.array is None:
      return
    self.array.flush()
    del self.array
    os.replace(self.path + ".tmp.npy", self.path)


def load_soft(run, r: int):
  """This process's round-``r`` soft labels (read-only memmap) or None."""
  path = soft_path(run, r)
  return np.load(path, mmap_mode="r") if os.path.exists(path) else None
