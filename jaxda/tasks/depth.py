"""The depth task: depth as the main dense task, segmentation as its anchor.

A ``jaxda.tasks.task.Task`` (registry name ``'depth'``): the network is a
``MultiTaskNet`` with a one-channel log-depth head (``DEPTH_HEAD``) and a
segmentation head (``SEG_HEAD``); the source has depth and segmentation
labels, the target segmentation labels only (its val depth is read for
evaluation, never by a step). The run loop calls the hooks below; the
anchor-task method (``jaxda.methods.anchor``) adds its phases on top.

The math (pure ``jnp``): ground truth marks invalid pixels (sky, beyond the
sensor range) with depth <= 0; they contribute to nothing. The network
predicts log-depth; the loss is the L1 distance of log-depths (scale-aware,
robust to the long tail of far pixels). Metrics are the usual
monocular-depth set (Eigen et al. 2014):

  abs_rel  = mean |d - d*| / d*          sq_rel = mean (d - d*)^2 / d*
  rmse     = sqrt(mean (d - d*)^2)       rmse_log = sqrt(mean (ln d - ln d*)^2)
  delta_k  = fraction with max(d / d*, d* / d) < 1.25^k, k = 1, 2, 3

averaged over every valid pixel of the evaluation set (pixel-weighted, not
per-image): ``metric_sums`` runs on device per batch, the host adds the
sums and ``metrics_from_sums`` divides.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxda import metrics as metrics_lib
from jaxda import models as models_lib
from jaxda import optim
from jaxda import parallel
from jaxda import visualize
from jaxda import writers
from jaxda.data import pipeline
from jaxda.models import forward
from jaxda.tasks import task as base
from jaxda.tasks import evaluation
from jaxda.tasks import splits
from jaxda.types import IGNORE_LABEL
from jaxda.visualize import depth_maps

DEPTH_HEAD = "depth"  # one channel: natural-log depth
SEG_HEAD = "seg"      # the anchor: C class logits
MIN_DEPTH = 1e-3      # lower clip of predicted depth in evaluation

DELTA_BASE = 1.25
SUM_KEYS = ("count", "abs_rel", "sq_rel", "sq_err", "sq_log_err", "delta1",
            "delta2", "delta3")


def valid_depth(depth: jax.Array) -> jax.Array:
  """Boolean mask of pixels with ground truth (depth > 0), same shape."""
  return depth > 0


def log_depth_l1_loss(pred_log_depth: jax.Array, depth: jax.Array) -> jax.Array:
  """Mean |pred - ln d*| over valid pixels.

  Args:
    pred_log_depth: (B, H, W) predicted natural-log depth.
    depth: (B, H, W) ground-truth depth; <= 0 marks invalid pixels.

  Returns:
    Scalar float32; 0 when no pixel is valid.
  """
  if pred_log_depth.shape != depth.shape:
    raise ValueError(f"prediction {pred_log_depth.shape} and depth"
                     f" {depth.shape} differ in shape")
  valid = valid_depth(depth)
  target = jnp.log(jnp.where(valid, depth, 1.0))
  err = jnp.where(valid, jnp.abs(pred_log_depth.astype(jnp.float32) - target),
                  0.0)
  return jnp.sum(err) / jnp.maximum(jnp.sum(valid), 1)


def predicted_depth(pred_log_depth: jax.Array, *, min_depth: float,
                    max_depth: float) -> jax.Array:
  """``exp`` of the log-depth, clipped to [min_depth, max_depth] (eval)."""
  return jnp.clip(jnp.exp(pred_log_depth.astype(jnp.float32)), min_depth,
                  max_depth)


def metric_sums(pred_depth: jax.Array,
                depth: jax.Array) -> dict[str, jax.Array]:
  """Per-batch sums behind every metric (add over batches, then divide).

  Args:
    pred_depth: (B, H, W) predicted depth, > 0.
    depth: (B, H, W) ground-truth depth; <= 0 marks invalid pixels.

  Returns:
    ``{key: float32 scalar}`` for ``SUM_KEYS``; ``count`` is the number of
    valid pixels.
  """
  valid = valid_depth(depth)
  gt = jnp.where(valid, depth, 1.0).astype(jnp.float32)
  pred = jnp.where(valid, pred_depth, 1.0).astype(jnp.float32)
  diff = pred - gt
  ratio = jnp.maximum(pred / gt, gt / pred)
  log_diff = jnp.log(pred) - jnp.log(gt)
  per_pixel = {
      "count": jnp.ones_like(gt),
      "abs_rel": jnp.abs(diff) / gt,
      "sq_rel": diff**2 / gt,
      "sq_err": diff**2,
      "sq_log_err": log_diff**2,
  }
  for k in (1, 2, 3):
    per_pixel[f"delta{k}"] = (ratio < DELTA_BASE**k).astype(jnp.float32)
  return {k: jnp.sum(jnp.where(valid, v, 0.0)) for k, v in per_pixel.items()}


def metrics_from_sums(sums: dict[str, float]) -> dict[str, float]:
  """Final metrics from summed ``metric_sums`` (host, float64).

  Returns:
    ``{'abs_rel', 'sq_rel', 'rmse', 'rmse_log', 'delta1', 'delta2',
    'delta3', 'num_pixels'}``; NaN metrics when no pixel was valid.
  """
  n = float(sums["count"])
  mean = lambda k: float(sums[k]) / n if n > 0 else float("nan")
  return {
      "abs_rel": mean("abs_rel"),
      "sq_rel": mean("sq_rel"),
      "rmse": float(np.sqrt(mean("sq_err"))),
      "rmse_log": float(np.sqrt(mean("sq_log_err"))),
      "delta1": mean("delta1"),
      "delta2": mean("delta2"),
      "delta3": mean("delta3"),
      "num_pixels": int(n),
  }


def discriminator_channels(num_classes: int, adv_input: str) -> int:
  """Channels of the output-space discriminator's input (``adv_input``:
  ``'main'`` = depth, ``'anchor'`` = segmentation softmax, ``'both'``)."""
  return {"main": 1, "anchor": num_classes, "both": num_classes + 1}[adv_input]


# --------------------------------------------------------------------------
# Task hooks
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DepthDomain(pipeline.Domain):
  """A ``pipeline.Domain`` with per-pixel depth (float32 (N, H, W), <= 0
  invalid), or None where the split's depth is never read."""
  depth: np.ndarray | None = None


def config_problems(config, method) -> list[str]:
  """Invalid depth-task values, one line each (the loop checks the generic
  ones: steps, batch size, logging)."""
  del method
  problems = []
  if config.model.name not in models_lib.SEGMENTER_NAMES:
    problems.append(f"config.model.name must be one of"
                    f" {models_lib.SEGMENTER_NAMES}, got {config.model.name!r}")
  bn_problem = forward.bn_mode_problem(config)
  if bn_problem:
    problems.append(bn_problem)
  if not float(config.anchor.max_depth) > 0:
    problems.append("config.anchor.max_depth must be > 0")
  if config.get("grad_accum_steps", 1) != 1:
    problems.append("the depth task does not support grad_accum_steps; set it"
                    " to 1 and raise batch_size instead")
  return problems


def load_data(config, method) -> dict[str, DepthDomain]:
  """Images, segmentation labels and depth; target train depth never loads.

  Returns:
    ``'source_train'`` (with depth), ``'target_train'`` (when the method reads
    target images; labels = the anchor labels, no depth) and ``'target_val'``
    (with depth, for evaluation).
  """
  h, w = config.data.height, config.data.width

  def load(role, split, num, with_depth):
    cfg = config[role]
    kwargs = dict(role=role, data_dir=cfg.data_dir or None, split=split,
                  height=h, width=w, num_images=num, seed=config.data.seed)
    domain = pipeline.load_domain(cfg.name, require_labels=True, **kwargs)
    depth = pipeline.load_depth(cfg.name, **kwargs) if with_depth else None
    return DepthDomain(images=domain.images, labels=domain.labels,
                       class_names=tuple(domain.class_names), depth=depth)

  n_train, n_val = config.data.num_train_images, config.data.num_val_images
  data = {"source_train": load("source", "train", n_train, True)}
  if method.uses_target_images:
    data["target_train"] = load("target", "train", n_train, False)
  data["target_val"] = load("target", "val", n_val, True)
  names = {tuple(d.class_names) for d in data.values()}
  if len(names) != 1:
    raise pipeline.DataError(
        f"source and target anchor classes differ: {sorted(names)}")
  return data


def make_tx(config, frozen, *, schedule_steps: int, offset: int = 0,
            learning_rate: float | None = None):
  """The network's optimiser; parameters matching ``frozen`` stay fixed."""
  return optim.make_segmenter_tx(
      learning_rate=(config.optim.learning_rate if learning_rate is None
                     else learning_rate),
      schedule_steps=schedule_steps, momentum=config.optim.momentum,
      weight_decay=config.optim.weight_decay, power=config.optim.power,
      head_regexes=(r"^head_",), head_lr_mult=config.optim.head_lr_mult,
      frozen_regexes=frozen, optimizer=config.optim.optimizer,
      schedule_offset=offset)


def frozen_regexes(config) -> list[str]:
  """Never updated: config extras and BatchNorm affine parameters."""
  return (list(config.optim.frozen_regexes)
          + [models_lib.batchnorm_param_regex])


def schedule_steps(config) -> int:
  """``optim.schedule_steps``, or ``num_steps`` when it is -1."""
  sched = config.optim.schedule_steps
  return int(config.num_steps if sched in (-1, None) else sched)


def build(config, method, data) -> dict[str, Any]:
  """The multi-task network, its optimiser and (``anchor.lambda_adv > 0``)
  an output-space discriminator with its optimiser."""
  del method
  num_classes = len(data["target_val"].class_names)
  net = models_lib.create_multitask(
      config.model.name, ((DEPTH_HEAD, 1), (SEG_HEAD, num_classes)),
      decoder_features=config.anchor.decoder_features)
  disc = disc_tx = None
  if config.anchor.lambda_adv > 0:
    disc = models_lib.create_discriminator(config.adversarial.ndf)
    disc_tx = optim.make_discriminator_tx(
        learning_rate=config.adversarial.learning_rate,
        schedule_steps=schedule_steps(config), b1=config.adversarial.b1,
        b2=config.adversarial.b2, power=config.optim.power)
  tx, labels_fn = make_tx(config, frozen_regexes(config),
                          schedule_steps=schedule_steps(config))
  return {"models": forward.Models(net, disc), "tx": tx,
          "labels_fn": labels_fn, "disc_tx": disc_tx}


def make_init_variables(channels_fn):
  """``init_variables(run, key)`` of a dense multi-task net whose
  discriminator (if any, at ``disc_params['main']``) eats
  ``channels_fn(num_classes, config.anchor.adv_input)`` channels."""

  def init_variables(run, key):
    config = run.config
    h, w = config.data.height, config.data.width
    seg_key, disc_key = jax.random.split(key)
    variables = run.models.segmenter.init(
        seg_key, jnp.zeros((1, h, w, 3), jnp.float32))
    disc_params = {}
    if run.models.discriminator is not None:
      channels = channels_fn(run.num_classes, config.anchor.adv_input)
      disc_params["main"] = run.models.discriminator.init(
          disc_key, jnp.zeros((1, h, w, channels), jnp.float32))["params"]
    return variables["params"], variables["batch_stats"], disc_params

  return init_variables


init_variables = make_init_variables(discriminator_channels)


def outputs(run, state, images):
  """Evaluation forward: upsampled outputs per head, running statistics."""
  out, _ = forward.forward(run.models, state.params, state.batch_stats,
                           images, bn_mode=run.config.model.bn_mode,
                           labelled=False, training=False)
  return forward.upsample_outputs(
      out, images.shape[1:3],
      align_corners=run.config.model.upsample_align_corners)


def _eval_batches(run) -> Iterator[dict]:
  domain = run.data["target_val"]
  for batch in pipeline.eval_batches(
      domain.images, domain.labels, batch_size=splits.eval_batch_size(run),
      mode=run.config.data.normalization):
    # Padding rows get depth 0 (invalid) and drop out of every sum.
    rows = domain.depth[np.maximum(batch["index"], 0)]
    batch["depth"] = np.where(batch["mask"][:, None, None], rows, 0.0)
    yield batch


def evaluate(run, state, step: int, prefix: str = "target") -> dict[str, Any]:
  """Depth metrics and anchor mIoU on the target val split.

  Returns:
    ``{'depth': metrics_from_sums(...), 'anchor': summarize_confusion(...),
    'num_images'}``.
  """
  num_classes = run.num_classes
  max_depth = float(run.config.anchor.max_depth)

  def fn(state, batch):
    out = outputs(run, state, batch["image"])
    pred = predicted_depth(out[DEPTH_HEAD][..., 0], min_depth=MIN_DEPTH,
                           max_depth=max_depth)
    sums = metric_sums(pred, batch["depth"])
    labels = jnp.where(batch["mask"][:, None, None], batch["label"],
                       IGNORE_LABEL)
    confusion = metrics_lib.confusion_matrix(
        jnp.argmax(out[SEG_HEAD], axis=-1), labels, num_classes,
        ignore_index=IGNORE_LABEL)
    return sums, confusion

  fn_jit = jax.jit(fn, in_shardings=(parallel.replicated(run.mesh),
                                     parallel.batch_sharded(run.mesh)),
                   out_shardings=parallel.replicated(run.mesh))
  sums = {k: 0.0 for k in SUM_KEYS}
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for batch in _eval_batches(run):
    s, cm = parallel.to_host(fn_jit(state, parallel.shard_batch(
        batch, run.mesh)))
    sums = {k: sums[k] + float(s[k]) for k in sums}
    confusion += np.asarray(cm, np.int64)
  depth = metrics_from_sums(sums)
  anchor = evaluation.summarize_confusion(confusion, run.class_names)
  run.writer.write_scalars(step, {
      **{f"{prefix}/depth_{k}": v for k, v in depth.items()
         if k != "num_pixels"},
      f"{prefix}/anchor_miou": anchor["miou"]})
  return {"depth": depth, "anchor": anchor,
          "num_images": int(len(run.data["target_val"].images))}


def predict_depth(run, state, images_uint8: np.ndarray) -> np.ndarray:
  """Predicted depth (N, H, W) of host images (for pictures)."""
  max_depth = float(run.config.anchor.max_depth)

  def fn(state, images):
    return predicted_depth(outputs(run, state, images)[DEPTH_HEAD][..., 0],
                           min_depth=MIN_DEPTH, max_depth=max_depth)

  fn_jit = parallel.jit_inference(fn, run.mesh)
  preds = []
  for batch in pipeline.eval_batches(
      images_uint8, None, batch_size=splits.eval_batch_size(run),
      mode=run.config.data.normalization):
    out = fn_jit(state, parallel.shard_batch({"image": batch["image"]},
                                             run.mesh)["image"])
    preds.append(np.asarray(out)[batch["mask"]])
  return np.concatenate(preds)


def save_pictures(run, state, result: dict[str, Any],
                  tag: str = "") -> dict[str, str]:
  """Target depth predictions and training curves (PNG)."""
  if not run.is_main:
    return {}
  config = run.config
  domain = run.data["target_val"]
  n = min(config.eval.num_pictures, len(domain.images))
  images = domain.images[:n]
  suffix = f"_{tag}" if tag else ""
  d = result["depth"]
  paths = {"target_depth": depth_maps.save_depth_grid(
      run.path("pictures", f"target_depth{suffix}.png"), images,
      predict_depth(run, state, images), domain.depth[:n],
      max_depth=float(config.anchor.max_depth),
      title=(f"{config.anchor.name} on target val: abs-rel"
             f" {d['abs_rel']:.3f}, delta<1.25 {100 * d['delta1']:.1f}%"))}
  history = writers.read_history(run.workdir)
  if history:
    paths["training_curves"] = visualize.save_training_curves(
        run.path("pictures", "training_curves.png"), history)
  return {k: str(v) for k, v in paths.items()}


def format_result(result: dict[str, Any]) -> str:
  """One line: the depth metrics and the anchor mIoU."""
  d = result["depth"]
  return (f"depth abs-rel {d['abs_rel']:.4f}  rmse {d['rmse']:.3f}  rmse-log"
          f" {d['rmse_log']:.4f}  delta<1.25 {100 * d['delta1']:.2f}%"
          f"  delta<1.25^2 {100 * d['delta2']:.2f}%  | anchor mIoU"
          f" {100 * result['anchor']['miou']:.2f}%")


def summary_target(result: dict[str, Any]) -> dict[str, Any]:
  """``summary.json['target']``: the whole result (depth, anchor, count)."""
  return dict(result)


def report(result: dict[str, Any]) -> tuple[str, str]:
  """The closing printout's table and headline."""
  d = result["depth"]
  return ("  " + format_result(result),
          f"target depth delta<1.25 {100 * d['delta1']:.2f}% (abs-rel"
          f" {d['abs_rel']:.4f})")


def headline(target: dict[str, Any]) -> tuple[str, float]:
  """Runs are compared by the target's depth delta1."""
  return "depth_delta1", float(target["depth"]["delta1"])


def table_metrics(target: dict[str, Any]) -> dict[str, float]:
  """The comparison tables' depth columns and anchor mIoU (%)."""
  return {"abs-rel": float(target["depth"]["abs_rel"]),
          "anchor mIoU (%)": 100.0 * float(target["anchor"]["miou"])}


def gains(result: dict[str, Any], phase1: dict[str, Any]) -> dict[str, float]:
  """HeadFreeze's change over its phase 1 (delta1 up, abs-rel down = better)."""
  return {"delta1": result["depth"]["delta1"] - phase1["depth"]["delta1"],
          "abs_rel": result["depth"]["abs_rel"] - phase1["depth"]["abs_rel"]}


def main_loss(pred: jax.Array, depth: jax.Array) -> jax.Array:
  """The anchor step's main loss on the (B, H, W, 1) log-depth head."""
  return log_depth_l1_loss(pred[..., 0], depth)


@dataclasses.dataclass(frozen=True)
class MainTask:
  """What the anchor-task method needs of a dense main task.

  Attributes:
    head: name of the main head of the ``MultiTaskNet``.
    label_key: batch / ``Domain`` field of its ground truth.
    loss: ``(head output (B, H, W, C), ground truth) -> scalar``.
    format_result: ``result -> str``, one log line.
    gains: ``(result, phase-1 result) -> {metric: change}``.
    discriminator_channels: ``(num_classes, adv_input) -> channels``.
  """
  head: str
  label_key: str
  loss: Callable[..., jax.Array]
  format_result: Callable[[dict[str, Any]], str]
  gains: Callable[..., dict[str, float]]
  discriminator_channels: Callable[[int, str], int]


MAIN = MainTask(head=DEPTH_HEAD, label_key="depth", loss=main_loss,
                format_result=format_result, gains=gains,
                discriminator_channels=discriminator_channels)

DEPTH = base.Task(
    name="depth", config_problems=config_problems, load_data=load_data,
    build=build, init_variables=init_variables, evaluate=evaluate,
    save_pictures=save_pictures, summary_target=summary_target,
    report=report, headline=headline, table_metrics=table_metrics)
