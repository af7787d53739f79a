"""The run loop every method shares: set-up, steps, checkpoints, evaluation.

``train_and_evaluate(config, workdir, method)`` is the default driver (the
registry's ``jaxda.methods.train_and_evaluate`` picks a method's own driver
or this one). Its pieces (``setup``, ``init_or_restore``, ``run_steps``,
``evaluate_target``, ``finish``) are public so multi-stage methods (TPLD's
self-training rounds) reuse the same loop instead of copying it.

The loop knows no task and no method by name: what differs between tasks
(models, evaluation, pictures, summary) is ``run.task``'s hooks
(``jaxda.tasks.task.Task``), what differs between methods is ``run.method``
(``jaxda.methods.base.Method``: its step factory and facts).

What a run writes under ``workdir``:
  checkpoints/     Orbax checkpoints (resume is automatic)
  metrics.jsonl    every logged scalar; TensorBoard event files beside it
  pictures/        target predictions, training curves, confusion matrix
  summary.json     final metrics, the config, where everything went
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

from jaxda import checkpoint as checkpoint_lib
from jaxda import parallel
from jaxda import state as state_lib
from jaxda import tasks as tasks_lib
from jaxda import writers
from jaxda.data import augment
from jaxda.data import pipeline
from jaxda.data.readers import common as sources
from jaxda.tasks import splits
from jaxda.tasks import task as task_base
from jaxda.train import init_weights
from jaxda.train import selection
from jaxda.train.exceptions import ConfigError
from jaxda.train.exceptions import TrainingDivergedError
from jaxda.train.signals import StopRequested
from jaxda.train.signals import StopSignals

# Re-exported for drivers: the loop's user errors, stop signals, warm starts.
__all__ = ["ConfigError", "TrainingDivergedError", "StopRequested",
           "StopSignals", "Run", "setup", "init_or_restore", "create_state",
           "paired_batches", "compile_step", "check_step_memory", "run_steps",
           "evaluate_target",
           "save_pictures", "write_config", "finish", "close",
           "train_and_evaluate", "load_segmenter_weights",
           "load_init_weights", "validate_config"]
load_segmenter_weights = init_weights.load_segmenter_weights
load_init_weights = init_weights.load_init_weights


@dataclasses.dataclass
class Run:
  """Everything set up for a run (host-side objects, no train state).

  ``method`` is the ``jaxda.methods.base.Method`` being trained, ``task``
  the ``jaxda.tasks.task.Task`` it names; ``models`` is what the task built.
  """
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  method: Any
  task: task_base.Task
  models: Any
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


def validate_config(config: ml_collections.ConfigDict, method) -> None:
  """Checks values whose mistakes would surface late or obscurely: the
  loop's own, then the task's and the method's (``ConfigError``)."""
  wanted = tasks_lib.config_task(config)
  if wanted not in tasks_lib.TASKS:
    raise ConfigError(f"config.task must be one of {tuple(tasks_lib.TASKS)}")
  if wanted != method.task:
    raise ConfigError(
        f"config.method {config.method!r} is a {method.task} method but"
        f" config.task is {wanted!r}: use a {wanted} method, or the"
        f" {config.method} config (config.task = {method.task!r})")
  problems = []
  if not config.num_steps >= 1:
    # Every entry point alike (self-training rounds need steps too).
    problems.append(f"config.num_steps must be >= 1, got {config.num_steps}")
  if not config.batch_size >= 1:
    problems.append("config.batch_size must be >= 1")
  if not (config.log_every >= 1 and config.checkpoint_every >= 1):
    problems.append("config.log_every and config.checkpoint_every must be"
                    " >= 1")
  if not config.get("grad_accum_steps", 1) >= 1:
    problems.append("config.grad_accum_steps must be >= 1")
  chosen = config.get("eval", {}).get("selection", selection.LAST)
  if chosen not in selection.SELECTIONS:
    problems.append(f"config.eval.selection must be one of"
                    f" {selection.SELECTIONS}, got {chosen!r}")
  elif chosen != selection.LAST and method.driver is not None:
    problems.append(
        f"config.eval.selection={chosen!r} is supported by the single-phase"
        f" loop, not by {config.method}'s multi-stage driver; use 'last'")
  if not config.get("eval", {}).get("every", 0) >= 0:
    problems.append("config.eval.every must be >= 0 (0: checkpoint_every)")
  problems += tasks_lib.get_task(method.task).config_problems(config, method)
  if method.config_problems is not None:
    problems += method.config_problems(config)
  if problems:
    raise ConfigError(problems[0])


def setup(config: ml_collections.ConfigDict, workdir: str, method) -> Run:
  """Validates the config, loads data, builds models and optimisers."""
  validate_config(config, method)
  task = tasks_lib.get_task(method.task)
  try:  # A no-op unless config.distributed / JAX_* ask for several processes.
    parallel.initialize_distributed(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if jax.process_count() > 1 and method.single_process:
    # Their own evaluation/statistics passes read whole splits.
    raise ConfigError(f"{config.method} runs in one process; multi-process"
                      " runs support the segmentation loop and self-training")
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh(
      None if config.num_devices in (-1, None) else config.num_devices)
  try:
    parallel.check_batch_size(config.batch_size, mesh)
  except ValueError as e:  # A config mistake, reported in one line.
    raise ConfigError(str(e)) from None
  data = task.load_data(config, method)
  class_names = tuple(data["target_val"].class_names)
  try:
    built = task.build(config, method, data)
  except ValueError as e:  # A config value the builders reject.
    raise ConfigError(str(e)) from None
  return Run(config=config, workdir=workdir, mesh=mesh, method=method,
             task=task, models=built["models"], data=data,
             class_names=class_names,
             writer=writers.MetricWriter(workdir,
                                         enabled=parallel.is_main_process()),
             checkpointer=checkpoint_lib.Checkpointer(
                 os.path.join(workdir, "checkpoints"),
                 max_to_keep=config.max_checkpoints),
             tx=built["tx"], labels_fn=built["labels_fn"],
             disc_tx=built["disc_tx"], start_time=time.time())


def create_state(run: Run) -> state_lib.TrainState:
  """Initialises parameters from ``config.seed`` (replicated on the mesh)."""
  key = jax.random.key(run.config.seed)

  def init():
    params, stats, disc_params = run.task.init_variables(run, key)
    return state_lib.TrainState.create(
        params=params, batch_stats=stats, tx=run.tx,
        disc_params=disc_params, disc_tx=run.disc_tx)

  return parallel.init_replicated(init, run.mesh)


def init_or_restore(run: Run, *, create: Callable[[Run], Any] | None = None,
                    on_warm_start: Callable[[Any], Any] | None = None
                    ) -> tuple[state_lib.TrainState, int]:
  """Resume order: this workdir's checkpoint → ``init_checkpoint`` →
  ``init_weights`` → scratch.

  Args:
    run: the run.
    create: ``run -> state`` of a fresh state (default ``create_state``; a
      driver with a larger state passes its own).
    on_warm_start: ``state -> state`` applied after loading another run's or
      imported weights (e.g. copying the student into an EMA teacher).

  Returns:
    ``(state, start_step)``.
  """
  state = (create or create_state)(run)
  if run.checkpointer.latest_step() is not None:
    state, step = run.checkpointer.restore(state)
    run.log(f"Resuming from checkpoint step {step} in"
            f" {run.checkpointer.directory}")
    return state, step
  init_path = run.config.model.init_checkpoint
  if init_path:
    state = init_weights.load_segmenter_weights(run, state, init_path)
    run.log(f"Initialised the segmenter from {init_path}")
  elif run.config.model.get("init_weights"):
    state = init_weights.load_init_weights(run, state,
                                           run.config.model.init_weights)
  else:
    return state, 0
  return (on_warm_start(state) if on_warm_start else state), 0


# --------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------


def paired_batches(run: Run, start_step: int,
                   target_extras: dict[str, np.ndarray] | None = None
                   ) -> Iterator[dict]:
  """``{'source': ..., 'target': ...}`` host batches from ``start_step`` on.

  The data order is a function of (seed, step) only, so a resumed run sees
  exactly the batches an uninterrupted run would have seen. With
  ``config.data.prefetch`` > 0 a thread builds the next batches while the
  (asynchronously dispatched) step runs, so the device does not wait on
  input; ``config.data.decode_workers`` threads decode upcoming batches.
  Each domain keeps its own size (``config.<role>.height/width``); the
  jitted step compiles once per distinct (source, target) shape pair.
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
        extras=target_extras if role == "target" else None,
        workers=config.data.get("decode_workers", 1))
    # Random scale / crop (config.data.scale_*, crop_*); a no-op by default.
    iters[role] = augment.from_config(
        iters[role], config, seed=parallel.process_seed(seeds[role]),
        start_step=start_step)

  def paired():
    while True:
      yield {role: next(it) for role, it in iters.items()}

  size = int(config.data.get("prefetch", 2))
  return pipeline.prefetch(paired(), size) if size > 0 else paired()


# --------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------


def compile_step(run: Run, step_fn: Callable | None = None) -> Callable:
  """Builds the method's step (unless given) and jits it over the mesh."""
  if step_fn is None:
    step_fn = run.method.make_step(run.models, run.config, run.tx, run.disc_tx)
  return parallel.jit_step(step_fn, run.mesh)


_STEP_BYTES: dict[tuple, tuple[Callable, int | None]] = {}


def _size(num_bytes: int) -> str:
  if num_bytes >= 1 << 28:
    return f"{num_bytes / 2**30:.2f} GiB"
  return f"{num_bytes / 2**20:.1f} MiB"


def check_step_memory(run: Run, step_jit: Callable, state, batch, rng, *,
                      bytes_limit: int | None = None) -> None:
  """Raises a one-line ``ConfigError`` if the step cannot fit the device.

  Where the backend reports device memory (``parallel.device_memory_bytes``,
  or ``bytes_limit`` given) the step is compiled for the first batch's
  shapes and its ``memory_analysis()`` total compared with the limit, so an
  oversized batch fails at start-up with what to set, not as an
  out-of-memory deep in XLA. On CPU (no limit) it does nothing: no compile.
  """
  limit = (parallel.device_memory_bytes(run.mesh) if bytes_limit is None
           else bytes_limit)
  if limit is None:
    return
  # Drivers call run_steps once per round/phase with the same step: one
  # compile per (step, batch shapes). The entry keeps step_jit alive so its
  # id is not reused.
  key = (id(step_jit), str(jax.tree.map(lambda x: (x.shape, x.dtype), batch)))
  if key not in _STEP_BYTES:
    _STEP_BYTES[key] = (step_jit, parallel.compiled_bytes(
        step_jit.lower(state, batch, rng).compile()))
  need = _STEP_BYTES[key][1]
  if need is None or need <= limit:
    return
  cfg = run.config
  raise ConfigError(
      f"the train step needs {_size(need)} per device but the device has"
      f" {_size(limit)}: lower --config.batch_size (now"
      f" {cfg.batch_size}), or set --config.model.compute_dtype=bfloat16,"
      " --config.model.remat=True, smaller --config.data.height/width"
      " (or --config.source/target.height/width), or more devices"
      " (--config.num_devices)")


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


@jax.jit
def _fold_in(key_data: jax.Array, step: jax.Array) -> jax.Array:
  """Raw key data of ``fold_in(key, step)`` (placed like its inputs)."""
  return jax.random.key_data(
      jax.random.fold_in(jax.random.wrap_key_data(key_data), step))


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
  # One key per step, a function of (seed, step) only (the flax examples'
  # fold_in), so a resumed run draws what an uninterrupted one would.
  repl = parallel.replicated(run.mesh)
  base_key = jax.device_put(
      jax.random.key_data(jax.random.key(config.seed)), repl)
  progress = writers.ProgressBar(total=stop, initial=start, desc=desc,
                                 enabled=run.is_main)
  pending: list[dict] = []
  first_pending = start
  t_last = time.time()
  try:
    with StopSignals() as signals:
      for step in range(start, stop):
        batch = parallel.shard_batch(next(batches), run.mesh)
        rng = jax.random.wrap_key_data(_fold_in(
            base_key, jax.device_put(np.uint32(step), repl)))
        if step == start:
          check_step_memory(run, step_jit, state, batch, rng)
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


def evaluate_target(run: Run, state, step: int, *,
                    prefix: str = "target") -> dict[str, Any]:
  """The task's metrics of the current model on the target val split (last
  iterate), written under ``prefix/``."""
  return run.task.evaluate(run, state, step, prefix)


def save_pictures(run: Run, state, result: dict[str, Any], *,
                  tag: str = "") -> dict[str, str]:
  """The task's pictures (PNG paths by name; empty off the main process)."""
  return run.task.save_pictures(run, state, result, tag)


def write_config(run: Run) -> None:
  if run.is_main:
    with open(run.path("config.json"), "w") as f:
      json.dump(run.config.to_dict(), f, indent=2, default=str)


def finish(run: Run, state, result: dict[str, Any], *,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Pictures, ``summary.json`` and the closing printout."""
  pictures = save_pictures(run, state, result)
  run.checkpointer.wait()
  target = run.task.summary_target(result)
  table, headline = run.task.report(result)
  summary = {
      "method": run.config.method,
      "seed": int(run.config.seed),
      "steps": int(run.config.num_steps),
      "wall_time_s": round(time.time() - run.start_time, 2),
      "model_selection": run.config.get("eval", {}).get("selection", "last"),
      # The per-domain input sizes trained at (target val: the target's).
      "sizes": {role: list(splits.domain_size(run.config, role))
                for role in ("source", "target")
                if f"{role}_train" in run.data or role == "target"},
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
    if "selection" in summary:
      run.log(f"model selection: step {summary['selection']['best_step']},"
              f" {summary['selection']['note']}")
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       method) -> dict[str, Any]:
  """Trains ``method`` for ``config.num_steps`` and evaluates it.

  Resumes automatically from ``workdir/checkpoints``.

  Returns:
    The summary dict also written to ``workdir/summary.json``.
  """
  run = setup(config, workdir, method)
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
    if config.eval.get("selection", "last") == selection.BEST_ON_TARGET_VAL:
      compiled = {}
      def train_until(s, first, stop):
        if not compiled:
          compiled["step"] = compile_step(run)
          compiled["batches"] = paired_batches(run, first)
        return run_steps(run, s, compiled["step"], compiled["batches"],
                         first, stop)
      state, result, info = selection.train_select_best(
          run, state, start, train_until=train_until,
          evaluate=lambda s, step: evaluate_target(run, s, step))
      return finish(run, state, result, extra=info)
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
