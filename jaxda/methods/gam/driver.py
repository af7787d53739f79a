"""Run driver of GAM / DAM: base model, statistics passes, adaptation, report.

1. **Source model.** ``model.init_checkpoint`` names a source-only run; with
   none, one is trained (or reused) in ``workdir/base_source_only`` with the
   source-only recipe (``jaxda.train.warm_start.ensure_base_model``).
2. **State.** A ``FrozenSourceTrainState``: the target network (trained)
   and the frozen source network (``state.source``), both loaded from that
   run, plus one activation discriminator per tapped layer.
3. **Statistics passes** (before the first step, over the train splits):
   per-channel source statistics of every tapped layer (source model, source
   images), then the target statistics of the source model with Gaussian
   matching, computed layer after layer (pass k fixes layer k, whose input
   depends on the matching of the layers before it), as AdaBN does.
4. **Adaptation** with the shared run loop and GAM's step
   (``jaxda.methods.gam.activation_step``), checkpoints and resume as every
   run.
5. **Report.** Per tapped layer: the gap between target and source
   activation statistics (mean and std, in source std units) of the source
   model before adaptation and of the adapted model after (before and after
   its matching), and the discriminators' accuracy in the first and the last
   logged window. Printed, written to ``summary.json['activation_report']``
   and drawn in ``pictures/activation_stats.png``.

Evaluation is the shared one: the adapted network, matched with its running
target statistics, on the target val split, last iterate.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxda import parallel
from jaxda import state as state_lib
from jaxda import writers
from jaxda.data import pipeline
from jaxda.methods import base
from jaxda.methods import classification_steps
from jaxda.methods import source_only
from jaxda.methods.gam import activation_step as gam_step
from jaxda.methods.gam import matching as am
from jaxda.methods.gam import activation_discriminator
from jaxda.methods.gam import taps as activation_taps
from jaxda.tasks import splits
from jaxda.train import init_weights
from jaxda.train import loop as train_loop
from jaxda.train import warm_start
from jaxda.train.exceptions import ConfigError
from jaxda.visualize import activations as activation_pictures


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


# The source-only method each GAM variant's base model trains with.
_BASE_METHODS = {"gam": source_only.SOURCE_ONLY,
                 "gam_cls": classification_steps.SOURCE_ONLY_CLS}


def check_config(config) -> None:
  """Raises ``ConfigError`` on the first of ``step.config_problems``
  (before a base model is trained for nothing)."""
  for problem in gam_step.config_problems(config):
    raise ConfigError(problem)
  if config.gam.get("require_init_checkpoint") and not (
      config.model.init_checkpoint):
    raise ConfigError(
        "this gam preset adapts a trained source model: set"
        " --config.model.init_checkpoint=DIR, the workdir of a run of"
        " python -m experiments.source_only"
        " --config=experiments/configs/source_only.py:paper")


def network(run: train_loop.Run):
  """The run's network (segmenter or classifier; taps once wrapped)."""
  return getattr(run.models, activation_taps.network_field(run.models))


def build_models(run: train_loop.Run) -> train_loop.Run:
  """Wraps the segmenter in taps and swaps in activation discriminators."""
  g = run.config.gam
  taps = activation_taps.ActivationTaps(
      network(run), tuple(g.layers),
      gaussian_matching=bool(g.gaussian_matching))
  disc = (activation_discriminator.ActivationDiscriminator(
      features=tuple(g.disc_features),
      negative_slope=float(g.get("disc_negative_slope", 0.2)))
          if g.discriminators else None)
  models = dataclasses.replace(
      run.models, discriminator=disc,
      **{activation_taps.network_field(run.models): taps})
  return dataclasses.replace(run, models=models)


def create_state(run: train_loop.Run) -> state_lib.FrozenSourceTrainState:
  """Initial state from ``config.seed`` (replicated on the mesh)."""
  config = run.config
  taps = network(run)
  x = jnp.zeros((1, config.data.height, config.data.width, 3), jnp.float32)
  seg_key, disc_key = jax.random.split(jax.random.key(config.seed))
  try:
    shapes = jax.eval_shape(
        lambda: taps.apply_with_taps(taps.module.init(seg_key, x), x,
                                     match="none")[1]["raw"])
  except ValueError as e:
    raise ConfigError(f"config.gam.layers: {e}") from None

  def init():
    variables = taps.init(seg_key, x)
    disc_params = {}
    if run.models.discriminator is not None:
      for i, key in enumerate(taps.keys):
        disc_params[key] = run.models.discriminator.init(
            jax.random.fold_in(disc_key, i),
            jnp.zeros(shapes[key].shape, jnp.float32))["params"]
    model_stats, _ = activation_taps.split_stats(variables["batch_stats"])
    return state_lib.FrozenSourceTrainState.create(
        params=variables["params"], batch_stats=variables["batch_stats"],
        tx=run.tx, disc_params=disc_params, disc_tx=run.disc_tx).replace(
            source={"params": variables["params"],
                    "batch_stats": model_stats})

  return parallel.init_replicated(init, run.mesh)


def load_source_model(run: train_loop.Run, state, path: str):
  """Target and frozen source networks := the source-only run at ``path``."""
  model_stats, act = activation_taps.split_stats(state.batch_stats)
  plain = init_weights.load_segmenter_weights(
      run, state.replace(batch_stats=model_stats), path)
  # Separate buffers: the step donates the state, and one buffer cannot be
  # donated twice.
  source = jax.tree.map(jnp.copy, {"params": plain.params,
                                   "batch_stats": plain.batch_stats})
  return plain.replace(batch_stats=dict(plain.batch_stats,
                                        **{activation_taps.STATS_KEY: act}),
                       source=source)


# --------------------------------------------------------------------------
# Statistics passes
# --------------------------------------------------------------------------


def _make_moments_fn(run: train_loop.Run, match: str):
  taps = network(run)

  def fn(variables, images, mask):
    _, t, _ = taps.apply_with_taps(variables, images, match=match)
    return {"raw": am.tree_moments(t["raw"], mask),
            "matched": am.tree_moments(t["matched"], mask)}

  return jax.jit(fn)


def collect_stats(run: train_loop.Run, variables, images: np.ndarray, *,
                  match: str) -> dict[str, Any]:
  """Per-channel statistics of the tapped layers over ``images``.

  Args:
    run: the run.
    variables: ``{'params', 'batch_stats'}`` of the network to measure.
    images: (N, H, W, 3) uint8 host images.
    match: ``'none'`` or ``'running'`` (never ``'batch'``: the padding of
      the last batch would enter the statistics).

  Returns:
    ``{'raw': {key: ChannelStats}, 'matched': {key: ChannelStats}}`` of
    host-side (C,) arrays.
  """
  fn = _make_moments_fn(run, match)
  total = None
  for batch in pipeline.eval_batches(
      images, None, batch_size=splits.eval_batch_size(run),
      mode=run.config.data.normalization):
    b = parallel.shard_batch({"image": batch["image"],
                              "mask": batch["mask"]}, run.mesh)
    m = fn(variables, b["image"], b["mask"])
    total = m if total is None else am.add_moments(total, m)
  return jax.device_get(am.stats_from_moments(total))


def _variables(params, batch_stats, act_stats):
  model_stats, _ = activation_taps.split_stats(batch_stats)
  return {"params": params,
          "batch_stats": dict(model_stats,
                              **{activation_taps.STATS_KEY: act_stats})}


def initial_statistics(run: train_loop.Run, state):
  """Source statistics and the matched source model's target statistics.

  Returns:
    The state with ``batch_stats['activation_stats']`` filled in.
  """
  source_vars = {"params": state.source["params"],
                 "batch_stats": state.source["batch_stats"]}
  src = collect_stats(run, source_vars, run.data["source_train"].images,
                      match="none")["raw"]
  act = activation_taps.pack_stats(src, src)  # identity matching
  target_images = run.data["target_train"].images
  gm = run.config.gam.gaussian_matching
  # Pass k gets layer k exact: its input depends on layers < k, which the
  # earlier passes already fixed.
  for _ in range(len(src) if gm else 1):
    tgt = collect_stats(run, _variables(state.params, state.batch_stats, act),
                        target_images, match="running" if gm else "none")
    act = activation_taps.pack_stats(src, tgt["raw"])
  act = jax.device_put(jax.tree.map(jnp.asarray, act),
                       parallel.replicated(run.mesh))
  return state.replace(batch_stats=dict(
      activation_taps.split_stats(state.batch_stats)[0],
      **{activation_taps.STATS_KEY: act}))


def activation_report(run: train_loop.Run, variables, *, match: str,
                      source_stats: dict) -> dict[str, dict[str, float]]:
  """Per-layer statistics gaps of ``variables`` on target train images.

  Returns:
    ``{key: {'mean_gap_raw', 'std_gap_raw', 'mean_gap', 'std_gap'}}``:
    ``*_raw`` of the layer's own output, the others of what flows on (after
    matching; equal without it), in source std units
    (``jaxda.methods.gam.matching.stats_gap``).
  """
  n = run.config.gam.report_images
  stats = collect_stats(run, variables, run.data["target_train"].images[:n],
                        match=match)
  out = {key: {} for key in network(run).keys}  # network order
  for kind, suffix in (("raw", "_raw"), ("matched", "")):
    gaps = am.stats_gap(stats[kind], source_stats)
    for key, gap in gaps.items():
      out[key][f"mean_gap{suffix}"] = float(gap["mean_gap"])
      out[key][f"std_gap{suffix}"] = float(gap["std_gap"])
  return out


def discriminator_accuracy(workdir: str, keys) -> dict[str, dict[str, float]]:
  """D accuracy per layer in the first and the last logged window."""
  history = writers.read_history(workdir)
  out = {}
  for key in keys:
    points = history.get(f"train/disc_acc_{key}")
    if points:
      out[key] = {"first_log": points[0][1], "first_step": points[0][0],
                  "last_log": points[-1][1], "last_step": points[-1][0]}
  return out


def format_report(report: dict[str, Any]) -> str:
  """A fixed-width per-layer table for logs.

  Gaps are "before -> after (layer output) / after (matched)"; D accuracy
  is "first -> last logged window".
  """
  acc = report.get("discriminator_accuracy") or {}
  rows = [f"{'layer':<18}{'mean gap':>24}{'std gap':>24}{'D accuracy':>16}"]
  for key, b in report["before"].items():
    a = report["after"][key]
    cells = [f"{key:<18}"]
    for stat in ("mean_gap", "std_gap"):
      cells.append(f"{b[stat]:.3f} -> {a[stat + '_raw']:.3f} /"
                   f" {a[stat]:.3f}".rjust(24))
    d = acc.get(key)
    cells.append((f"{d['first_log']:.3f} -> {d['last_log']:.3f}" if d
                  else "n/a").rjust(16))
    rows.append("".join(cells))
  return "\n".join(rows)


# --------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       method: base.Method) -> dict[str, Any]:
  """Source model (trained if needed), GAM adaptation, evaluation, report.

  Resumable: rerunning the same command continues from the newest
  checkpoint (and reuses a finished base run).

  Returns:
    The summary dict also written to ``workdir/summary.json``.
  """
  config = _copy(config)
  check_config(config)
  g = config.gam
  os.makedirs(workdir, exist_ok=True)
  config.model.init_checkpoint = warm_start.ensure_base_model(
      config, workdir, lambda m: print(m, flush=True),
      _BASE_METHODS[method.name], base_steps=g.base_steps,
      base_learning_rate=g.base_learning_rate, base_optim=g.base_optim)
  run = build_models(train_loop.setup(
      config, workdir, method))
  try:
    train_loop.write_config(run)
    run.writer.write_hparams(config.to_dict())
    state = create_state(run)
    before_path = run.path("activation_report_before.json")
    start = 0
    if run.checkpointer.latest_step() is not None:
      state, start = run.checkpointer.restore(state)
      run.log(f"Resuming from checkpoint step {start} in"
              f" {run.checkpointer.directory}")
    else:
      state = load_source_model(run, state, config.model.init_checkpoint)
      run.log(f"Source and target networks from {config.model.init_checkpoint}")
      state = initial_statistics(run, state)
    _, act = activation_taps.split_stats(state.batch_stats)
    source_stats = jax.device_get(activation_taps.source_stats(act))
    extra: dict[str, Any] = {"base_checkpoint": config.model.init_checkpoint}
    base_summary = os.path.join(config.model.init_checkpoint, "summary.json")
    metric = None  # the task's headline metric, once a result names it
    if os.path.exists(base_summary):
      with open(base_summary) as f:
        base_target = json.load(f)["target"]
      metric, value = run.task.headline(base_target)
      extra[f"base_target_{metric}"] = value
      extra["source_model"] = {"target": base_target}
    if os.path.exists(before_path):
      with open(before_path) as f:
        before = json.load(f)
    else:
      before = {"layers": activation_report(
          run, dict(state.source), match="none", source_stats=source_stats)}
      if g.eval_at_start:
        start_result = train_loop.evaluate_target(run, state, 0,
                                                  prefix="target_start")
        name, value = run.task.headline(
            run.task.summary_target(start_result))
        before[f"target_{name}_at_start"] = value
      if run.is_main:
        with open(before_path, "w") as f:
          json.dump(before, f, indent=2)
    at_start = None
    for key, value in before.items():
      if key.startswith("target_") and key.endswith("_at_start"):
        metric, at_start = key[len("target_"):-len("_at_start")], value
        extra[key] = value
    before = before["layers"]

    def pct(v):
      return "n/a" if v is None else f"{100 * v:.2f}%"

    run.log(
        f"gam: source model target {metric or 'score'}"
        f" {pct(extra.get(f'base_target_{metric}'))},"
        f" with Gaussian matching {'on' if g.gaussian_matching else 'off'}"
        f" before any step {pct(at_start)}; layers"
        f" {', '.join(g.layers)}; discriminators"
        f" {'on' if g.discriminators else 'off'}; drift"
        f" {g.drift_weight} x {g.drift_reduction}")
    if start < config.num_steps:
      step_jit = train_loop.compile_step(run)
      state = train_loop.run_steps(run, state, step_jit,
                                   train_loop.paired_batches(run, start),
                                   start, config.num_steps)
    result = train_loop.evaluate_target(run, state, config.num_steps)
    after = activation_report(
        run, {"params": state.params, "batch_stats": state.batch_stats},
        match="running" if g.gaussian_matching else "none",
        source_stats=source_stats)
    report = {"before": before, "after": after,
              "discriminator_accuracy": discriminator_accuracy(
                  run.workdir, network(run).keys)}
    scalars = {}
    for when in ("before", "after"):
      for key, values in report[when].items():
        for name, v in values.items():
          scalars[f"activations_{when}/{key}/{name}"] = v
    run.writer.write_scalars(config.num_steps, scalars)
    run.log("\nactivation statistics, target vs source (source std units;"
            " before -> after layer output / after matching):\n"
            + format_report(report))
    extra["activation_report"] = report
    if run.is_main:
      extra["activation_picture"] = activation_pictures.save_report_picture(
          run.path("pictures", "activation_stats.png"), report)
    return train_loop.finish(run, state, result, extra=extra)
  finally:
    train_loop.close(run)

