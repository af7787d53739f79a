"""The surface-normal task: normals as the main dense task, segmentation as
its anchor (the anchor-task paper's setting, METHODS.md §11).

A ``jaxda.tasks.task.Task`` (registry name ``'normals'``), the sibling of
``jaxda.tasks.depth``: a ``MultiTaskNet`` with a three-channel normals head
(``NORMALS_HEAD``) and a segmentation head; the source has normals and
segmentation labels, the target segmentation labels only (its val normals
are read by evaluation, never by a step).

Ground truth: float32 (N, H, W, 3) unit vectors, the zero vector marking
pixels without a normal. Sources: the embedded benchmark derives them from
its scene geometry (``synthetic.generate_normals``); a folder data set keeps
them as ``DIR/{train,val}/normals/<stem>.npy`` (one (H, W, 3) float array
per image, the image's native size), e.g. SUNCG / NYUv2 exports.

Math (pure ``jnp``): the prediction is normalised to unit length; the loss
is the mean cosine distance 1 − cos(n̂, n*) over valid pixels; the metrics
are the usual ones (Fouhey et al. 2013, Eigen & Fergus 2015) over every
valid pixel of the evaluation set: mean and median angular error (degrees)
and the percentage of pixels within 11.25°, 22.5° and 30°.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

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
from jaxda.data import registry
from jaxda.data.embedded import synthetic
from jaxda.models import forward
from jaxda.tasks import depth
from jaxda.tasks import evaluation
from jaxda.tasks import splits
from jaxda.tasks import task as base
from jaxda.types import IGNORE_LABEL

NORMALS_HEAD = "normals"  # three channels, normalised in the loss / metrics
SEG_HEAD = depth.SEG_HEAD
THRESHOLDS = (11.25, 22.5, 30.0)  # degrees
THRESHOLD_KEYS = ("within_11_25", "within_22_5", "within_30")
# Tolerance of |n| - 1 for valid ground-truth normals in files.
UNIT_TOLERANCE = 1e-2
_EPS = 1e-6


def valid_normals(normals: jax.Array) -> jax.Array:
  """(B, H, W) mask of pixels with a ground-truth normal (non-zero)."""
  return jnp.sum(jnp.square(normals), axis=-1) > 0.25


def unit(x: jax.Array) -> jax.Array:
  """``x / |x|`` along the last axis (zero stays zero)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def cosine_loss(pred: jax.Array, normals: jax.Array) -> jax.Array:
  """Mean 1 − cos(pred, n*) over valid pixels; 0 when none is valid.

  Args:
    pred: (B, H, W, 3) raw network output (any length).
    normals: (B, H, W, 3) ground truth, unit or zero (invalid).
  """
  if pred.shape != normals.shape:
    raise ValueError(f"prediction {pred.shape} and normals {normals.shape}"
                     " differ in shape")
  valid = valid_normals(normals)
  cos = jnp.sum(unit(pred) * normals, axis=-1)
  return jnp.sum(jnp.where(valid, 1.0 - cos, 0.0)) / jnp.maximum(
      jnp.sum(valid), 1)


def angle_errors(pred: jax.Array, normals: jax.Array) -> jax.Array:
  """(B, H, W) angle in degrees between unit(pred) and the ground truth."""
  cos = jnp.clip(jnp.sum(unit(pred) * normals, axis=-1), -1.0, 1.0)
  return jnp.degrees(jnp.arccos(cos))


def metrics_from_errors(errors: np.ndarray) -> dict[str, float]:
  """Mean / median angle (degrees) and % within the thresholds.

  Args:
    errors: 1-D angles (degrees) of every valid pixel.
  """
  if errors.size == 0:
    nan = float("nan")
    return {"mean_angle_error": nan, "median_angle_error": nan,
            **{k: nan for k in THRESHOLD_KEYS}, "num_pixels": 0}
  errors = np.asarray(errors, np.float64)
  out = {"mean_angle_error": float(errors.mean()),
         "median_angle_error": float(np.median(errors))}
  for key, t in zip(THRESHOLD_KEYS, THRESHOLDS):
    out[key] = float(100.0 * np.mean(errors < t))
  out["num_pixels"] = int(errors.size)
  return out


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NormalsDomain(pipeline.Domain):
  """A ``pipeline.Domain`` with float32 (N, H, W, 3) normals, or None where
  the split's normals are never read."""
  normals: np.ndarray | None = None


def check_normals(array: np.ndarray, path: str,
                  size: tuple[int, int]) -> np.ndarray:
  """Validates one (H, W, 3) normals array read from ``path``.

  Raises:
    DataError: wrong shape (not (H, W, 3) at the image's size ``size``) or
      a non-zero vector that is not unit length; one line naming ``path``.
  """
  array = np.asarray(array, np.float32)
  if array.shape != (*size, 3):
    raise pipeline.DataError(
        f"normals {path} have shape {array.shape}, but its image is"
        f" {size[1]}x{size[0]} (WxH): expected {(*size, 3)} float unit"
        " vectors (zero = no normal)")
  norm = np.linalg.norm(array, axis=-1)
  bad = (norm > 0.5) & (np.abs(norm - 1.0) > UNIT_TOLERANCE)
  bad |= (norm > 0) & (norm <= 0.5)
  if bad.any():
    y, x = np.argwhere(bad)[0]
    raise pipeline.DataError(
        f"normals {path} are not unit length at {int(bad.sum())} pixels"
        f" (e.g. row {y}, column {x}: |n| = {norm[y, x]:.4f}): store unit"
        " vectors, or zero for pixels without a normal")
  return array


def read_folder_normals(data_dir: str, split: str, height: int,
                        width: int) -> np.ndarray:
  """``DIR/<split>/normals/<stem>.npy`` for every image of the split.

  Each file must match its image's native size; the maps are resized by
  nearest neighbour to (height, width) like the labels.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image_dir = os.path.join(data_dir, split, "images")
  normal_dir = os.path.join(data_dir, split, "normals")
  if not os.path.isdir(normal_dir):
    raise pipeline.DataError(
        f"missing normals folder {normal_dir}: add one <stem>.npy (H, W, 3)"
        f" float array per image of {image_dir}")
  stems = sorted(os.path.splitext(n)[0] for n in os.listdir(image_dir)
                 if not n.startswith("."))
  out = []
  for stem in stems:
    image_name = next(n for n in os.listdir(image_dir)
                      if os.path.splitext(n)[0] == stem)
    with Image.open(os.path.join(image_dir, image_name)) as img:
      w0, h0 = img.size
    path = os.path.join(normal_dir, stem + ".npy")
    if not os.path.isfile(path):
      raise pipeline.DataError(f"image {image_name} has no normals {path}")
    try:
      array = np.load(path)
    except (OSError, ValueError) as e:
      raise pipeline.DataError(f"normals {path} unreadable: {e}") from None
    array = check_normals(array, path, (h0, w0))
    rows = (np.arange(height) * h0 // height)[:, None]
    cols = (np.arange(width) * w0 // width)[None, :]
    out.append(array[rows, cols])
  return np.stack(out)


def load_normals(config, role: str, split: str, num: int) -> np.ndarray:
  """Normals of a split, aligned with ``pipeline.load_domain``'s images."""
  cfg = config[role]
  h, w = config.data.height, config.data.width
  if cfg.name == "folder":
    return read_folder_normals(cfg.data_dir, split, h, w)
  if cfg.name != "synthetic":
    raise pipeline.DataError(
        f"{role} {cfg.name!r} has no surface normals: use the embedded"
        " 'synthetic' benchmark or a 'folder' data set with"
        " DIR/{train,val}/normals/*.npy")
  n = synthetic_num_images(split, num)
  return synthetic.generate_normals(
      role, n, height=h, width=w,
      seed=synthetic.split_seed(config.data.seed, split))


def synthetic_num_images(split: str, num: int) -> int:
  """The embedded split's size when ``num`` is -1 / None (the loader's)."""
  return registry.SYNTHETIC_NUM_IMAGES[split] if num in (-1, None) else num


def load_data(config, method) -> dict[str, NormalsDomain]:
  """Images, anchor labels and normals; target train normals never load."""
  h, w = config.data.height, config.data.width

  def load(role, split, num, with_normals):
    cfg = config[role]
    domain = pipeline.load_domain(
        cfg.name, require_labels=True, role=role,
        data_dir=cfg.data_dir or None, split=split, height=h, width=w,
        num_images=num, seed=config.data.seed)
    normals = load_normals(config, role, split, num) if with_normals else None
    if normals is not None and normals.shape[0] != len(domain.images):
      raise pipeline.DataError(
          f"{role} {split}: {normals.shape[0]} normal maps for"
          f" {len(domain.images)} images")
    return NormalsDomain(images=domain.images, labels=domain.labels,
                         class_names=tuple(domain.class_names),
                         normals=normals)

  n_train, n_val = config.data.num_train_images, config.data.num_val_images
  data = {"source_train": load("source", "train", n_train, True)}
  if method.uses_target_images:
    data["target_train"] = load("target", "train", n_train, False)
  data["target_val"] = load("target", "val", n_val, True)
  return data


# --------------------------------------------------------------------------
# Task hooks
# --------------------------------------------------------------------------


def config_problems(config, method) -> list[str]:
  """The depth task's checks (same network and loop constraints)."""
  return [p for p in depth.config_problems(config, method)
          if "max_depth" not in p]


def build(config, method, data) -> dict[str, Any]:
  """The multi-task network (normals + anchor heads) and its optimisers."""
  del method
  num_classes = len(data["target_val"].class_names)
  net = models_lib.create_multitask(
      config.model.name, ((NORMALS_HEAD, 3), (SEG_HEAD, num_classes)),
      decoder_features=config.anchor.decoder_features)
  disc = disc_tx = None
  if config.anchor.lambda_adv > 0:
    disc = models_lib.create_discriminator(config.adversarial.ndf)
    disc_tx = optim.make_discriminator_tx(
        learning_rate=config.adversarial.learning_rate,
        schedule_steps=depth.schedule_steps(config), b1=config.adversarial.b1,
        b2=config.adversarial.b2, power=config.optim.power)
  tx, labels_fn = depth.make_tx(config, depth.frozen_regexes(config),
                                schedule_steps=depth.schedule_steps(config))
  return {"models": forward.Models(net, disc), "tx": tx,
          "labels_fn": labels_fn, "disc_tx": disc_tx}


def discriminator_channels(num_classes: int, adv_input: str) -> int:
  """D input channels: normals (3), anchor softmax (C) or both."""
  return {"main": 3, "anchor": num_classes, "both": num_classes + 3}[adv_input]


init_variables = depth.make_init_variables(discriminator_channels)


def _eval_batches(run):
  domain = run.data["target_val"]
  for batch in pipeline.eval_batches(
      domain.images, domain.labels,
      batch_size=splits.eval_batch_size(run),
      mode=run.config.data.normalization):
    rows = domain.normals[np.maximum(batch["index"], 0)]
    batch["normals"] = np.where(batch["mask"][:, None, None, None], rows, 0.0)
    yield batch


def evaluate(run, state, step: int, prefix: str = "target") -> dict[str, Any]:
  """Angular metrics and anchor mIoU on the target val split.

  Returns:
    ``{mean_angle_error, median_angle_error, within_11_25, within_22_5,
    within_30, num_pixels, 'anchor': summarize_confusion(...),
    num_images}``.
  """
  num_classes = run.num_classes

  def fn(state, batch):
    out = depth.outputs(run, state, batch["image"])
    errors = angle_errors(out[NORMALS_HEAD], batch["normals"])
    errors = jnp.where(valid_normals(batch["normals"]), errors, -1.0)
    labels = jnp.where(batch["mask"][:, None, None], batch["label"],
                       IGNORE_LABEL)
    confusion = metrics_lib.confusion_matrix(
        jnp.argmax(out[SEG_HEAD], axis=-1), labels, num_classes,
        ignore_index=IGNORE_LABEL)
    return errors, confusion

  fn_jit = jax.jit(fn, in_shardings=(parallel.replicated(run.mesh),
                                     parallel.batch_sharded(run.mesh)),
                   out_shardings=parallel.replicated(run.mesh))
  errors = []
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for batch in _eval_batches(run):
    e, cm = parallel.to_host(fn_jit(state, parallel.shard_batch(
        batch, run.mesh)))
    e = np.asarray(e)
    errors.append(e[e >= 0])
    confusion += np.asarray(cm, np.int64)
  result = metrics_from_errors(np.concatenate(errors))
  anchor = evaluation.summarize_confusion(confusion, run.class_names)
  run.writer.write_scalars(step, {
      **{f"{prefix}/{k}": v for k, v in result.items() if k != "num_pixels"},
      f"{prefix}/anchor_miou": anchor["miou"]})
  return {**result, "anchor": anchor,
          "num_images": int(len(run.data["target_val"].images))}


def save_pictures(run, state, result: dict[str, Any],
                  tag: str = "") -> dict[str, str]:
  """Target images | predicted | true normals (RGB = (n + 1) / 2), curves."""
  if not run.is_main:
    return {}
  from PIL import Image  # pylint: disable=g-import-not-at-top
  domain = run.data["target_val"]
  n = min(run.config.eval.num_pictures, len(domain.images), 8)
  fn = parallel.jit_inference(
      lambda s, x: unit(depth.outputs(run, s, x)[NORMALS_HEAD]), run.mesh)
  preds = []
  for batch in pipeline.eval_batches(
      domain.images[:n], None, batch_size=splits.eval_batch_size(run),
      mode=run.config.data.normalization):
    out = fn(state, parallel.shard_batch({"image": batch["image"]},
                                         run.mesh)["image"])
    preds.append(np.asarray(out)[batch["mask"]])
  pred = np.concatenate(preds)
  to_rgb = lambda v: np.clip((v + 1.0) * 127.5, 0, 255).astype(np.uint8)
  rows = [np.concatenate([domain.images[i], to_rgb(pred[i]),
                          to_rgb(domain.normals[i])], axis=1)
          for i in range(n)]
  suffix = f"_{tag}" if tag else ""
  path = run.path("pictures", f"target_normals{suffix}.png")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.concatenate(rows, axis=0)).save(path)
  paths = {"target_normals": path}
  history = writers.read_history(run.workdir)
  if history:
    paths["training_curves"] = visualize.save_training_curves(
        run.path("pictures", "training_curves.png"), history)
  return {k: str(v) for k, v in paths.items()}


def format_result(result: dict[str, Any]) -> str:
  """One line: the angular metrics and the anchor mIoU."""
  return (f"normals mean {result['mean_angle_error']:.2f} deg  median"
          f" {result['median_angle_error']:.2f} deg  <11.25"
          f" {result['within_11_25']:.2f}%  <22.5"
          f" {result['within_22_5']:.2f}%  <30 {result['within_30']:.2f}%"
          f"  | anchor mIoU {100 * result['anchor']['miou']:.2f}%")


def summary_target(result: dict[str, Any]) -> dict[str, Any]:
  """``summary.json['target']``: the angular metrics at the top level."""
  return dict(result)


def report(result: dict[str, Any]) -> tuple[str, str]:
  """The closing printout's table and headline."""
  return ("  " + format_result(result),
          f"target normals within 22.5 deg {result['within_22_5']:.2f}%"
          f" (mean angle {result['mean_angle_error']:.2f} deg)")


def headline(target: dict[str, Any]) -> tuple[str, float]:
  """Runs are compared by the share of target pixels within 22.5° (a
  fraction, as every task's headline; the summary stores it in %)."""
  return "within_22_5", float(target["within_22_5"]) / 100.0


def table_metrics(target: dict[str, Any]) -> dict[str, float]:
  """The comparison tables' angular columns (degrees, %) and anchor mIoU."""
  return {"mean angle (deg)": float(target["mean_angle_error"]),
          "median angle (deg)": float(target["median_angle_error"]),
          "< 11.25 (%)": float(target["within_11_25"]),
          "< 30 (%)": float(target["within_30"]),
          "anchor mIoU (%)": 100.0 * float(target["anchor"]["miou"])}


def gains(result: dict[str, Any], phase1: dict[str, Any]) -> dict[str, float]:
  """HeadFreeze's change over its phase 1 (angles: negative = better)."""
  keys = ("mean_angle_error", "median_angle_error", *THRESHOLD_KEYS)
  return {k: result[k] - phase1[k] for k in keys}


def main_loss(pred: jax.Array, normals: jax.Array) -> jax.Array:
  """The anchor step's main loss on the (B, H, W, 3) head output."""
  return cosine_loss(pred, normals)


NORMALS = base.Task(
    name="normals", config_problems=config_problems, load_data=load_data,
    build=build, init_variables=init_variables, evaluate=evaluate,
    save_pictures=save_pictures, summary_target=summary_target,
    report=report, headline=headline, table_metrics=table_metrics)

# What the anchor-task method needs of its main task.
MAIN = depth.MainTask(head=NORMALS_HEAD, label_key="normals",
                      loss=main_loss, format_result=format_result,
                      gains=gains, discriminator_channels=discriminator_channels)
