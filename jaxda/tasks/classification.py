"""The classification task: image classifiers, accuracy on target val.

The ``Task`` hooks the run loop calls for ``config.task =
'classification'``: models and optimisers (the thuml / DANN SGD recipe),
parameter init, evaluation (confusion matrix on device, accuracies from
``jaxda.metrics`` on the host: accuracy = trace / total, per-class accuracy
= recall of each class, mean class accuracy = their mean over the classes
present, VisDA's metric), pictures and the summary. Method-specific models
come from ``Method`` hooks (region discriminators, attention maps).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxda import metrics
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


def config_problems(config, method) -> list[str]:
  """Invalid classification config values, one line each."""
  del method
  problems = []

  def need(cond, msg):
    if not cond:
      problems.append(msg)

  need(config.model.name in models_lib.CLASSIFIER_NAMES,
       f"config.model.name must be one of {models_lib.CLASSIFIER_NAMES}, got"
       f" {config.model.name!r}")
  bn_problem = forward.bn_mode_problem(config)
  need(bn_problem is None, bn_problem)
  need(config.optim.lr_schedule in ("inv", "constant"),
       "config.optim.lr_schedule must be 'inv' or 'constant'")
  return problems


def schedule_steps(config) -> int:
  """Steps that define training progress p (``optim.schedule_steps`` or
  ``num_steps``)."""
  sched = config.optim.schedule_steps
  return int(config.num_steps if sched in (-1, None) else sched)


def make_classifier_tx(config, progress_steps: int, *,
                       backbone_regex: str | None = None,
                       backbone_lr_mult: float = 1.0,
                       frozen_regexes=(), lr_mult: float = 1.0
                       ) -> tuple[optax.GradientTransformation, Any]:
  """SGD of the thuml / DANN recipe for classification networks.

  Coupled weight decay, momentum, the DANN annealing
  ``lr / (1 + α p)^β`` (``config.optim.lr_schedule = 'inv'``) or a
  constant LR, the backbone at ``backbone_lr_mult`` x LR (0.1 for a
  pretrained backbone), frozen parameters through ``optax.partition``.

  Args:
    config: run config (reads ``config.optim``).
    progress_steps: steps for the progress p = step / progress_steps.
    backbone_regex: parameter-path regex of the backbone (None: no split).
    backbone_lr_mult: LR multiplier of the backbone.
    frozen_regexes: parameter-path regexes never updated.
    lr_mult: multiplier of the whole LR (discriminators: ``disc_lr_mult``).

  Returns:
    ``(tx, labels_fn)`` as ``optim.make_segmenter_tx``.
  """
  o = config.optim
  if o.lr_schedule == "inv":
    schedule = optim.inv_schedule(o.learning_rate, progress_steps,
                                  alpha=o.inv_alpha, beta=o.inv_beta)
  elif o.lr_schedule == "constant":
    schedule = optax.constant_schedule(o.learning_rate)
  else:
    raise ValueError(f"config.optim.lr_schedule must be 'inv' or 'constant',"
                     f" got {o.lr_schedule!r}")
  if o.optimizer == "sgd":
    opt = optax.sgd(schedule, momentum=o.momentum or None,
                    nesterov=bool(o.nesterov))
  elif o.optimizer == "adam":
    # ADDA / DAM: Adam(lr, beta1=0.5).
    opt = optax.adam(schedule, b1=float(o.get("adam_b1", 0.9)))
  else:
    raise ValueError(f"unknown optimizer {o.optimizer!r}; use 'sgd' or"
                     " 'adam'")
  parts = []
  if o.weight_decay:
    parts.append(optax.add_decayed_weights(o.weight_decay))
  parts.append(opt)
  if backbone_regex and backbone_lr_mult != 1.0:
    parts.append(optax.masked(optax.scale(backbone_lr_mult),
                              lambda p: optim.path_mask(p, [backbone_regex])))
  if lr_mult != 1.0:
    parts.append(optax.scale(lr_mult))

  def labels_fn(params):
    return optim.param_labels(params, frozen_regexes)

  tx = optax.partition({optim.TRAIN: optax.chain(*parts),
                        optim.FROZEN: optax.set_to_zero()}, labels_fn)
  return tx, labels_fn


def build_models(config, method, num_classes: int) -> dict[str, Any]:
  """Models and optimisers of a classification run.

  Returns:
    ``{'models', 'tx', 'labels_fn', 'disc_tx'}`` (``disc_tx`` None without
    discriminators).
  """
  adversarial = method.discriminator_inputs != "none"
  region = (method.make_region_discriminators(config)
            if method.make_region_discriminators else None)
  models = forward.ClassificationModels(
      classifier=models_lib.create_classifier(
          config.model.name, num_classes,
          bottleneck_dim=config.model.bottleneck_dim),
      discriminator=(models_lib.DomainDiscriminator(
          hidden=tuple(config.adversarial.disc_hidden)) if adversarial
                     else None),
      region_discriminators=region)
  steps = schedule_steps(config)
  tx, labels_fn = make_classifier_tx(
      config, steps, backbone_regex=models_lib.classifier_backbone_param_regex,
      backbone_lr_mult=config.optim.backbone_lr_mult,
      frozen_regexes=list(config.optim.frozen_regexes))
  disc_tx = None
  if adversarial:
    disc_tx, _ = make_classifier_tx(
        config, steps, lr_mult=config.adversarial.disc_lr_mult)
  return {"models": models, "tx": tx, "labels_fn": labels_fn,
          "disc_tx": disc_tx}


def build(config, method, data) -> dict[str, Any]:
  """``Task.build``: ``build_models`` for the split's classes."""
  return build_models(config, method, len(data["target_val"].class_names))


def init_params(models: forward.ClassificationModels, config, key: jax.Array,
                method):
  """Initial ``(params, batch_stats, disc_params)`` (traceable).

  ``disc_params`` has ``'global'`` (methods with a discriminator) and
  ``'local'`` (region discriminators, a leading K axis on every leaf).
  """
  k_net, k_global, k_local = jax.random.split(key, 3)
  # Training images have the random crop's size when there is one (the
  # region discriminators have one parameter set per map position).
  d = config.data
  height = d.get("crop_height", 0) or d.height
  width = d.get("crop_width", 0) or d.width
  images = jnp.zeros((1, height, width, 3), jnp.float32)
  variables = models.classifier.init(k_net, images)
  fmap = jax.eval_shape(lambda v: models.classifier.apply(
      v, images, method=models.classifier.features), variables)
  _, h, w, c = fmap.shape
  disc_params = {}
  if models.discriminator is not None:
    # A method may put its discriminator on the pooled features instead.
    width = config.model.bottleneck_dim
    features = (method.discriminator_features(config)
                if method.discriminator_features else "bottleneck")
    if features == "pooled":
      width = jax.eval_shape(lambda v: models.classifier.apply(
          v, images), variables)["pooled"].shape[-1]
    disc_params["global"] = models.discriminator.init(
        k_global, jnp.zeros((1, width)))["params"]
  if models.region_discriminators is not None:
    disc_params["local"] = models.region_discriminators.init(
        k_local, jnp.zeros((1, h * w, c)))["params"]
  return (variables["params"], variables.get("batch_stats", {}),
          disc_params)


def init_variables(run, key: jax.Array):
  """``Task.init_variables``: ``init_params`` of the run's models."""
  return init_params(run.models, run.config, key, run.method)


def make_predict_fn(models: forward.ClassificationModels, *,
                    bn_mode: str) -> Callable:
  """``predict(state, images) -> probs`` (B, C), running BN statistics."""

  del bn_mode  # Inference always normalises with the running statistics.

  def predict(state, images):
    # One full forward (features + head in one apply), so a wrapper of the
    # classifier (GAM's activation taps, which match fc3/fc4 with stored
    # statistics) sees the whole network.
    logits = models.classifier.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, images,
        train_bn=False)["logits"]
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  return predict


# The confusion function is the segmentation one: it masks labels of any
# rank, here (B,).
make_confusion_fn = evaluation.make_confusion_fn


def summarize_confusion(confusion: np.ndarray,
                        class_names: Iterable[str]) -> dict[str, Any]:
  """Accuracies from a (C, C) confusion matrix (rows = ground truth).

  Returns:
    ``{'accuracy', 'mean_class_accuracy', 'per_class_accuracy': {name: acc
    or None}}``, fractions in [0, 1]; ``None`` marks a class absent from the
    ground truth (excluded from the mean); an empty matrix scores 0.
  """
  confusion = np.asarray(confusion, np.int64)
  per_class = metrics.per_class_accuracy(confusion)
  empty = not confusion.sum()
  mean = 0.0 if np.all(np.isnan(per_class)) else metrics.mean_class_accuracy(
      confusion)
  return {
      "accuracy": 0.0 if empty else metrics.pixel_accuracy(confusion),
      "mean_class_accuracy": float(mean),
      "per_class_accuracy": {
          name: (None if np.isnan(v) else float(v))
          for name, v in zip(class_names, per_class)},
  }


def format_accuracy_table(result: dict[str, Any]) -> str:
  """A fixed-width per-class accuracy table (percent) for logs."""
  rows = [f"{'class':<16}{'acc. %':>8}"]
  for name, v in result["per_class_accuracy"].items():
    rows.append(f"{name:<16}{'  n/a' if v is None else f'{100 * v:8.2f}'}")
  rows.append(f"{'mean class acc.':<16}"
              f"{100 * result['mean_class_accuracy']:8.2f}")
  rows.append(f"{'accuracy':<16}{100 * result['accuracy']:8.2f}")
  return "\n".join(rows)


def center_crop(config, images: np.ndarray) -> np.ndarray:
  """The centre ``data.crop_height`` x ``crop_width`` of (N, H, W, 3)
  images (evaluation of a recipe that trains on random crops: resize 256,
  centre crop 224); unchanged without a crop."""
  d = config.data
  ch, cw = int(d.get("crop_height", 0)), int(d.get("crop_width", 0))
  h, w = images.shape[1:3]
  if not (ch and cw) or (ch, cw) == (h, w):
    return images
  if ch > h or cw > w:
    raise ValueError(f"config.data.crop_height/width {ch}x{cw} exceed the"
                     f" image size {h}x{w}")
  top, left = (h - ch) // 2, (w - cw) // 2
  return images[:, top:top + ch, left:left + cw]


def _eval_batches(run, images, labels=None):
  images = center_crop(run.config, images)
  return pipeline.eval_batches(images, labels,
                               batch_size=splits.eval_batch_size(run),
                               mode=run.config.data.normalization)


def evaluate(run, state, step: int, prefix: str = "target") -> dict[str, Any]:
  """Accuracy, mean class accuracy, per-class accuracy and the confusion
  matrix on the target val split (last iterate)."""
  predict = make_predict_fn(run.models, bn_mode=run.config.model.bn_mode)
  confusion_fn = jax.jit(
      make_confusion_fn(predict, run.num_classes),
      in_shardings=(parallel.replicated(run.mesh),
                    parallel.batch_sharded(run.mesh)),
      out_shardings=parallel.replicated(run.mesh))
  domain = run.data["target_val"]
  confusion = evaluation.evaluate(
      confusion_fn, state, _eval_batches(run, domain.images, domain.labels),
      run.mesh)
  result = summarize_confusion(confusion, run.class_names)
  result["num_images"] = int(len(domain.images))
  result["confusion"] = confusion.tolist()
  run.writer.write_scalars(step, {
      f"{prefix}/accuracy": result["accuracy"],
      f"{prefix}/mean_class_accuracy": result["mean_class_accuracy"]})
  return result


def _apply_in_batches(run, fn: Callable, state,
                      images_uint8: np.ndarray) -> np.ndarray:
  """``fn(state, images)`` over padded eval batches; rows of real images."""
  fn_jit = parallel.jit_inference(fn, run.mesh)
  out = []
  for batch in _eval_batches(run, images_uint8):
    values = fn_jit(state, parallel.shard_batch(
        {"image": batch["image"]}, run.mesh)["image"])
    out.append(np.asarray(values)[batch["mask"]])
  return np.concatenate(out)


def save_pictures(run, state, result: dict[str, Any],
                  tag: str = "") -> dict[str, str]:
  """Target predictions, confusion matrix, training curves and the method's
  attention maps over target images, if it has them (PNG)."""
  if not run.is_main:
    return {}
  cfg = run.config
  domain = run.data["target_val"]
  n = min(cfg.eval.num_pictures, len(domain.images))
  suffix = f"_{tag}" if tag else ""
  predict = make_predict_fn(run.models, bn_mode=cfg.model.bn_mode)
  probs = _apply_in_batches(run, predict, state, domain.images[:n])
  paths = {
      "target_predictions": visualize.save_classification_grid(
          run.path("pictures", f"target_predictions{suffix}.png"),
          center_crop(cfg, domain.images[:n]), probs.argmax(-1),
          domain.labels[:n],
          run.class_names, max_images=n,
          title=f"{cfg.method} on target val (accuracy"
          f" {100 * result['accuracy']:.1f}%)"),
      "confusion_matrix": visualize.save_confusion_matrix(
          run.path("pictures", f"confusion_matrix{suffix}.png"),
          np.asarray(result["confusion"]), run.class_names),
  }
  if (run.method.attention_maps is not None
      and run.models.region_discriminators is not None):
    attention_fn, title = run.method.attention_maps(run.models, cfg)
    maps = _apply_in_batches(run, attention_fn, state, domain.images[:n])
    # Colour scale from the maps shown (the colour bar gives the values).
    paths["local_attention"] = visualize.save_heatmap_grid(
        run.path("pictures", f"local_attention{suffix}.png"),
        center_crop(cfg, domain.images[:n]), maps, max_rows=min(n, 8),
        title=title)
  history = writers.read_history(run.workdir)
  if history:
    paths["training_curves"] = visualize.save_training_curves(
        run.path("pictures", "training_curves.png"), history)
  return {k: str(v) for k, v in paths.items()}


def summary_target(result: dict[str, Any]) -> dict[str, Any]:
  """The ``target`` entry of ``summary.json``."""
  return {k: result[k] for k in ("accuracy", "mean_class_accuracy",
                                 "per_class_accuracy", "num_images")}


def report(result: dict[str, Any]) -> tuple[str, str]:
  """``(table, headline)`` of the closing printout."""
  return (format_accuracy_table(result),
          f"target accuracy {100 * result['accuracy']:.2f}% (mean class acc."
          f" {100 * result['mean_class_accuracy']:.2f}%)")


def headline(target: dict[str, Any]) -> tuple[str, float]:
  """Runs are compared by target accuracy."""
  return "accuracy", float(target["accuracy"])


CLASSIFICATION = base.Task(
    name="classification", config_problems=config_problems,
    load_data=splits.load_data, build=build, init_variables=init_variables,
    evaluate=evaluate, save_pictures=save_pictures,
    summary_target=summary_target, report=report, headline=headline)
