"""Anchor-task adaptation's driver: MTL variants, then HeadFreeze.

``train_and_evaluate(config, workdir)`` runs the method's task (``depth``,
``jaxda.tasks.depth``, or ``normals``, ``jaxda.tasks.normals``) through the shared loop (``jaxda.train.loop``:
set-up, data, checkpoints, logging, evaluation, summary) on one global step
counter, in up to two phases:

* phase 1, steps ``[0, N1)``: every parameter trains (BatchNorm affine
  parameters stay frozen, as in every jaxda run) on the weighted
  main/anchor terms of ``config.anchor.weights``;
* phase 2 (HeadFreeze), steps ``[N1, num_steps)``: a second optimiser whose
  ``optax.partition`` labels the late layers (``anchor.late_regexes``:
  decoder + heads by default) ``'frozen'`` (``optax.set_to_zero``), trained
  on ``anchor.phase2_weights``: the early layers learn the target anchor task
  under the cross-task guidance frozen in the late layers.

``anchor.phase2_steps = 0`` gives a single phase (plain MTL-src / MTL-SmTa /
MTL-a). A HeadFreeze run and the single-phase run of the same variant share
steps ``[0, N1)`` exactly (same optimiser, same LR schedule), so their
difference is phase 2 alone.

Phase 2 starts a fresh optimiser state (or, ``anchor.phase2_carry_moments``,
carries the early layers' moments); the LR continues the global poly
schedule unless ``anchor.phase2_learning_rate >= 0`` sets a new one.
Checkpoints up to step N1 hold the phase-1 optimiser state, later ones the
phase-2 state; resume restores each with its own structure, and the
transition is a function of the phase-1 parameters only, so a run resumed at
(or after) the boundary equals an uninterrupted one. The end-of-phase-1
evaluation is kept in ``phases.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

from jaxda import checkpoint as checkpoint_lib
from jaxda import parallel
from jaxda import state as state_lib
from jaxda.data import pipeline
from jaxda.methods import base
from jaxda.methods.anchor import multitask_step as anchor_steps
from jaxda.tasks import depth as depth_task
from jaxda.train import init_weights
from jaxda.train import loop as train_loop
from jaxda.train.exceptions import ConfigError

PHASES_FILE = "phases.json"


@dataclasses.dataclass
class AnchorRun:
  """A ``train_loop.Run`` plus HeadFreeze's second phase.

  Attributes:
    run: the shared run (its ``tx`` is the phase-1 optimiser).
    tx2: the phase-2 optimiser (late layers frozen), or None.
    labels_fn2: partition labels of ``tx2``.
    phase1_steps: N1 (= ``num_steps`` for a single-phase run).
    late_regexes: parameter-path regexes of the late layers.
  """
  run: train_loop.Run
  tx2: Any
  labels_fn2: Callable | None
  phase1_steps: int
  late_regexes: tuple[str, ...]
  main: Any = None  # depth_task.MainTask of the method (depth, normals)

  @property
  def two_phase(self) -> bool:
    return self.phase1_steps < self.run.config.num_steps


# --------------------------------------------------------------------------
# Config and set-up
# --------------------------------------------------------------------------


def phase1_steps(config) -> int:
  """N1 = ``num_steps - anchor.phase2_steps``, validated."""
  n2 = int(config.anchor.phase2_steps)
  if not 0 <= n2 < max(config.num_steps, 1):
    raise ConfigError(
        f"anchor.phase2_steps={n2} must be in [0, num_steps={config.num_steps})"
        "; 0 = a single phase (no HeadFreeze)")
  return int(config.num_steps) - n2


def phase1_schedule_steps(config) -> int:
  """Length of the phase-1 poly schedule.

  With a fresh phase-2 schedule (``anchor.phase2_learning_rate >= 0``) phase 1
  is exactly the single-phase MTL run of N1 steps, so HeadFreeze is "MTL, then
  HeadFreeze": the poly schedule ends at N1. With a negative phase-2 LR one
  schedule spans both phases. An explicit ``optim.schedule_steps`` wins.
  """
  sched = config.optim.schedule_steps
  if sched not in (-1, None):
    return int(sched)
  n1 = phase1_steps(config)
  fresh_phase2 = float(config.anchor.phase2_learning_rate) >= 0
  return n1 if n1 < config.num_steps and fresh_phase2 else int(config.num_steps)


def phase2_frozen(config) -> tuple[str, ...]:
  """The regexes phase 2 freezes: ``anchor.late_regexes``, or none when
  ``anchor.phase2_freeze`` is False (the compute-matched control)."""
  if not config.anchor.get("phase2_freeze", True):
    return ()
  return tuple(config.anchor.late_regexes)


def config_problems(config) -> list[str]:
  """The anchor method's invalid values, one line each."""
  problems = []
  for phase in (1, 2):
    try:
      anchor_steps.task_weights(config, phase)
    except ValueError as e:
      problems.append(str(e))
  if config.anchor.adv_input not in anchor_steps.ADV_INPUTS:
    problems.append(f"anchor.adv_input must be one of"
                    f" {anchor_steps.ADV_INPUTS}, got"
                    f" {config.anchor.adv_input!r}")
  if config.anchor.lambda_adv < 0:
    problems.append("anchor.lambda_adv must be >= 0")
  if config.adversarial.gan.lower() not in ("vanilla", "ls"):
    problems.append("config.adversarial.gan must be 'vanilla' or 'ls'")
  if not config.anchor.late_regexes:
    problems.append("anchor.late_regexes must not be empty")
  try:
    phase1_steps(config)
  except ConfigError as e:
    problems.append(str(e))
  return problems


def setup(config: ml_collections.ConfigDict, workdir: str,
          method: base.Method) -> AnchorRun:
  """The loop's set-up (depth task) plus the two phases' optimisers."""
  for problem in config_problems(config):
    raise ConfigError(problem)
  run = train_loop.setup(config, workdir,
                         method)
  n1 = phase1_steps(config)
  frozen = depth_task.frozen_regexes(config)
  tx, labels_fn = depth_task.make_tx(
      config, frozen, schedule_steps=phase1_schedule_steps(config))
  run = dataclasses.replace(run, tx=tx, labels_fn=labels_fn)
  late = phase2_frozen(config)
  tx2 = labels_fn2 = None
  if n1 < config.num_steps:
    lr2 = float(config.anchor.phase2_learning_rate)
    if lr2 < 0:  # Continue the global schedule where phase 1 left it.
      tx2, labels_fn2 = depth_task.make_tx(
          config, frozen + list(late), offset=n1,
          schedule_steps=depth_task.schedule_steps(config))
    else:  # A fresh poly schedule over the phase-2 steps.
      tx2, labels_fn2 = depth_task.make_tx(
          config, frozen + list(late), learning_rate=lr2,
          schedule_steps=config.num_steps - n1)
  return AnchorRun(run=run, tx2=tx2, labels_fn2=labels_fn2, phase1_steps=n1,
                   late_regexes=late,
                   main=anchor_steps.MAIN_TASKS[run.method.name])


# --------------------------------------------------------------------------
# State: creation, the phase transition, resume
# --------------------------------------------------------------------------


def create_state(arun: AnchorRun) -> state_lib.TrainState:
  """Phase-1 state initialised from ``config.seed`` (replicated)."""
  return train_loop.create_state(arun.run)


# Optimiser-state fields that are per-parameter moments (Adam's mu/nu, SGD
# momentum's trace), as opposed to step counters.
_MOMENT_FIELDS = (".mu", ".nu", ".trace")


def _carry_moments(fresh, old):
  """Copies moment leaves of ``old`` into ``fresh`` where both have them.

  The phase-2 partition labels the late layers frozen, so its state tree
  lacks their moments (``optax.MaskedNode``); the early layers' moments sit
  at the same tree paths in both phases. Adam's counter goes with them
  (bias correction); a schedule's counter (no moments beside it) stays
  fresh (phase 2's schedule has its own offset).
  """
  old_leaves = {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_flatten_with_path(old)[0]}
  moment_owners = {k[:k.index(f)] for k in old_leaves
                   for f in _MOMENT_FIELDS if f in k}

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    if key not in old_leaves:
      return leaf
    if any(f in key for f in _MOMENT_FIELDS):
      return old_leaves[key]
    if key.endswith(".count") and key[:-len(".count")] in moment_owners:
      return old_leaves[key]
    return leaf

  return jax.tree_util.tree_map_with_path(pick, fresh)


def to_phase2(arun: AnchorRun, state):
  """Phase-1 end state -> phase-2 start: the phase-2 optimiser state."""
  init = jax.jit(arun.tx2.init,
                 out_shardings=parallel.replicated(arun.run.mesh))
  opt_state = init(state.params)
  if arun.run.config.anchor.get("phase2_carry_moments", False):
    opt_state = _carry_moments(opt_state, state.opt_state)
  return state.replace(opt_state=opt_state)


def init_or_restore(arun: AnchorRun):
  """This workdir's newest readable checkpoint, else a warm start or scratch.

  Returns:
    ``(state, start_step)``; the state has the optimiser structure of the
    phase that ``start_step`` belongs to (step N1 counts as phase 1: its
    checkpoint ends phase 1).
  """
  run = arun.run
  state = create_state(arun)
  ckpt = run.checkpointer
  steps = ckpt.all_steps()[::-1]
  if steps:
    template2 = to_phase2(arun, state) if arun.two_phase else None
    errors = []
    for s in steps:
      target = (template2 if (arun.two_phase and s > arun.phase1_steps)
                else state)
      try:
        restored, step = ckpt.restore(target, step=s)
      except checkpoint_lib.CheckpointError as e:
        errors.append(str(e))
        continue
      run.log(f"Resuming from checkpoint step {step} in {ckpt.directory}")
      return restored, step
    raise checkpoint_lib.CheckpointError("; ".join(errors))
  if run.config.model.init_checkpoint:
    state = init_weights.load_segmenter_weights(
        run, state, run.config.model.init_checkpoint)
    run.log(f"Initialised the network from {run.config.model.init_checkpoint}")
  return state, 0


# --------------------------------------------------------------------------
# Batches and steps
# --------------------------------------------------------------------------


def train_batches(arun: AnchorRun, start_step: int,
                  phase: int) -> Iterator[dict]:
  """``{'source': {image, label, depth}, 'target': {image, label}}``.

  The seeds of ``train_loop.paired_batches``: the data order is a function
  of (seed, step), so resumed runs see the batches of uninterrupted ones.
  The target stream is drawn only when the phase reads it.
  """
  run = arun.run
  config = run.config
  common = dict(batch_size=parallel.local_batch_size(config.batch_size),
                start_step=start_step, flip=config.data.flip,
                mode=config.data.normalization)
  src = run.data["source_train"]
  iters = {"source": pipeline.train_batches(
      src.images, src.labels, seed=config.seed * 2 + 1,
      extras={arun.main.label_key: getattr(src, arun.main.label_key)},
      **common)}
  if anchor_steps.uses_target(config, phase):
    tgt = run.data["target_train"]
    iters["target"] = pipeline.train_batches(
        tgt.images, tgt.labels, seed=config.seed * 2 + 2, **common)
  while True:
    yield {role: next(it) for role, it in iters.items()}


def _compile(arun: AnchorRun, phase: int):
  run = arun.run
  tx = run.tx if phase == 1 else arun.tx2
  frozen = () if phase == 1 else arun.late_regexes
  step = anchor_steps.make_step(run.models, run.config, tx, run.disc_tx,
                                phase=phase, frozen_regexes=frozen,
                                main=arun.main)
  return train_loop.compile_step(run, step)


# --------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------


def _read_phases(run) -> dict[str, Any]:
  path = run.path(PHASES_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def _write_phases(run, phases: dict[str, Any]) -> None:
  if run.is_main:
    tmp = run.path(PHASES_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(phases, f, indent=2)
    os.replace(tmp, run.path(PHASES_FILE))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       method: base.Method) -> dict[str, Any]:
  """Runs phase 1 (and HeadFreeze's phase 2), evaluates, writes the summary.

  Resumes automatically from ``workdir/checkpoints``, across the phase
  boundary too.

  Returns:
    The summary dict also written to ``workdir/summary.json``.
  """
  arun = setup(config, workdir, method)
  run = arun.run
  n1, total = arun.phase1_steps, config.num_steps
  try:
    train_loop.write_config(run)
    run.writer.write_hparams(config.to_dict())
    state, start = init_or_restore(arun)
    n_params = sum(np.size(x) for x in jax.tree.leaves(state.params))
    run.log(
        f"anchor ({config.anchor.name}): {n1} phase-1 steps"
        + (f" + {total - n1} phase-2 steps (frozen: "
           f"{', '.join(arun.late_regexes) or 'nothing, the control'})"
           if arun.two_phase else "")
        + f", batch {config.batch_size} on {run.mesh.devices.size}"
        f" device(s), {n_params / 1e6:.2f}M parameters; workdir"
        f" {os.path.abspath(workdir)}")
    phases = _read_phases(run)
    if start < n1:
      state = train_loop.run_steps(run, state, _compile(arun, 1),
                                   train_batches(arun, start, 1), start, n1,
                                   desc="phase 1")
    if arun.two_phase:
      if start <= n1:
        if "phase1" not in phases:
          phase1 = train_loop.evaluate_target(run, state, n1,
                                              prefix="target_phase1")
          phases["phase1"] = dict(phase1, step=n1)
          _write_phases(run, phases)
          run.log(f"end of phase 1 (step {n1}):"
                  f" {arun.main.format_result(phase1)}")
        state = to_phase2(arun, state)
        start = n1
      state = train_loop.run_steps(run, state, _compile(arun, 2),
                                   train_batches(arun, start, 2), start,
                                   total, desc="phase 2 (HeadFreeze)" if arun.late_regexes
                                   else "phase 2 (nothing frozen)")
    result = train_loop.evaluate_target(run, state, total)
    extra: dict[str, Any] = {
        "variant": config.anchor.name + (
            ("+headfreeze" if arun.late_regexes else "+phase2_unfrozen")
            if arun.two_phase else ""),
        "phase2_frozen": list(arun.late_regexes) if arun.two_phase else [],
        "phase1_steps": int(n1)}
    if "phase1" in phases:
      p1 = phases["phase1"]
      extra["phase1"] = p1
      extra["headfreeze_gain"] = {
          **arun.main.gains(result, p1),
          "anchor_miou": result["anchor"]["miou"] - p1["anchor"]["miou"]}
      run.log("end of phase 1: " + arun.main.format_result(p1))
    return train_loop.finish(run, state, result, extra=extra)
  finally:
    train_loop.close(run)

