"""The run loop every method shares: set-up, steps, checkpoints, evaluation.

``train_and_evaluate(config, workdir)`` is what the entry points call. Its
pieces (``setup``, ``init_or_restore``, ``run_steps``, ``evaluate_target``,
``finish``) are public so multi-stage methods (TPLD's self-training rounds)
reuse the same loop instead of copying it.

What a run writes under ``workdir``:
  checkpoints/     Orbax checkpoints (resume is automatic)
  metrics.jsonl    every logged scalar; TensorBoard event files beside it
  pictures/        target predictions, training curves, confusion matrix
  summary.json     final metrics, the config, where everything went
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxda import checkpoint as checkpoint_lib
from jaxda.tasks import classification as classification_run
from jaxda.tasks import evaluation
from jaxda.tasks import full_resolution
from jaxda import models as models_lib
from jaxda import optim
from jaxda import parallel
from jaxda import state as state_lib
from jaxda import visualize
from jaxda import writers
from jaxda.data import augment
from jaxda.data import pipeline
from jaxda.data.readers import common as sources
from jaxda.methods import base
from jaxda.methods import get_method
from jaxda.weights import torch_import


class TrainingDivergedError(RuntimeError):
  """A loss or gradient became NaN/Inf."""


class ConfigError(ValueError):
  """A config value is invalid."""


class StopRequested(RuntimeError):
  """SIGTERM/SIGINT stopped training at a step boundary, after a checkpoint.

  Attributes:
    signal_name: ``'SIGTERM'`` or ``'SIGINT'``.
    step: the step the run stopped at (and was checkpointed at).
    exit_code: the shell convention for death by that signal, 128 + its
      number (143 for SIGTERM, 130 for SIGINT).
  """

  def __init__(self, signal_name: str, step: int):
    super().__init__(
        f"stopped by {signal_name} at step {step}; checkpoint saved; rerun"
        " the same command to resume")
    self.signal_name = signal_name
    self.step = step
    self.exit_code = 128 + int(getattr(signal, signal_name))


@dataclasses.dataclass
class Run:
  """Everything set up for a run (host-side objects, no train state)."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  method: base.Method
  models: base.Models
  data: dict[str, pipeline.Domain]
  class_names: tuple[str, ...]
  writer: writers.MetricWriter
  checkpointer: checkpoint_lib.Checkpointer
  tx: Any
  labels_fn: Callable
  disc_tx: Any
  start_time: float

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def is_main(self) -> bool:
    return parallel.is_main_process()

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def log(self, message: str) -> None:
    """Prints on the main process (and logs everywhere)."""
    logging.info(message)
    if self.is_main:
      print(message, flush=True)


# --------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks values whose mistakes would surface late or obscurely."""
  def need(cond, msg):
    if not cond:
      raise ConfigError(msg)
  need(classification_run.task(config) in classification_run.TASKS,
       f"config.task must be one of {classification_run.TASKS}")
  if classification_run.is_classification(config):
    for problem in classification_run.config_problems(config):
      raise ConfigError(problem)
    return
  need(config.method not in classification_run.CLASSIFICATION_METHODS,
       f"{config.method!r} is a classification method: use its config"
       " (config.task = 'classification')")
  need(config.num_steps >= 0, "config.num_steps must be >= 0")
  need(config.batch_size >= 1, "config.batch_size must be >= 1")
  need(config.model.bn_mode in base.BN_MODES,
       f"config.model.bn_mode must be one of {base.BN_MODES}, got"
       f" {config.model.bn_mode!r}")
  need(config.model.name in models_lib.SEGMENTER_NAMES,
       f"config.model.name must be one of {models_lib.SEGMENTER_NAMES}, got"
       f" {config.model.name!r}")
  need(config.adversarial.gan.lower() in ("vanilla", "ls"),
       "config.adversarial.gan must be 'vanilla' or 'ls'")
  need(config.model.aspp_branches_used in (1, 2, 3, 4),
       "config.model.aspp_branches_used must be in 1..4")
  need(config.log_every >= 1 and config.checkpoint_every >= 1,
       "config.log_every and config.checkpoint_every must be >= 1")
  need(config.get("grad_accum_steps", 1) >= 1,
       "config.grad_accum_steps must be >= 1")


def load_data(config, method: base.Method) -> dict[str, pipeline.Domain]:
  """Loads the splits the method needs; target train labels only if allowed.

  An unsupervised method never gets target training labels: the target
  ``train`` split is loaded with ``require_labels=False`` and its labels are
  dropped, whatever the directory holds.
  """
  height, width = config.data.height, config.data.width

  def load(role, split, require_labels, num_images):
    domain_cfg = config[role]
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


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Validates the config, loads data, builds models and optimisers."""
  validate_config(config)
  try:  # A no-op unless config.distributed / JAX_* ask for several processes.
    parallel.initialize_distributed(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if jax.process_count() > 1 and (
      classification_run.is_classification(config) or config.method == "gam"):
    # Their own evaluation/statistics passes read whole splits.
    raise ConfigError(f"{config.method} runs in one process; multi-process"
                      " runs support the segmentation loop and self-training")
  method = get_method(config.method)
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh(
      None if config.num_devices in (-1, None) else config.num_devices)
  try:
    parallel.check_batch_size(config.batch_size, mesh)
  except ValueError as e:  # A config mistake, reported in one line.
    raise ConfigError(str(e)) from None
  data = load_data(config, method)
  class_names = tuple(data["target_val"].class_names)
  if classification_run.is_classification(config):
    # Same loop; only the models and optimisers differ.
    return _make_run(config, workdir, mesh, method, data, class_names,
                     **classification_run.build(config, method,
                                                len(class_names)))
  segmenter = models_lib.create_segmenter(
      config.model.name, len(class_names),
      multi_level=config.model.multi_level,
      aspp_branches_used=config.model.aspp_branches_used,
      remat=config.model.get("remat", False),
      remat_impl=config.model.get("remat_impl", "gated"),
      **precision_options(config))
  disc = None
  disc_tx = None
  sched = config.optim.schedule_steps
  accum = int(config.get("grad_accum_steps", 1))
  # Schedules count optimiser updates: one per `accum` batches.
  schedule_steps = (-(-config.num_steps // accum) if sched in (-1, None)
                    else sched)
  if method.discriminator_inputs != "none":
    disc = models_lib.create_discriminator(config.adversarial.ndf).clone(
        **precision_options(config))
    disc_tx = optim.make_discriminator_tx(
        learning_rate=config.adversarial.learning_rate,
        schedule_steps=schedule_steps, b1=config.adversarial.b1,
        b2=config.adversarial.b2, power=config.optim.power)
  frozen = frozen_regexes(config)
  tx, labels_fn = optim.make_segmenter_tx(
      learning_rate=config.optim.learning_rate,
      schedule_steps=schedule_steps, momentum=config.optim.momentum,
      weight_decay=config.optim.weight_decay, power=config.optim.power,
      head_regexes=(models_lib.head_param_regex,),
      head_lr_mult=config.optim.head_lr_mult, frozen_regexes=frozen,
      optimizer=config.optim.optimizer)
  tx = optim.accumulate(tx, accum)
  disc_tx = None if disc_tx is None else optim.accumulate(disc_tx, accum)
  return _make_run(config, workdir, mesh, method, data, class_names,
                   models=base.Models(segmenter, disc), tx=tx,
                   labels_fn=labels_fn, disc_tx=disc_tx)


def precision_options(config) -> dict[str, Any]:
  """``dtype`` / ``conv_impl`` model attributes from ``config.model``.

  bfloat16 compute keeps float32 parameters and float32 logits (the models
  cast them), so optimiser state and losses stay in full precision.
  """
  dtype = config.model.get("compute_dtype", "float32")
  if dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.model.compute_dtype={dtype!r}; use 'float32'"
                      " or 'bfloat16'")
  return {"dtype": None if dtype == "float32" else jnp.bfloat16,
          "conv_impl": config.model.get("conv_impl", "auto")}


def _make_run(config, workdir, mesh, method, data, class_names, *, models,
              tx, labels_fn, disc_tx) -> Run:
  """Adds the writer and checkpointer (shared by every task)."""
  writer = writers.MetricWriter(workdir, enabled=parallel.is_main_process())
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=config.max_checkpoints)
  return Run(config=config, workdir=workdir, mesh=mesh, method=method,
             models=models, data=data,
             class_names=class_names, writer=writer,
             checkpointer=checkpointer, tx=tx, labels_fn=labels_fn,
             disc_tx=disc_tx, start_time=time.time())


def frozen_regexes(config) -> list[str]:
  """Parameter-path regexes never updated (``base.frozen_regexes``)."""
  return base.frozen_regexes(config)


def disc_levels(run: Run) -> tuple[str, ...]:
  """Output levels that get a discriminator (TPLD phase 2: main only)."""
  if run.models.discriminator is None:
    return ()
  if run.method.target_labels == "pseudo":
    return ("main",)
  return base.output_levels(run.config)


def create_state(run: Run) -> state_lib.TrainState:
  """Initialises parameters from ``config.seed`` (replicated on the mesh)."""
  config = run.config
  h, w = config.data.height, config.data.width
  key = jax.random.key(config.seed)
  seg_key, disc_key = jax.random.split(key)

  def init():
    if classification_run.is_classification(config):
      params, stats, disc_params = classification_run.init_variables(
          run.models, config, key)
      return state_lib.TrainState.create(
          params=params, batch_stats=stats, tx=run.tx,
          disc_params=disc_params, disc_tx=run.disc_tx)
    variables = run.models.segmenter.init(
        seg_key, jnp.zeros((1, h, w, 3), jnp.float32))
    disc_params = {}
    for i, level in enumerate(disc_levels(run)):
      disc_params[level] = run.models.discriminator.init(
          jax.random.fold_in(disc_key, i),
          jnp.zeros((1, h, w, run.num_classes), jnp.float32))["params"]
    return state_lib.TrainState.create(
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}), tx=run.tx,
        disc_params=disc_params, disc_tx=run.disc_tx)

  return parallel.init_replicated(init, run.mesh)


def init_or_restore(run: Run) -> tuple[state_lib.TrainState, int]:
  """Resume order: this workdir's checkpoint → ``init_checkpoint`` → scratch.

  Returns:
    ``(state, start_step)``.
  """
  state = create_state(run)
  if run.checkpointer.latest_step() is not None:
    state, step = run.checkpointer.restore(state)
    run.log(f"Resuming from checkpoint step {step} in"
            f" {run.checkpointer.directory}")
    return state, step
  init_path = run.config.model.init_checkpoint
  if init_path:
    warm = load_segmenter_weights(run, state, init_path)
    run.log(f"Initialised the segmenter from {init_path}")
    return warm, 0
  if run.config.model.get("init_weights"):
    return load_init_weights(run, state, run.config.model.init_weights), 0
  return state, 0


def load_init_weights(run: Run, state, path: str):
  """Overlays converted (e.g. PyTorch ImageNet) weights onto ``state``.

  ``path`` is an ``experiments.import_weights`` output. Leaves it lacks (the
  ASPP heads of a backbone-only file) keep their random init; a leaf it has
  that the model lacks, or a shape mismatch, is an error.
  """
  weights = checkpoint_lib.load_weights(path)
  try:
    params, kept = torch_import.overlay(state.params, weights["params"],
                                        "params", path)
    stats, _ = torch_import.overlay(state.batch_stats, weights["batch_stats"],
                                    "batch_stats", path)
  except torch_import.WeightImportError as e:
    raise checkpoint_lib.CheckpointError(str(e)) from None
  modules = sorted({k.rsplit("/", 1)[0] for k in kept})
  run.log(f"Initialised the segmenter from converted weights {path}; random"
          f" init kept in {len(modules)} modules: {', '.join(modules[:10])}"
          + (" ..." if len(modules) > 10 else ""))
  return state.replace(params=params, batch_stats=stats,
                       opt_state=jax.jit(run.tx.init)(params))


def load_segmenter_weights(run: Run, state, path: str):
  """Copies params and BN statistics of another run into ``state``.

  The optimiser state is re-initialised: a warm start, not a resume.
  Shapes must match the configured model exactly.
  """
  weights = checkpoint_lib.load_weights(path)
  try:
    params = _like(state.params, weights["params"], "params", path)
    stats = _like(state.batch_stats, weights["batch_stats"], "batch_stats",
                  path)
  except ValueError as e:
    raise checkpoint_lib.CheckpointError(str(e)) from None
  return state.replace(params=params, batch_stats=stats,
                       opt_state=jax.jit(run.tx.init)(params))


def _like(target, loaded, what: str, path: str):
  """Places ``loaded`` with the structure/sharding of ``target``."""
  t_flat = jax.tree_util.tree_flatten_with_path(target)[0]
  l_flat = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  out = []
  for key, leaf in t_flat:
    name = optim.param_path(key)
    if key not in l_flat:
      raise ValueError(
          f"init checkpoint {path} has no {what} '{name}': it was written for"
          " a different architecture; check config.model.*")
    value = np.asarray(l_flat[key])
    if value.shape != leaf.shape:
      raise ValueError(
          f"init checkpoint {path}: {what} '{name}' has shape {value.shape},"
          f" the model expects {leaf.shape}; check config.model.* and"
          " the number of classes")
    out.append(jax.device_put(value.astype(leaf.dtype), leaf.sharding))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target),
                                      out)


# --------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------


def paired_batches(run: Run, start_step: int,
                   target_extras: dict[str, np.ndarray] | None = None
                   ) -> Iterator[dict]:
  """``{'source': ..., 'target': ...}`` host batches from ``start_step`` on.

  The data order is a function of (seed, step) only, so a resumed run sees
  exactly the batches an uninterrupted run would have seen.
  """
  config = run.config
  bs = parallel.local_batch_size(config.batch_size)
  iters = {}
  seeds = {"source": config.seed * 2 + 1, "target": config.seed * 2 + 2}
  for role in ("source", "target"):
    domain = run.data.get(f"{role}_train")
    if domain is None:
      continue
    iters[role] = pipeline.train_batches(
        domain.images, domain.labels, batch_size=bs,
        seed=parallel.process_seed(seeds[role]),
        start_step=start_step, flip=config.data.flip,
        mode=config.data.normalization,
        extras=target_extras if role == "target" else None)
    # Random scale / crop (config.data.scale_*, crop_*); a no-op by default.
    iters[role] = augment.from_config(
        iters[role], config, seed=parallel.process_seed(seeds[role]),
        start_step=start_step)
  while True:
    yield {role: next(it) for role, it in iters.items()}


# --------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------


def compile_step(run: Run, step_fn: Callable | None = None) -> Callable:
  """Builds the method's step (unless given) and jits it over the mesh."""
  if step_fn is None:
    step_fn = run.method.make_step(run.models, run.config, run.tx, run.disc_tx)
  return parallel.jit_step(step_fn, run.mesh)


def _check_finite(metrics: dict[str, np.ndarray], first: int, last: int,
                  run: Run) -> None:
  bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
  if bad:
    good = run.checkpointer.latest_step()
    raise TrainingDivergedError(
        f"{', '.join(sorted(bad))} became NaN/Inf between steps {first} and"
        f" {last}. Nothing was checkpointed after the last good step"
        f" ({good if good is not None else 'none'}). Lower"
        " --config.optim.learning_rate (or the adversarial weights) and rerun;"
        " the run resumes from the last good checkpoint.")


class StopSignals(contextlib.AbstractContextManager):
  """Turns SIGTERM/SIGINT into a flag while training runs.

  A scheduler's SIGTERM (pre-emption) or a Ctrl-C then stops the loop at the
  next step boundary, where it can checkpoint, instead of killing it
  mid-step. A second signal while the first is pending is not swallowed: the
  previous handlers are put back and the signal re-raised, so a user who
  insists gets the usual behaviour (KeyboardInterrupt, or death by SIGTERM).
  The previous handlers are also restored on exit. Ignored signals stay
  ignored; outside the main thread (where Python cannot install handlers)
  this is a no-op.

  Attributes:
    requested: name of the first signal received (``'SIGTERM'``), or None.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested: str | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is not threading.main_thread():
      return self
    for signum in self.SIGNALS:
      # An ignored signal (e.g. SIGINT of a job started with `&` or nohup)
      # stays ignored: whoever started us asked for that.
      if signal.getsignal(signum) is signal.SIG_IGN:
        continue
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    self._restore()

  def _restore(self) -> None:
    for signum, handler in self._previous.items():
      # None: the handler was not installed from Python; SIG_DFL is the
      # closest we can put back.
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.requested is None:
      self.requested = signal.Signals(signum).name
      return
    self._restore()
    signal.raise_signal(signum)


def run_steps(run: Run, state, step_jit: Callable, batches: Iterator[dict],
              start: int, stop: int, *, desc: str = "train",
              prefix: str = "train") -> Any:
  """Runs steps ``[start, stop)``: logging, NaN guard, checkpoints, progress.

  Metrics stay on device between log points (no host sync per step); at a
  log point they are fetched together, checked for NaN/Inf and averaged. A
  checkpoint is only written right after such a check passed.

  SIGTERM or SIGINT (see ``StopSignals``) ends the loop after the step in
  flight: its metrics are checked and logged, a checkpoint is written at
  that step boundary and waited for, the writers are flushed, then
  ``StopRequested`` is raised. Rerunning resumes there, and because batches
  are a function of (seed, step) the result equals an uninterrupted run's.

  Raises:
    StopRequested: a stop signal arrived; the checkpoint is on disk.
    TrainingDivergedError: NaN/Inf metrics (nothing checkpointed after the
      last good check, whether or not a stop was requested).
  """
  config = run.config
  rng = jax.device_put(jax.random.key_data(jax.random.key(config.seed)),
                       parallel.replicated(run.mesh))
  rng = jax.random.wrap_key_data(rng)
  progress = writers.ProgressBar(total=stop, initial=start, desc=desc,
                                 enabled=run.is_main)
  pending: list[dict] = []
  first_pending = start
  t_last = time.time()
  try:
    with StopSignals() as signals:
      for step in range(start, stop):
        batch = parallel.shard_batch(next(batches), run.mesh)
        state, metrics = step_jit(state, batch, rng)
        pending.append(metrics)
        done = step + 1
        # Read the flag once: a signal arriving between the checks below
        # must not give a stop without its checkpoint.
        stop_signal = signals.requested
        log_now = (done % config.log_every == 0 or done == stop
                   or stop_signal is not None)
        ckpt_now = (done % config.checkpoint_every == 0 or done == stop
                    or stop_signal is not None)
        if log_now or ckpt_now:
          # The loop's only device-to-host reads are here and in the
          # checkpoint below; every other step runs without a host sync
          # (tested; on accelerators a `transfer_guard` can enforce it).
          with jax.transfer_guard_device_to_host("allow"):
            host = jax.device_get(pending)
          stacked = {k: np.stack([m[k] for m in host]) for k in host[0]}
          _check_finite(stacked, first_pending, done, run)
          means = {f"{prefix}/{k}": float(np.mean(v))
                   for k, v in stacked.items()}
          now = time.time()
          means[f"{prefix}/steps_per_s"] = (
              len(pending) / max(now - t_last, 1e-9))
          t_last = now
          run.writer.write_scalars(done, means)
          # Logged points reach disk now, so `tail -f metrics.jsonl` shows
          # progress and a killed run loses none of them.
          run.writer.flush()
          progress.update(len(pending), loss=f"{means[prefix + '/loss']:.4f}")
          pending, first_pending = [], done
        if ckpt_now:
          with jax.transfer_guard_device_to_host("allow"):
            run.checkpointer.save(done, state)
        if stop_signal is not None:
          # Orbax writes asynchronously; "checkpoint saved" must be true
          # before the process exits (a second signal still interrupts).
          run.checkpointer.wait()
          run.writer.flush()
          raise StopRequested(stop_signal, done)
  finally:
    progress.close()
  run.writer.flush()
  return state


# --------------------------------------------------------------------------
# Evaluation, pictures, summary
# --------------------------------------------------------------------------


def make_predict_jit(run: Run) -> Callable:
  predict = evaluation.make_predict_fn(
      run.models, bn_mode=run.config.model.bn_mode,
      align_corners=run.config.model.upsample_align_corners)
  return parallel.jit_inference(predict, run.mesh)


def eval_batches(run: Run, domain: pipeline.Domain) -> Iterator[dict]:
  """Eval batches of this process's rows (as many on every process)."""
  return parallel.process_eval_batches(
      domain.images, domain.labels, global_batch_size=_eval_batch_size(run),
      mode=run.config.data.normalization)


def _eval_batch_size(run: Run) -> int:
  n = run.mesh.devices.size
  return max(n, (run.config.eval.batch_size // n) * n)


def evaluate_target(run: Run, state, step: int, *,
                    prefix: str = "target") -> dict[str, Any]:
  """mIoU etc. of the current model on the target val split (last iterate).

  Classification: accuracy etc. (``classification_run.evaluate_target``).
  """
  if classification_run.is_classification(run.config):
    return classification_run.evaluate_target(run, state, step,
                                              prefix=prefix)
  if full_resolution.applies(run.config, run.data["target_val"]):
    # Real data sets: logits upsampled to the full-resolution labels.
    return full_resolution.evaluate_target(run, state, step, prefix=prefix)
  predict = evaluation.make_predict_fn(
      run.models, bn_mode=run.config.model.bn_mode,
      align_corners=run.config.model.upsample_align_corners)
  confusion_fn = jax.jit(
      evaluation.make_confusion_fn(predict, run.num_classes),
      in_shardings=(parallel.replicated(run.mesh),
                    parallel.batch_sharded(run.mesh)),
      out_shardings=parallel.replicated(run.mesh))
  domain = run.data["target_val"]
  confusion = evaluation.evaluate(confusion_fn, state,
                                  eval_batches(run, domain), run.mesh)
  result = evaluation.summarize_confusion(confusion, run.class_names)
  result["num_images"] = int(parallel.sum_over_processes(
      np.asarray(len(domain.images))))
  result["confusion"] = confusion.tolist()
  run.writer.write_scalars(step, {
      f"{prefix}/miou": result["miou"],
      f"{prefix}/pixel_accuracy": result["pixel_accuracy"]})
  return result


def predict_labels(run: Run, state, images_uint8: np.ndarray,
                   predict_jit: Callable | None = None) -> np.ndarray:
  """Argmax predictions (N, H, W) for host images (pads to the mesh).

  Every process must call it (a global computation), each with its own
  images; each gets its own images' predictions.
  """
  predict_jit = predict_jit or make_predict_jit(run)
  out = [np.zeros((0,) + images_uint8.shape[1:3], np.int32)]
  for batch in parallel.process_eval_batches(
      images_uint8, None, global_batch_size=_eval_batch_size(run),
      mode=run.config.data.normalization):
    probs = predict_jit(state, parallel.shard_batch(
        {"image": batch["image"]}, run.mesh)["image"])
    preds = parallel.local_rows(jnp.argmax(probs, axis=-1), run.mesh)
    out.append(preds[batch["mask"]])
  return np.concatenate(out).astype(np.int32)


def save_pictures(run: Run, state, result: dict[str, Any], *,
                  tag: str = "") -> dict[str, str]:
  """Target overlays, training curves and the confusion matrix (PNG)."""
  if classification_run.is_classification(run.config):
    return classification_run.save_pictures(run, state, result, tag=tag)
  cfg = run.config
  n = min(cfg.eval.num_pictures, len(run.data["target_val"].images))
  domain = run.data["target_val"]
  # Every process predicts (a global computation); only the main one draws.
  preds = predict_labels(run, state, domain.images[:n])
  if not run.is_main:
    return {}
  palette = visualize.default_palette(run.num_classes)
  suffix = f"_{tag}" if tag else ""
  paths = {
      "target_predictions": visualize.save_segmentation_grid(
          run.path("pictures", f"target_predictions{suffix}.png"),
          domain.images[:n], preds, domain.labels[:n], palette,
          run.class_names,
          title=f"{cfg.method} on target val (mIoU {100 * result['miou']:.1f})",
          max_rows=n),
      "confusion_matrix": visualize.save_confusion_matrix(
          run.path("pictures", f"confusion_matrix{suffix}.png"),
          np.asarray(result["confusion"]), run.class_names),
  }
  history = writers.read_history(run.workdir)
  if history:
    paths["training_curves"] = visualize.save_training_curves(
        run.path("pictures", "training_curves.png"), history)
  return {k: str(v) for k, v in paths.items()}


def write_config(run: Run) -> None:
  if run.is_main:
    with open(run.path("config.json"), "w") as f:
      json.dump(run.config.to_dict(), f, indent=2, default=str)


def finish(run: Run, state, result: dict[str, Any], *,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Pictures, ``summary.json`` and the closing printout."""
  pictures = save_pictures(run, state, result)
  run.checkpointer.wait()
  if classification_run.is_classification(run.config):
    target = classification_run.summary_target(result)
    table, headline = classification_run.report(result)
  else:
    target = {k: result[k] for k in ("miou", "pixel_accuracy",
                                     "per_class_iou", "num_images")}
    # Full-resolution evaluation of real data sets adds these.
    target.update({k: result[k] for k in ("miou13", "num_pixels")
                   if k in result})
    table = evaluation.format_iou_table(result)
    headline = (f"target mIoU {100 * result['miou']:.2f}% (pixel acc."
                f" {100 * result['pixel_accuracy']:.2f}%)")
  summary = {
      "method": run.config.method,
      "seed": int(run.config.seed),
      "steps": int(run.config.num_steps),
      "wall_time_s": round(time.time() - run.start_time, 2),
      "model_selection": "last",
      "target": target,
      "devices": {"count": int(run.mesh.devices.size),
                  "platform": jax.devices()[0].platform,
                  "processes": jax.process_count()},
      "files": {
          "workdir": os.path.abspath(run.workdir),
          "checkpoints": run.checkpointer.directory,
          "metrics": run.path("metrics.jsonl"),
          "pictures": pictures,
          "summary": run.path("summary.json"),
      },
      "config": run.config.to_dict(),
  }
  if extra:
    summary.update(extra)
  if run.is_main:
    tmp = run.path("summary.json.tmp")
    with open(tmp, "w") as f:
      json.dump(summary, f, indent=2, default=str)
    os.replace(tmp, run.path("summary.json"))
    run.log("\n" + table)
    run.log(
        f"\n{run.config.method}: {headline} after"
        f" {run.config.num_steps} steps, {summary['wall_time_s']:.0f} s\n"
        f"  summary     {run.path('summary.json')}\n"
        f"  checkpoints {run.checkpointer.directory}\n"
        f"  metrics     {run.path('metrics.jsonl')} (TensorBoard: tensorboard"
        f" --logdir {run.workdir})\n"
        + "".join(f"  picture     {p}\n" for p in pictures.values()))
  return summary


def close(run: Run) -> None:
  run.checkpointer.close()
  run.writer.close()


# --------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains ``config.method`` for ``config.num_steps`` and evaluates it.

  Resumes automatically from ``workdir/checkpoints``.

  Returns:
    The summary dict also written to ``workdir/summary.json``.
  """
  run = setup(config, workdir)
  try:
    write_config(run)
    run.writer.write_hparams(config.to_dict())
    state, start = init_or_restore(run)
    run.log(
        f"{config.method}: {config.num_steps} steps, batch {config.batch_size}"
        f" on {run.mesh.devices.size} device(s), model {config.model.name},"
        f" {_num_params(state.params) / 1e6:.2f}M parameters; workdir"
        f" {os.path.abspath(workdir)}")
    for name, domain in run.data.items():  # Real data: files found.
      if (line := sources.describe(name, domain)) is not None:
        run.log(f"  {line}")
    if start < config.num_steps:
      step_jit = compile_step(run)
      state = run_steps(run, state, step_jit, paired_batches(run, start),
                        start, config.num_steps)
    result = evaluate_target(run, state, config.num_steps)
    return finish(run, state, result)
  finally:
    close(run)


def _num_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))
