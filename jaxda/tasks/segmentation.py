"""The segmentation task: DeepLab segmenters, mIoU on the target val split.

The ``Task`` hooks the run loop calls for semantic segmentation (config
checks, models and optimisers, parameter init, evaluation including the
full-resolution path of real data sets, pictures, summary). The evaluation
maths is in ``evaluation.py`` / ``full_resolution.py``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxda import models as models_lib
from jaxda import optim
from jaxda import parallel
from jaxda import visualize
from jaxda import writers
from jaxda.data import pipeline
from jaxda.models import forward
from jaxda.tasks import task as base
from jaxda.tasks import evaluation
from jaxda.tasks import full_resolution
from jaxda.tasks import splits


def config_problems(config, method) -> list[str]:
  """Invalid segmentation config values, one line each."""
  del method
  problems = []

  def need(cond, msg):
    if not cond:
      problems.append(msg)

  bn_problem = forward.bn_mode_problem(config)
  need(bn_problem is None, bn_problem)
  need(config.model.name in models_lib.SEGMENTER_NAMES,
       f"config.model.name must be one of {models_lib.SEGMENTER_NAMES}, got"
       f" {config.model.name!r}")
  need(config.adversarial.gan.lower() in ("vanilla", "ls"),
       "config.adversarial.gan must be 'vanilla' or 'ls'")
  need(config.model.aspp_branches_used in (1, 2, 3, 4),
       "config.model.aspp_branches_used must be in 1..4")
  need(config.model.get("compute_dtype", "float32") in ("float32",
                                                        "bfloat16"),
       f"config.model.compute_dtype={config.model.compute_dtype!r}; use"
       " 'float32' or 'bfloat16'")
  for role in ("source", "target"):
    size = (config[role].get("height", 0), config[role].get("width", 0))
    need(all(isinstance(v, int) and v >= 0 for v in size),
         f"config.{role}.height/width must be >= 0 (0 = config.data's),"
         f" got {size}")
  need(config.data.height >= 1 and config.data.width >= 1,
       "config.data.height and config.data.width must be >= 1")
  evaluation_cfg = config.eval
  scales = tuple(evaluation_cfg.get("scales", (1.0,)))
  need(len(scales) >= 1 and all(s > 0 for s in scales),
       f"config.eval.scales must be positive, got {scales}")
  return problems


def schedule_steps(config) -> int:
  """Optimiser updates of the LR schedules (one per ``grad_accum_steps``
  batches): ``optim.schedule_steps``, or all of the run's."""
  sched = config.optim.schedule_steps
  accum = int(config.get("grad_accum_steps", 1))
  return -(-config.num_steps // accum) if sched in (-1, None) else sched


def build(config, method, data) -> dict[str, Any]:
  """The segmenter, its optimiser and (when the method has discriminators)
  the output-space discriminator with its optimiser."""
  num_classes = len(data["target_val"].class_names)
  precision = forward.precision_options(config)
  segmenter = models_lib.create_segmenter(
      config.model.name, num_classes,
      multi_level=config.model.multi_level,
      aspp_branches_used=config.model.aspp_branches_used,
      remat=config.model.get("remat", False),
      remat_impl=config.model.get("remat_impl", "gated"), **precision)
  accum = int(config.get("grad_accum_steps", 1))
  steps = schedule_steps(config)
  disc = disc_tx = None
  if method.discriminator_inputs != "none":
    disc = models_lib.create_discriminator(config.adversarial.ndf).clone(
        **precision)
    disc_tx = optim.accumulate(optim.make_discriminator_tx(
        learning_rate=config.adversarial.learning_rate,
        schedule_steps=steps, b1=config.adversarial.b1,
        b2=config.adversarial.b2, power=config.optim.power), accum)
  tx, labels_fn = optim.make_segmenter_tx(
      learning_rate=config.optim.learning_rate,
      schedule_steps=steps, momentum=config.optim.momentum,
      weight_decay=config.optim.weight_decay, power=config.optim.power,
      head_regexes=(models_lib.head_param_regex,),
      head_lr_mult=config.optim.head_lr_mult,
      frozen_regexes=models_lib.segmenter_frozen_regexes(config),
      optimizer=config.optim.optimizer,
      decay_every=int(config.optim.get("decay_every", 0)) // accum,
      decay_factor=float(config.optim.get("decay_factor", 1.0)))
  return {"models": forward.Models(segmenter, disc),
          "tx": optim.accumulate(tx, accum), "labels_fn": labels_fn,
          "disc_tx": disc_tx}


def discriminator_levels(run) -> tuple[str, ...]:
  """Output levels that get a discriminator (the method's, or all)."""
  if run.models.discriminator is None:
    return ()
  if run.method.discriminator_levels is not None:
    return tuple(run.method.discriminator_levels)
  return forward.output_levels(run.config)


def init_variables(run, key: jax.Array):
  """``(params, batch_stats, disc_params)`` from ``key`` (traceable)."""
  h, w = run.config.data.height, run.config.data.width
  seg_key, disc_key = jax.random.split(key)
  variables = run.models.segmenter.init(
      seg_key, jnp.zeros((1, h, w, 3), jnp.float32))
  disc_params = {}
  for i, level in enumerate(discriminator_levels(run)):
    disc_params[level] = run.models.discriminator.init(
        jax.random.fold_in(disc_key, i),
        jnp.zeros((1, h, w, run.num_classes), jnp.float32))["params"]
  return variables["params"], variables.get("batch_stats", {}), disc_params


def make_predict_jit(run) -> Callable:
  """Jitted ``predict(state, images) -> probs`` at the input size."""
  predict = evaluation.make_predict_fn(
      run.models, bn_mode=run.config.model.bn_mode,
      align_corners=run.config.model.upsample_align_corners,
      **full_resolution.eval_views(run.config))
  return parallel.jit_inference(predict, run.mesh)


def eval_batches(run, domain: pipeline.Domain) -> Iterator[dict]:
  """Eval batches of this process's rows (as many on every process)."""
  return parallel.process_eval_batches(
      domain.images, domain.labels,
      global_batch_size=splits.eval_batch_size(run),
      mode=run.config.data.normalization,
      make_batches=pipeline.eval_batches)


def evaluate(run, state, step: int, prefix: str = "target") -> dict[str, Any]:
  """mIoU etc. of the current model on the target val split (last iterate);
  at the labels' own resolution for real data sets (``full_resolution``)."""
  if full_resolution.applies(run.config, run.data["target_val"]):
    return full_resolution.evaluate_target(run, state, step, prefix=prefix)
  predict = evaluation.make_predict_fn(
      run.models, bn_mode=run.config.model.bn_mode,
      align_corners=run.config.model.upsample_align_corners,
      **full_resolution.eval_views(run.config))
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


def predict_labels(run, state, images_uint8: np.ndarray,
                   predict_jit: Callable | None = None) -> np.ndarray:
  """Argmax predictions (N, H, W) for host images (pads to the mesh).

  Every process must call it (a global computation), each with its own
  images; each gets its own images' predictions.
  """
  predict_jit = predict_jit or make_predict_jit(run)
  out = [np.zeros((0,) + images_uint8.shape[1:3], np.int32)]
  for batch in parallel.process_eval_batches(
      images_uint8, None, global_batch_size=splits.eval_batch_size(run),
      mode=run.config.data.normalization,
      make_batches=pipeline.eval_batches):
    probs = predict_jit(state, parallel.shard_batch(
        {"image": batch["image"]}, run.mesh)["image"])
    preds = parallel.local_rows(jnp.argmax(probs, axis=-1), run.mesh)
    out.append(preds[batch["mask"]])
  return np.concatenate(out).astype(np.int32)


def save_pictures(run, state, result: dict[str, Any],
                  tag: str = "") -> dict[str, str]:
  """Target overlays, training curves and the confusion matrix (PNG)."""
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


def summary_target(result: dict[str, Any]) -> dict[str, Any]:
  """The ``target`` entry of ``summary.json``."""
  target = {k: result[k] for k in ("miou", "pixel_accuracy",
                                   "per_class_iou", "num_images")}
  # Full-resolution evaluation of real data sets adds these.
  target.update({k: result[k] for k in ("miou13", "num_pixels")
                 if k in result})
  return target


def report(result: dict[str, Any]) -> tuple[str, str]:
  """``(table, headline)`` of the closing printout."""
  return (evaluation.format_iou_table(result),
          f"target mIoU {100 * result['miou']:.2f}% (pixel acc."
          f" {100 * result['pixel_accuracy']:.2f}%)")


def headline(target: dict[str, Any]) -> tuple[str, float]:
  """Runs are compared by target mIoU."""
  return "miou", float(target["miou"])


SEGMENTATION = base.Task(
    name="segmentation", config_problems=config_problems,
    load_data=splits.load_data, build=build, init_variables=init_variables,
    evaluate=evaluate, save_pictures=save_pictures,
    summary_target=summary_target, report=report, headline=headline)
