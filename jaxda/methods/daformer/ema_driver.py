"""Run driver of DAFormer / MIC: network, optimiser, teacher state, loop.

The shared loop (``jaxda.train.loop``) does the rest; this module swaps in
what the method needs before the first step:

* **Network** (``config.daformer.network``): ``''`` keeps the task's
  DeepLab-v2 segmenter (``config.model.name``; the papers report it too);
  a MiT name (``mit_b0`` .. ``mit_b5``, ``mit_tiny``) builds the SegFormer
  MiT encoder with the DAFormer head (``jaxda.models.mit.DAFormer``).
  ``config.daformer.hrda`` wraps either in ``jaxda.models.hrda.HRDA``
  (scale-attention head ``head_att``, sliding-window inference;
  ``hrda_step.wrap``).
* **Optimiser** (``config.daformer.optimizer``): ``'adamw'`` is DAFormer's
  AdamW with parameter groups (head LR x ``optim.head_lr_mult``, no decay
  on norms / position blocks) and linear warm-up + poly decay
  (``schedule.poly_warmup_schedule``); ``'task'`` keeps config.optim's.
* **State**: ``TeacherTrainState``, the loop's ``TrainState`` plus the EMA
  teacher (``teacher``) and the frozen ImageNet encoder of the feature
  distance (``frozen``), so checkpoints and resume keep them. A fresh run
  (scratch, ``init_weights`` or ``init_checkpoint``) starts the teacher as a
  copy of the student.
* **Rare-class sampling** (``config.daformer.rcs``) replaces the source
  batch stream (``rare_class_batches``).
* **Pictures**: the debug grid (``debug_grid``) every
  ``daformer.debug_every`` steps and at the end.

``build_models`` and ``create_state`` are the hooks a lowering check calls
(as GAM's driver offers them).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxda import models as models_lib
from jaxda import optim
from jaxda import parallel
from jaxda import state as state_lib
from jaxda.data import augment
from jaxda.data import pipeline
from jaxda.methods import base
from jaxda.methods.daformer import debug_grid
from jaxda.methods.daformer import ema_step
from jaxda.methods.daformer import hrda_step
from jaxda.methods.daformer import rare_class_batches
from jaxda.methods.daformer import schedule
from jaxda.models import forward as forward_lib
from jaxda.models import mit
from jaxda.tasks import segmentation
from jaxda.tasks import splits
from jaxda.train import loop as train_loop
from jaxda.train.exceptions import ConfigError

FROZEN = "frozen"
MIT_NETWORKS = tuple(mit.MIT_VARIANTS)


@flax.struct.dataclass
class TeacherTrainState(state_lib.TrainState):
  """``TrainState`` plus the networks no optimiser updates.

  A subclass, so the other methods' pytrees and checkpoints are unchanged.

  Attributes:
    teacher: EMA parameters (``params``' structure), updated by the step.
    frozen: ``{'encoder': params}`` of the frozen ImageNet encoder (feature
      distance), or ``{}``.
  """
  teacher: Any = flax.struct.field(default_factory=dict)
  frozen: Any = flax.struct.field(default_factory=dict)


# --------------------------------------------------------------------------
# Config checks
# --------------------------------------------------------------------------


def train_size(config, role: str) -> tuple[int, int]:
  """``(h, w)`` of ``role``'s training batches (the crop, if one is set)."""
  crop = (int(config.data.get("crop_height", 0)),
          int(config.data.get("crop_width", 0)))
  return crop if all(crop) else splits.domain_size(config, role)


def config_problems(config) -> list[str]:
  """Invalid DAFormer / MIC config values, one line each."""
  d = config.daformer
  problems = ema_step.config_problems(config)

  def need(cond, msg):
    if not cond:
      problems.append(msg)

  need(d.network in ("",) + MIT_NETWORKS,
       f"config.daformer.network must be '' (config.model.name) or one of"
       f" {MIT_NETWORKS}, got {d.network!r}")
  need(d.optimizer in ("adamw", "task"),
       f"config.daformer.optimizer must be 'adamw' or 'task', got"
       f" {d.optimizer!r}")
  need(d.fd_lambda == 0 or d.network in MIT_NETWORKS,
       "config.daformer.fd_lambda > 0 needs a MiT network"
       " (config.daformer.network=mit_b5 ...): DeepLab-v2 has no bottleneck"
       " feature output here")
  need(d.warmup_steps >= 0 and 0.0 <= d.warmup_ratio <= 1.0,
       "config.daformer.warmup_steps must be >= 0 and warmup_ratio in [0, 1]")
  need(d.debug_every >= -1,
       "config.daformer.debug_every must be >= 0, or -1 for no pictures")
  src, tgt = train_size(config, "source"), train_size(config, "target")
  need(src == tgt,
       f"ClassMix pastes source pixels onto target images, so both domains"
       f" must train at one size: source {src[0]}x{src[1]}, target"
       f" {tgt[0]}x{tgt[1]}; set config.data.crop_height/width or equal"
       " config.source/target.height/width")
  need(d.mask_lambda == 0 or d.mask_block <= min(tgt),
       f"config.daformer.mask_block ({d.mask_block}) must be at most the"
       f" training size {tgt[0]}x{tgt[1]}")
  problems += rare_class_batches.config_problems(config)
  problems += hrda_step.config_problems(config)
  return problems


# --------------------------------------------------------------------------
# Network, optimiser, state
# --------------------------------------------------------------------------


def make_network(config, num_classes: int):
  """The MiT + DAFormer head of ``config.daformer.network``."""
  d = config.daformer
  dtype = forward_lib.precision_options(config)["dtype"]
  return mit.DAFormer(num_classes=num_classes, variant=d.network,
                      embed_dim=int(d.decoder_dim),
                      drop_path_rate=float(d.drop_path_rate),
                      dropout=float(d.dropout), dtype=dtype,
                      remat=bool(config.model.get("remat", False)))


def frozen_regexes(config) -> list[str]:
  """Parameter-path regexes never updated: the task's rules for DeepLab-v2
  (BatchNorm affine, dead ASPP branches), ``optim.frozen_regexes`` for MiT
  (DAFormer trains every parameter)."""
  if config.daformer.network in MIT_NETWORKS:
    return list(config.optim.frozen_regexes)
  frozen = base.frozen_regexes(config)
  used = int(config.model.aspp_branches_used)
  if config.daformer.hrda and used < 4:  # HRDA's attention ASPP alike
    frozen.append(rf"^head_att/branch_({'|'.join(map(str, range(used, 4)))})/")
  return frozen


def group_rules(config) -> tuple[tuple[str, str], ...]:
  """``(regex, group)`` rules of the AdamW parameter groups (first match)."""
  if config.daformer.network in MIT_NETWORKS:  # mmcv's custom_keys order
    return (("pos_block", schedule.NO_DECAY), ("head", schedule.HEAD),
            ("norm", schedule.NO_DECAY))
  return ((models_lib.head_param_regex, schedule.HEAD),
          (r"^head_att/", schedule.HEAD),  # HRDA's scale attention
          (models_lib.batchnorm_param_regex, schedule.NO_DECAY))


def make_tx(config) -> tuple[optax.GradientTransformation, Any]:
  """DAFormer's AdamW: groups ``head`` (LR x ``head_lr_mult``), ``no_decay``,
  ``default`` and ``frozen`` (never updated); warm-up + poly per group.

  Returns:
    ``(tx, labels_fn)`` as ``optim.make_segmenter_tx``.
  """
  d, o = config.daformer, config.optim
  steps = segmentation.schedule_steps(config)
  frozen = frozen_regexes(config)
  rules = group_rules(config)

  def adamw(mult, weight_decay):
    sched = schedule.poly_warmup_schedule(
        float(o.learning_rate) * mult, max_steps=steps,
        warmup_steps=int(d.warmup_steps), warmup_ratio=float(d.warmup_ratio),
        power=float(o.power))
    return optax.adamw(sched, b1=float(d.adam_b1), b2=float(d.adam_b2),
                       weight_decay=weight_decay)

  def labels_fn(params):
    groups = schedule.param_group_labels(params, rules)
    is_frozen = optim.path_mask(params, frozen)
    return jax.tree.map(lambda g, f: FROZEN if f else g, groups, is_frozen)

  wd = float(o.weight_decay)
  tx = optax.multi_transform(
      {schedule.HEAD: adamw(float(o.head_lr_mult), wd),
       schedule.NO_DECAY: adamw(1.0, 0.0),
       schedule.DEFAULT: adamw(1.0, wd),
       FROZEN: optax.set_to_zero()}, labels_fn)
  return optim.accumulate(tx, int(config.get("grad_accum_steps", 1))), labels_fn


def build_models(run: train_loop.Run) -> train_loop.Run:
  """The run with the configured network and optimiser swapped in."""
  config = run.config
  models, tx, labels_fn = run.models, run.tx, run.labels_fn
  if config.daformer.network in MIT_NETWORKS:
    models = dataclasses.replace(
        models, segmenter=make_network(config, run.num_classes))
  if config.daformer.hrda:
    models = dataclasses.replace(
        models, segmenter=hrda_step.wrap(config, models.segmenter))
  if config.daformer.optimizer == "adamw":
    tx, labels_fn = make_tx(config)
  return dataclasses.replace(run, models=models, tx=tx, labels_fn=labels_fn)


def _copies(state, config):
  """``(teacher, frozen)`` as fresh copies of the student's parameters
  (separate buffers: the step donates the state)."""
  teacher = jax.tree.map(jnp.copy, state.params)
  frozen = {}
  if config.daformer.fd_lambda > 0:
    frozen = {"encoder": jax.tree.map(jnp.copy, state.params["encoder"])}
  return teacher, frozen


def create_state(run: train_loop.Run) -> TeacherTrainState:
  """Initial state from ``config.seed``, the teacher a copy of the student
  (replicated on the mesh)."""
  key = jax.random.key(run.config.seed)

  def init():
    params, stats, disc_params = run.task.init_variables(run, key)
    state = TeacherTrainState.create(
        params=params, batch_stats=stats, tx=run.tx, disc_params=disc_params,
        disc_tx=run.disc_tx)
    teacher, frozen = _copies(state, run.config)
    return state.replace(teacher=teacher, frozen=frozen)

  return parallel.init_replicated(init, run.mesh)


def init_or_restore(run: train_loop.Run) -> tuple[TeacherTrainState, int]:
  """The loop's resume order (checkpoint, ``init_checkpoint``,
  ``init_weights``, scratch); a warm start restarts the teacher (and the
  frozen encoder) from the loaded student."""
  def restart_teacher(state):
    teacher, frozen = _copies(state, run.config)
    return state.replace(teacher=teacher, frozen=frozen)
  return train_loop.init_or_restore(run, create=create_state,
                                    on_warm_start=restart_teacher)


# --------------------------------------------------------------------------
# Batches and the run
# --------------------------------------------------------------------------


class _Recording:
  """An iterator that keeps the last host batch it handed out."""

  def __init__(self, it):
    self._it = it
    self.last = None

  def __iter__(self):
    return self

  def __next__(self):
    self.last = next(self._it)
    return self.last


def paired_batches(run: train_loop.Run, start: int):
  """The loop's paired batches, or with ``daformer.rcs`` a rare-class
  source stream beside the loop's target stream."""
  if not run.config.daformer.rcs:
    return train_loop.paired_batches(run, start)
  config = run.config
  bs = parallel.local_batch_size(config.batch_size)
  seed_t = parallel.process_seed(config.seed * 2 + 2)
  domain = run.data["target_train"]
  target = augment.from_config(
      pipeline.train_batches(domain.images, None, batch_size=bs, seed=seed_t,
                             start_step=start, flip=config.data.flip,
                             mode=config.data.normalization,
                             workers=config.data.get("decode_workers", 1)),
      config, seed=seed_t, start_step=start)
  stats = rare_class_batches.load_or_compute_stats(run)
  source = rare_class_batches.source_batches(
      run.data["source_train"], stats, config, batch_size=bs,
      seed=parallel.process_seed(config.seed * 2 + 1), start_step=start)

  def paired():
    while True:
      yield {"source": next(source), "target": next(target)}

  size = int(config.data.get("prefetch", 2))
  return pipeline.prefetch(paired(), size) if size > 0 else paired()


def _describe(run: train_loop.Run, state) -> str:
  c, d = run.config, run.config.daformer
  n = int(sum(np.size(x) for x in jax.tree.leaves(state.params)))
  network = (f"{d.network} + DAFormer head" if d.network in MIT_NETWORKS
             else c.model.name)
  mic = (f", MIC masks {d.mask_block} px x {d.mask_ratio:g}, lambda"
         f" {d.mask_lambda:g}" if d.mask_lambda > 0 else "")
  if d.hrda:
    seg = run.models.segmenter
    network = (f"HRDA({network}: context x{d.hrda_context_scale:g}, detail"
               f" {seg.detail_size[0]}x{seg.detail_size[1]}, windows stride"
               f" {seg.slide_stride[0]}x{seg.slide_stride[1]}, detail CE"
               f" x{d.hrda_hr_loss_weight:g})")
  return (f"{c.method}: {c.num_steps} steps, batch {c.batch_size} on"
          f" {run.mesh.devices.size} device(s), network {network},"
          f" {n / 1e6:.2f}M parameters, optimiser {d.optimizer}; EMA"
          f" {d.ema_alpha:g}, tau {d.pseudo_threshold:g}{mic}"
          f"{', rare-class sampling' if d.rcs else ''}; workdir"
          f" {os.path.abspath(run.workdir)}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       method: base.Method) -> dict[str, Any]:
  """Trains DAFormer / MIC for ``config.num_steps`` and evaluates it.

  Resumes automatically from ``workdir/checkpoints``.

  Returns:
    The summary dict also written to ``workdir/summary.json``.
  """
  for problem in config_problems(config):
    raise ConfigError(problem)
  run = build_models(train_loop.setup(config, workdir, method))
  try:
    train_loop.write_config(run)
    run.writer.write_hparams(config.to_dict())
    state, start = init_or_restore(run)
    run.log(_describe(run, state))
    if config.daformer.fd_lambda > 0 and not (
        config.model.get("init_weights") or config.model.init_checkpoint):
      run.log("  note: the feature distance pulls towards the initial"
              " encoder, which is random without config.model.init_weights")
    pictures: dict[str, str] = {}
    debug = debug_grid.Drawer(run)
    every = max(int(config.daformer.debug_every), 0)
    if start < config.num_steps:
      step_jit = train_loop.compile_step(run)
      batches = _Recording(paired_batches(run, start))
      step = start
      while step < config.num_steps:
        stop = config.num_steps
        if every:
          stop = min(stop, (step // every + 1) * every)
        state = train_loop.run_steps(run, state, step_jit, batches, step,
                                     stop)
        step = stop
        if every and step % every == 0 and step < config.num_steps:
          debug.draw(state, batches.last, step)
      if config.daformer.debug_every >= 0:
        pictures = debug.draw(state, batches.last, config.num_steps,
                              final=True)
    result = train_loop.evaluate_target(run, state, config.num_steps)
    return train_loop.finish(run, state, result,
                             extra={"debug_pictures": pictures})
  finally:
    train_loop.close(run)


# --------------------------------------------------------------------------
# Registry entries
# --------------------------------------------------------------------------


def _daformer_problems(config) -> list[str]:
  problems = config_problems(config)
  if config.daformer.mask_lambda > 0:
    problems.append("config.daformer.mask_lambda > 0 is MIC: run method"
                    " 'mic' (the daformer.py config's `mic` variant)")
  return problems


def _mic_problems(config) -> list[str]:
  problems = config_problems(config)
  if not config.daformer.mask_lambda > 0:
    problems.append("method 'mic' trains on masked target images: set"
                    " config.daformer.mask_lambda > 0 (MIC: 1)")
  return problems


DAFORMER = base.Method(name="daformer", make_step=ema_step.make_step,
                       config_problems=_daformer_problems,
                       driver=train_and_evaluate)
MIC = base.Method(name="mic", make_step=ema_step.make_step,
                  config_problems=_mic_problems, driver=train_and_evaluate)
