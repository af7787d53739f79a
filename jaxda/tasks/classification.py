"""The classification task's parts of the shared run loop.

``jaxda.train_loop`` is the one loop of every method; with
``config.task = 'classification'`` it calls these hooks where segmentation
and classification differ (models and optimisers, parameter init,
evaluation, pictures, the summary's target metrics). Everything else (data
loading, paired batches, steps, NaN guard, checkpoints, resume, signals,
``summary.json``) is the same code. This module never imports
``train_loop``; ``run`` below is a ``train_loop.Run``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxda.methods import tada_attention as attention
from jaxda.tasks import classification_eval
from jaxda.tasks import evaluation
from jaxda import models as models_lib
from jaxda import parallel
from jaxda import visualize
from jaxda import writers
from jaxda.data import pipeline
from jaxda.methods import CLASSIFICATION_METHODS
from jaxda.methods import base
from jaxda.methods import classification
from jaxda.methods import dann
from jaxda.methods import tada

TASKS = ("segmentation", "classification")


def task(config) -> str:
  """``config.task``; configs without the field are segmentation."""
  return config.get("task", "segmentation")


def is_classification(config) -> bool:
  return task(config) == "classification"


def config_problems(config) -> list[str]:
  """Messages for invalid classification config values (empty if fine)."""
  problems = []

  def need(cond, msg):
    if not cond:
      problems.append(msg)

  need(config.method in CLASSIFICATION_METHODS,
       f"config.method {config.method!r} is not a classification method;"
       f" use one of {CLASSIFICATION_METHODS}")
  need(config.num_steps >= 0, "config.num_steps must be >= 0")
  need(config.batch_size >= 1, "config.batch_size must be >= 1")
  need(config.model.name in models_lib.CLASSIFIER_NAMES,
       f"config.model.name must be one of {models_lib.CLASSIFIER_NAMES}, got"
       f" {config.model.name!r}")
  need(config.model.bn_mode in base.BN_MODES,
       f"config.model.bn_mode must be one of {base.BN_MODES}")
  need(config.optim.lr_schedule in ("inv", "constant"),
       "config.optim.lr_schedule must be 'inv' or 'constant'")
  need(config.adversarial.grl_schedule in dann.GRL_SCHEDULES,
       f"config.adversarial.grl_schedule must be one of {dann.GRL_SCHEDULES}")
  need(config.adversarial.dann_features in dann.DANN_FEATURES,
       f"config.adversarial.dann_features must be one of {dann.DANN_FEATURES}")
  need(config.adversarial.domain_label_source in (0, 1),
       "config.adversarial.domain_label_source must be 0 or 1")
  need(config.tada.local_attention_form in attention.LOCAL_ATTENTION_FORMS,
       "config.tada.local_attention_form must be one of"
       f" {attention.LOCAL_ATTENTION_FORMS}")
  need(config.log_every >= 1 and config.checkpoint_every >= 1,
       "config.log_every and config.checkpoint_every must be >= 1")
  return problems


def build(config, method: base.Method, num_classes: int) -> dict[str, Any]:
  """Models and optimisers of a classification run.

  Returns:
    ``{'models', 'tx', 'labels_fn', 'disc_tx'}`` (``disc_tx`` None without
    discriminators).
  """
  adversarial = method.name in ("dann", "tada")
  region = None
  if method.name == "tada" and tada.uses_local(config):
    region = models_lib.RegionDiscriminators(
        hidden=tuple(config.tada.region_hidden))
  models = classification.ClassificationModels(
      classifier=models_lib.create_classifier(
          config.model.name, num_classes,
          bottleneck_dim=config.model.bottleneck_dim),
      discriminator=(models_lib.DomainDiscriminator(
          hidden=tuple(config.adversarial.disc_hidden)) if adversarial
                     else None),
      region_discriminators=region)
  steps = dann.schedule_steps(config)
  frozen = list(config.optim.frozen_regexes)
  tx, labels_fn = classification.make_classifier_tx(
      config, steps, backbone_regex=models_lib.classifier_backbone_param_regex,
      backbone_lr_mult=config.optim.backbone_lr_mult, frozen_regexes=frozen)
  disc_tx = None
  if adversarial:
    disc_tx, _ = classification.make_classifier_tx(
        config, steps, lr_mult=config.adversarial.disc_lr_mult)
  return {"models": models, "tx": tx, "labels_fn": labels_fn,
          "disc_tx": disc_tx}


def init_variables(models: classification.ClassificationModels, config,
                   key: jax.Array):
  """Initial ``(params, batch_stats, disc_params)`` (traceable).

  ``disc_params`` has ``'global'`` (DANN, TADA) and ``'local'`` (TADA's
  region discriminators, a leading K axis on every leaf).
  """
  k_net, k_global, k_local = jax.random.split(key, 3)
  images = jnp.zeros((1, config.data.height, config.data.width, 3),
                     jnp.float32)
  variables = models.classifier.init(k_net, images)
  fmap = jax.eval_shape(lambda v: models.classifier.apply(
      v, images, method=models.classifier.features), variables)
  _, h, w, c = fmap.shape
  disc_params = {}
  if models.discriminator is not None:
    # DANN may put its discriminator on the pooled features instead.
    width = config.model.bottleneck_dim
    if (config.method == "dann"
        and config.adversarial.dann_features == "pooled"):
      width = jax.eval_shape(lambda v: models.classifier.apply(
          v, images), variables)["pooled"].shape[-1]
    disc_params["global"] = models.discriminator.init(
        k_global, jnp.zeros((1, width)))["params"]
  if models.region_discriminators is not None:
    disc_params["local"] = models.region_discriminators.init(
        k_local, jnp.zeros((1, h * w, c)))["params"]
  return (variables["params"], variables.get("batch_stats", {}),
          disc_params)


def _eval_batch_size(run) -> int:
  n = run.mesh.devices.size
  return max(n, (run.config.eval.batch_size // n) * n)


def _eval_batches(run, images, labels=None):
  return pipeline.eval_batches(images, labels,
                               batch_size=_eval_batch_size(run),
                               mode=run.config.data.normalization)


def evaluate_target(run, state, step: int, *,
                    prefix: str = "target") -> dict[str, Any]:
  """Accuracy, mean class accuracy, per-class accuracy and the confusion
  matrix on the target val split (last iterate)."""
  predict = classification_eval.make_predict_fn(
      run.models, bn_mode=run.config.model.bn_mode)
  confusion_fn = jax.jit(
      classification_eval.make_confusion_fn(predict, run.num_classes),
      in_shardings=(parallel.replicated(run.mesh),
                    parallel.batch_sharded(run.mesh)),
      out_shardings=parallel.replicated(run.mesh))
  domain = run.data["target_val"]
  confusion = evaluation.evaluate(
      confusion_fn, state, _eval_batches(run, domain.images, domain.labels),
      run.mesh)
  result = classification_eval.summarize_confusion(confusion,
                                                   run.class_names)
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


def save_pictures(run, state, result: dict[str, Any], *,
                  tag: str = "") -> dict[str, str]:
  """Target predictions, confusion matrix, training curves and (TADA) the
  local attention maps over target images (PNG)."""
  if not run.is_main:
    return {}
  cfg = run.config
  domain = run.data["target_val"]
  n = min(cfg.eval.num_pictures, len(domain.images))
  suffix = f"_{tag}" if tag else ""
  predict = classification_eval.make_predict_fn(run.models,
                                                bn_mode=cfg.model.bn_mode)
  probs = _apply_in_batches(run, predict, state, domain.images[:n])
  paths = {
      "target_predictions": visualize.save_classification_grid(
          run.path("pictures", f"target_predictions{suffix}.png"),
          domain.images[:n], probs.argmax(-1), domain.labels[:n],
          run.class_names, max_images=n,
          title=f"{cfg.method} on target val (accuracy"
          f" {100 * result['accuracy']:.1f}%)"),
      "confusion_matrix": visualize.save_confusion_matrix(
          run.path("pictures", f"confusion_matrix{suffix}.png"),
          np.asarray(result["confusion"]), run.class_names),
  }
  if run.models.region_discriminators is not None:
    maps = _apply_in_batches(run, tada.make_attention_fn(run.models, cfg),
                             state, domain.images[:n])
    # Colour scale from the maps shown (the colour bar gives the values;
    # the full range of 1 - H is [0.307, 1]).
    paths["local_attention"] = visualize.save_heatmap_grid(
        run.path("pictures", f"local_attention{suffix}.png"),
        domain.images[:n], maps, max_rows=min(n, 8),
        title=f"TADA local attention w = {cfg.tada.local_attention_form}"
        " on target val")
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
  return (classification_eval.format_accuracy_table(result),
          f"target accuracy {100 * result['accuracy']:.2f}% (mean class acc."
          f" {100 * result['mean_class_accuracy']:.2f}%)")
