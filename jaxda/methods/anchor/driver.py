"""Two-phase driver of anchor-task adaptation (MTL variants + HeadFreeze).

``train_and_evaluate(config, workdir)`` runs, on one global step counter:

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
steps ``[0, N1)`` exactly (same optimiser, same LR schedule over
``num_steps``), so their difference is phase 2 alone.

Phase 2 starts a fresh optimiser state (momentum restarts; the LR continues
the global poly schedule unless ``anchor.phase2_learning_rate`` sets a new
one). Checkpoints up to step N1 hold the phase-1 optimiser state, later ones
the phase-2 state; resume restores each with its own structure, and the
transition is a function of the phase-1 parameters only, so a run resumed at
(or after) the boundary equals an uninterrupted one.

The reuse of ``jaxda.train_loop``: its ``Run``, ``run_steps`` (logging, NaN
guard, checkpoints, SIGTERM handling), writers and checkpointer. What is
specific here: the data (depth for the source, anchor labels for the
target, depth of target val for evaluation only), the multi-task model,
the two optimisers and the depth evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import matplotlib
from matplotlib import colors as mpl_colors
from matplotlib import figure as mpl_figure
from matplotlib.backends import backend_agg
import ml_collections
import numpy as np

from jaxda import checkpoint as checkpoint_lib
from jaxda.tasks import depth_math as depth_estimation
from jaxda.tasks import evaluation
from jaxda import metrics as metrics_lib
from jaxda import models as models_lib
from jaxda import optim
from jaxda import parallel
from jaxda import state as state_lib
from jaxda.train import loop as train_loop
from jaxda import visualize
from jaxda import writers
from jaxda.data import pipeline
from jaxda.methods.anchor import step as anchor_steps
from jaxda.methods import base
from jaxda.methods import get_method

IGNORE = 255
MIN_DEPTH = 1e-3  # Lower clip of predicted depth in evaluation.
PHASES_FILE = "phases.json"


@dataclasses.dataclass
class AnchorRun:
  """A ``train_loop.Run`` plus what the anchor-task driver adds.

  Attributes:
    run: the shared run (its ``tx`` is the phase-1 optimiser).
    depth: ``{'source_train': (N, H, W), 'target_val': (M, H, W)}`` float32.
    tx2: the phase-2 optimiser (late layers frozen), or None.
    labels_fn2: partition labels of ``tx2``.
    phase1_steps: N1 (= ``num_steps`` for a single-phase run).
    late_regexes: parameter-path regexes of the late layers.
  """
  run: train_loop.Run
  depth: dict[str, np.ndarray]
  tx2: Any
  labels_fn2: Callable | None
  phase1_steps: int
  late_regexes: tuple[str, ...]

  @property
  def two_phase(self) -> bool:
    return self.phase1_steps < self.run.config.num_steps


# --------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------


def phase1_steps(config) -> int:
  """N1 = ``num_steps - anchor.phase2_steps``, validated."""
  n2 = int(config.anchor.phase2_steps)
  if not 0 <= n2 < config.num_steps:
    raise train_loop.ConfigError(
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


def validate_config(config) -> None:
  train_loop.validate_config(config)
  if config.method != "anchor":
    raise train_loop.ConfigError(
        f"experiments.anchor runs method 'anchor', got {config.method!r}")
  for phase in (1, 2):
    try:
      anchor_steps.task_weights(config, phase)
    except ValueError as e:
      raise train_loop.ConfigError(str(e)) from None
  if config.anchor.adv_input not in anchor_steps.ADV_INPUTS:
    raise train_loop.ConfigError(
        f"anchor.adv_input must be one of {anchor_steps.ADV_INPUTS}, got"
        f" {config.anchor.adv_input!r}")
  if config.anchor.lambda_adv < 0:
    raise train_loop.ConfigError("anchor.lambda_adv must be >= 0")
  if config.get("grad_accum_steps", 1) != 1:
    raise train_loop.ConfigError(
        "anchor does not support grad_accum_steps; set it to 1 and raise"
        " batch_size instead")
  if not config.anchor.late_regexes:
    raise train_loop.ConfigError("anchor.late_regexes must not be empty")
  phase1_steps(config)


def load_data(config, two_phase: bool):
  """Images, labels and depth; target train depth is never loaded.

  Returns:
    ``(domains, depth)``: ``domains`` maps 'source_train', 'target_train'
    (when a phase uses target images; its labels are the anchor labels) and
    'target_val' to ``pipeline.Domain``; ``depth`` maps 'source_train' and
    'target_val' to float32 (N, H, W).
  """
  h, w = config.data.height, config.data.width

  def load(role, split, num):
    cfg = config[role]
    kwargs = dict(role=role, data_dir=cfg.data_dir or None, split=split,
                  height=h, width=w, num_images=num, seed=config.data.seed)
    domain = pipeline.load_domain(cfg.name, require_labels=True, **kwargs)
    return domain, (lambda: pipeline.load_depth(cfg.name, **kwargs))

  n_train, n_val = config.data.num_train_images, config.data.num_val_images
  domains, depth = {}, {}
  domains["source_train"], src_depth = load("source", "train", n_train)
  depth["source_train"] = src_depth()
  phases = (1, 2) if two_phase else (1,)
  if any(anchor_steps.uses_target(config, p) for p in phases):
    domains["target_train"], _ = load("target", "train", n_train)
  domains["target_val"], val_depth = load("target", "val", n_val)
  depth["target_val"] = val_depth()
  names = {tuple(d.class_names) for d in domains.values()}
  if len(names) != 1:
    raise pipeline.DataError(
        f"source and target anchor classes differ: {sorted(names)}")
  return domains, depth


def make_tx(config, frozen: list[str], *, offset: int = 0,
            learning_rate: float | None = None, schedule_steps: int):
  """The segmenter optimiser with ``frozen`` regexes labelled 'frozen'."""
  return optim.make_segmenter_tx(
      learning_rate=(config.optim.learning_rate if learning_rate is None
                     else learning_rate),
      schedule_steps=schedule_steps, momentum=config.optim.momentum,
      weight_decay=config.optim.weight_decay, power=config.optim.power,
      head_regexes=(r"^head_",), head_lr_mult=config.optim.head_lr_mult,
      frozen_regexes=frozen, optimizer=config.optim.optimizer,
      schedule_offset=offset)


def setup(config: ml_collections.ConfigDict, workdir: str) -> AnchorRun:
  """Validates, loads data, builds the model and both optimisers."""
  validate_config(config)
  try:  # A no-op unless config.distributed / JAX_* ask for several processes.
    parallel.initialize_distributed(config)
  except ValueError as e:
    raise train_loop.ConfigError(str(e)) from None
  if jax.process_count() > 1:
    # Its loader and evaluation read whole splits on every process.
    raise train_loop.ConfigError(
        "anchor runs in one process; multi-process runs support the"
        " segmentation loop and self-training")
  n1 = phase1_steps(config)
  two_phase = n1 < config.num_steps
  method = get_method(config.method)
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh(
      None if config.num_devices in (-1, None) else config.num_devices)
  parallel.check_batch_size(config.batch_size, mesh)
  domains, depth = load_data(config, two_phase)
  class_names = tuple(domains["target_val"].class_names)
  net = models_lib.create_multitask(
      config.model.name,
      ((anchor_steps.MAIN, 1), (anchor_steps.ANCHOR, len(class_names))),
      decoder_features=config.anchor.decoder_features)
  disc = disc_tx = None
  sched = config.optim.schedule_steps
  schedule_steps = config.num_steps if sched in (-1, None) else sched
  lr2 = float(config.anchor.phase2_learning_rate)
  phase1_schedule = phase1_schedule_steps(config)
  if config.anchor.lambda_adv > 0:
    disc = models_lib.create_discriminator(config.adversarial.ndf)
    disc_tx = optim.make_discriminator_tx(
        learning_rate=config.adversarial.learning_rate,
        schedule_steps=schedule_steps, b1=config.adversarial.b1,
        b2=config.adversarial.b2, power=config.optim.power)
  frozen = train_loop.frozen_regexes(config)
  tx, labels_fn = make_tx(config, frozen, schedule_steps=phase1_schedule)
  late = tuple(config.anchor.late_regexes)
  tx2 = labels_fn2 = None
  if two_phase:
    if lr2 < 0:  # Continue the global schedule where phase 1 left it.
      tx2, labels_fn2 = make_tx(config, frozen + list(late), offset=n1,
                                schedule_steps=schedule_steps)
    else:  # A fresh poly schedule over the phase-2 steps.
      tx2, labels_fn2 = make_tx(config, frozen + list(late),
                                learning_rate=lr2,
                                schedule_steps=config.num_steps - n1)
  run = train_loop.Run(
      config=config, workdir=workdir, mesh=mesh, method=method,
      models=base.Models(net, disc), data=domains, class_names=class_names,
      writer=writers.MetricWriter(workdir,
                                  enabled=parallel.is_main_process()),
      checkpointer=checkpoint_lib.Checkpointer(
          os.path.join(workdir, "checkpoints"),
          max_to_keep=config.max_checkpoints),
      tx=tx, labels_fn=labels_fn, disc_tx=disc_tx, start_time=time.time())
  return AnchorRun(run=run, depth=depth, tx2=tx2, labels_fn2=labels_fn2,
                   phase1_steps=n1, late_regexes=late)


# --------------------------------------------------------------------------
# State: creation, the phase transition, resume
# --------------------------------------------------------------------------


def create_state(arun: AnchorRun) -> state_lib.TrainState:
  """Phase-1 state initialised from ``config.seed`` (replicated)."""
  run = arun.run
  config = run.config
  h, w = config.data.height, config.data.width
  seg_key, disc_key = jax.random.split(jax.random.key(config.seed))
  channels = anchor_steps.discriminator_channels(run.num_classes,
                                                 config.anchor.adv_input)

  def init():
    variables = run.models.segmenter.init(
        seg_key, jnp.zeros((1, h, w, 3), jnp.float32))
    disc_params = {}
    if run.models.discriminator is not None:
      disc_params["main"] = run.models.discriminator.init(
          disc_key, jnp.zeros((1, h, w, channels), jnp.float32))["params"]
    return state_lib.TrainState.create(
        params=variables["params"], batch_stats=variables["batch_stats"],
        tx=run.tx, disc_params=disc_params, disc_tx=run.disc_tx)

  return parallel.init_replicated(init, run.mesh)


# Optimiser-state fields that are per-parameter moments (Adam's mu/nu, SGD
# momentum's trace), as opposed to step counters.
_MOMENT_FIELDS = (".mu", ".nu", ".trace")


def _carry_moments(fresh, old):
  """Copies moment leaves of ``old`` into ``fresh`` where both have them.

  The phase-2 partition labels the late layers frozen, so its state tree
  lacks their moments (``optax.MaskedNode``); the early layers' moments sit
  at the same tree paths in both phases. Adam's counter goes with them; the
  LR schedule's counter stays fresh (phase 2's schedule has its own offset).
  """
  old_leaves = {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_flatten_with_path(old)[0]}

  # Adam's own step counter goes with its moments (bias correction); a
  # schedule's counter (no moments beside it) does not.
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
  """Phase-1 end state -> phase-2 start: the phase-2 optimiser state.

  Fresh, or (``anchor.phase2_carry_moments``) with the trainable early
  layers' moments carried over, so phase 2 does not restart Adam with
  full-size normalised steps on the encoder.
  """
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
      target = template2 if (arun.two_phase and s > arun.phase1_steps) \
          else state
      try:
        restored, step = ckpt.restore(target, step=s)
      except checkpoint_lib.CheckpointError as e:
        errors.append(str(e))
        continue
      run.log(f"Resuming from checkpoint step {step} in {ckpt.directory}")
      return restored, step
    raise checkpoint_lib.CheckpointError("; ".join(errors))
  if run.config.model.init_checkpoint:
    state = train_loop.load_segmenter_weights(
        run, state, run.config.model.init_checkpoint)
    run.log(f"Initialised the network from {run.config.model.init_checkpoint}")
  return state, 0


# --------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------


def train_batches(arun: AnchorRun, start_step: int,
                  phase: int) -> Iterator[dict]:
  """``{'source': {image, label, depth}, 'target': {image, label}}``.

  Same seeds as ``train_loop.paired_batches``: the data order is a function
  of (seed, step), so resumed runs see the batches of uninterrupted ones.
  The target stream is present only when the phase reads it.
  """
  run = arun.run
  config = run.config
  bs = parallel.local_batch_size(config.batch_size)
  common = dict(batch_size=bs, start_step=start_step, flip=config.data.flip,
                mode=config.data.normalization)
  src = run.data["source_train"]
  iters = {"source": pipeline.train_batches(
      src.images, src.labels, seed=config.seed * 2 + 1,
      extras={"depth": arun.depth["source_train"]}, **common)}
  if anchor_steps.uses_target(config, phase):
    tgt = run.data["target_train"]
    iters["target"] = pipeline.train_batches(
        tgt.images, tgt.labels, seed=config.seed * 2 + 2, **common)
  while True:
    yield {role: next(it) for role, it in iters.items()}


# --------------------------------------------------------------------------
# Evaluation and pictures
# --------------------------------------------------------------------------


def _outputs(run: train_loop.Run, state, images):
  """Evaluation forward: upsampled outputs, running BN statistics."""
  out, _ = base.forward(run.models, state.params, state.batch_stats, images,
                        bn_mode=run.config.model.bn_mode, labelled=False,
                        training=False)
  return base.upsample_outputs(
      out, images.shape[1:3],
      align_corners=run.config.model.upsample_align_corners)


def _eval_batches(arun: AnchorRun) -> Iterator[dict]:
  run = arun.run
  domain = run.data["target_val"]
  depth = arun.depth["target_val"]
  for batch in pipeline.eval_batches(
      domain.images, domain.labels,
      batch_size=train_loop._eval_batch_size(run),  # pylint: disable=protected-access
      mode=run.config.data.normalization):
    # Padding rows get depth 0 (invalid) and drop out of every sum.
    rows = depth[np.maximum(batch["index"], 0)]
    batch["depth"] = np.where(batch["mask"][:, None, None], rows, 0.0)
    yield batch


def evaluate_target(arun: AnchorRun, state, step: int, *,
                    prefix: str = "target") -> dict[str, Any]:
  """Main-task (depth) metrics and anchor mIoU on the target val split."""
  run = arun.run
  num_classes = run.num_classes
  max_depth = float(run.config.anchor.max_depth)

  def fn(state, batch):
    out = _outputs(run, state, batch["image"])
    pred = depth_estimation.predicted_depth(
        out[anchor_steps.MAIN][..., 0], min_depth=MIN_DEPTH,
        max_depth=max_depth)
    sums = depth_estimation.metric_sums(pred, batch["depth"])
    labels = jnp.where(batch["mask"][:, None, None], batch["label"], IGNORE)
    confusion = metrics_lib.confusion_matrix(
        jnp.argmax(out[anchor_steps.ANCHOR], axis=-1), labels, num_classes,
        ignore_index=IGNORE)
    return sums, confusion

  fn_jit = jax.jit(fn, in_shardings=(parallel.replicated(run.mesh),
                                     parallel.batch_sharded(run.mesh)),
                   out_shardings=parallel.replicated(run.mesh))
  sums = {k: 0.0 for k in depth_estimation.SUM_KEYS}
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for batch in _eval_batches(arun):
    s, cm = parallel.to_host(fn_jit(state, parallel.shard_batch(
        batch, run.mesh)))
    sums = {k: sums[k] + float(s[k]) for k in sums}
    confusion += np.asarray(cm, np.int64)
  depth = depth_estimation.metrics_from_sums(sums)
  anchor = evaluation.summarize_confusion(confusion, run.class_names)
  run.writer.write_scalars(step, {
      **{f"{prefix}/depth_{k}": v for k, v in depth.items()
         if k != "num_pixels"},
      f"{prefix}/anchor_miou": anchor["miou"]})
  return {"depth": depth, "anchor": anchor,
          "num_images": int(len(run.data["target_val"].images))}


def predict_depth(arun: AnchorRun, state, images_uint8: np.ndarray
                  ) -> np.ndarray:
  """Predicted depth (N, H, W) of host images (for pictures)."""
  run = arun.run
  max_depth = float(run.config.anchor.max_depth)

  def fn(state, images):
    out = _outputs(run, state, images)
    return depth_estimation.predicted_depth(
        out[anchor_steps.MAIN][..., 0], min_depth=MIN_DEPTH,
        max_depth=max_depth)

  fn_jit = parallel.jit_inference(fn, run.mesh)
  preds = []
  for batch in pipeline.eval_batches(
      images_uint8, None,
      batch_size=train_loop._eval_batch_size(run),  # pylint: disable=protected-access
      mode=run.config.data.normalization):
    out = fn_jit(state, parallel.shard_batch({"image": batch["image"]},
                                             run.mesh)["image"])
    preds.append(np.asarray(out)[batch["mask"]])
  return np.concatenate(preds)


def save_depth_grid(path: str, images: np.ndarray, pred: np.ndarray,
                    depth: np.ndarray, *, max_depth: float,
                    title: str = "") -> str:
  """Rows of [image | predicted depth | ground truth | abs-rel error].

  Depth uses one log colour scale for every panel; invalid ground-truth
  pixels (sky, beyond range) are grey in the ground-truth and error panels.

  Args:
    path: PNG to write.
    images: uint8 (N, H, W, 3).
    pred: (N, H, W) predicted depth.
    depth: (N, H, W) ground truth, <= 0 invalid.
    max_depth: top of the colour scale.
    title: figure title.

  Returns:
    ``path``.
  """
  n, h, w = images.shape[:3]
  valid = depth > 0
  norm = mpl_colors.LogNorm(vmin=1.0, vmax=max_depth)
  cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="0.6")
  err_cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.6")
  err = np.where(valid, np.abs(pred - depth) / np.where(valid, depth, 1.0),
                 np.nan)
  cell = 2.2
  fig = mpl_figure.Figure(figsize=(4 * cell * w / h + 1.5, n * cell + 0.5),
                          layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  axes = fig.subplots(n, 4, squeeze=False)
  for i in range(n):
    axes[i, 0].imshow(images[i])
    im = axes[i, 1].imshow(pred[i], cmap=cmap, norm=norm)
    axes[i, 2].imshow(np.where(valid[i], depth[i], np.nan), cmap=cmap,
                      norm=norm)
    em = axes[i, 3].imshow(err[i], cmap=err_cmap, vmin=0.0, vmax=0.5)
    for ax, name in zip(axes[i], ("target image", "predicted depth",
                                  "ground truth", "abs-rel error")):
      ax.set_title(name, fontsize=8)
      ax.set_axis_off()
  fig.colorbar(im, ax=axes[:, :3], shrink=0.6, label="depth (camera heights)")
  fig.colorbar(em, ax=axes[:, 3], shrink=0.6, label="|d - d*| / d*")
  if title:
    fig.suptitle(title, fontsize=9)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  return path


def save_pictures(arun: AnchorRun, state, result: dict[str, Any], *,
                  tag: str = "") -> dict[str, str]:
  """Target depth predictions, anchor predictions and training curves."""
  run = arun.run
  if not run.is_main:
    return {}
  config = run.config
  domain = run.data["target_val"]
  n = min(config.eval.num_pictures, len(domain.images))
  images = domain.images[:n]
  suffix = f"_{tag}" if tag else ""
  d = result["depth"]
  paths = {"target_depth": save_depth_grid(
      run.path("pictures", f"target_depth{suffix}.png"), images,
      predict_depth(arun, state, images), arun.depth["target_val"][:n],
      max_depth=float(config.anchor.max_depth),
      title=(f"{config.anchor.name} on target val: abs-rel"
             f" {d['abs_rel']:.3f}, delta<1.25 {100 * d['delta1']:.1f}%"))}
  history = writers.read_history(run.workdir)
  if history:
    paths["training_curves"] = visualize.save_training_curves(
        run.path("pictures", "training_curves.png"), history)
  return {k: str(v) for k, v in paths.items()}


def format_result(result: dict[str, Any]) -> str:
  d = result["depth"]
  return (f"depth abs-rel {d['abs_rel']:.4f}  rmse {d['rmse']:.3f}  rmse-log"
          f" {d['rmse_log']:.4f}  delta<1.25 {100 * d['delta1']:.2f}%"
          f"  delta<1.25^2 {100 * d['delta2']:.2f}%  | anchor mIoU"
          f" {100 * result['anchor']['miou']:.2f}%")


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


def _compile(arun: AnchorRun, phase: int):
  run = arun.run
  tx = run.tx if phase == 1 else arun.tx2
  frozen = () if phase == 1 else arun.late_regexes
  step = anchor_steps.make_step(run.models, run.config, tx, run.disc_tx,
                                phase=phase, frozen_regexes=frozen)
  return train_loop.compile_step(run, step)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Runs phase 1 (and HeadFreeze's phase 2), evaluates, writes the summary.

  Resumes automatically from ``workdir/checkpoints``, across the phase
  boundary too.

  Returns:
    The summary dict also written to ``workdir/summary.json``.
  """
  arun = setup(config, workdir)
  run = arun.run
  n1, total = arun.phase1_steps, config.num_steps
  try:
    train_loop.write_config(run)
    run.writer.write_hparams(config.to_dict())
    state, start = init_or_restore(arun)
    run.log(
        f"anchor ({config.anchor.name}): {n1} phase-1 steps"
        + (f" + {total - n1} HeadFreeze steps (frozen: "
           f"{', '.join(arun.late_regexes)})" if arun.two_phase else "")
        + f", batch {config.batch_size} on {run.mesh.devices.size}"
        f" device(s), {_num_params(state.params) / 1e6:.2f}M"
        f" parameters; workdir {os.path.abspath(workdir)}")
    phases = _read_phases(run)
    if start < n1:
      state = train_loop.run_steps(run, state, _compile(arun, 1),
                                   train_batches(arun, start, 1), start, n1,
                                   desc="phase 1")
    if arun.two_phase:
      if start <= n1:
        if "phase1" not in phases:
          phase1 = evaluate_target(arun, state, n1, prefix="target_phase1")
          phases["phase1"] = dict(phase1, step=n1)
          _write_phases(run, phases)
          run.log(f"end of phase 1 (step {n1}): {format_result(phase1)}")
        state = to_phase2(arun, state)
        start = n1
      state = train_loop.run_steps(run, state, _compile(arun, 2),
                                   train_batches(arun, start, 2), start,
                                   total, desc="phase 2 (HeadFreeze)")
    result = evaluate_target(arun, state, total)
    return finish(arun, state, result, phases)
  finally:
    train_loop.close(run)


def finish(arun: AnchorRun, state, result: dict[str, Any],
           phases: dict[str, Any]) -> dict[str, Any]:
  """Pictures, ``summary.json`` and the closing printout."""
  run = arun.run
  config = run.config
  pictures = save_pictures(arun, state, result)
  run.checkpointer.wait()
  summary = {
      "method": config.method,
      "variant": config.anchor.name + ("+headfreeze" if arun.two_phase
                                       else ""),
      "seed": int(config.seed),
      "steps": int(config.num_steps),
      "phase1_steps": int(arun.phase1_steps),
      "wall_time_s": round(time.time() - run.start_time, 2),
      "model_selection": "last",
      "target": result,
      "devices": {"count": int(run.mesh.devices.size),
                  "platform": jax.devices()[0].platform},
      "files": {"workdir": os.path.abspath(run.workdir),
                "checkpoints": run.checkpointer.directory,
                "metrics": run.path("metrics.jsonl"),
                "pictures": pictures,
                "summary": run.path("summary.json")},
      "config": config.to_dict(),
  }
  if "phase1" in phases:
    p1 = phases["phase1"]
    summary["phase1"] = p1
    summary["headfreeze_gain"] = {
        "delta1": result["depth"]["delta1"] - p1["depth"]["delta1"],
        "abs_rel": result["depth"]["abs_rel"] - p1["depth"]["abs_rel"],
        "anchor_miou": result["anchor"]["miou"] - p1["anchor"]["miou"]}
  if run.is_main:
    tmp = run.path("summary.json.tmp")
    with open(tmp, "w") as f:
      json.dump(summary, f, indent=2, default=str)
    os.replace(tmp, run.path("summary.json"))
    lines = [f"\nanchor ({config.anchor.name}) on target val after"
             f" {config.num_steps} steps, {summary['wall_time_s']:.0f} s:",
             "  " + format_result(result)]
    if "phase1" in phases:
      lines.append("  end of phase 1: " + format_result(phases["phase1"]))
    lines += [f"  summary     {run.path('summary.json')}",
              f"  checkpoints {run.checkpointer.directory}",
              f"  metrics     {run.path('metrics.jsonl')}"]
    lines += [f"  picture     {p}" for p in pictures.values()]
    run.log("\n".join(lines) + "\n")
  return summary


def _num_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))
