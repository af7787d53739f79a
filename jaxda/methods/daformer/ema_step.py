"""The DAFormer / MIC train step: EMA teacher, ClassMix, masked target.

One step (METHODS.md §17.3; DAFormer's ``DACS.forward_train``):

1. **Source**: supervised CE of the student on the source batch (every
   output level; DeepLab's aux level weighted by ``loss.lambda_seg_aux``),
   plus, with ``daformer.fd_lambda`` > 0, the thing-class feature distance
   between the student's bottleneck features and the frozen ImageNet
   encoder's (``state.frozen``; MiT networks only).
2. **Teacher**: pseudo labels of the target batch from the EMA teacher
   (``state.teacher``; no dropout, no gradient, running or batch BatchNorm
   statistics by ``daformer.teacher_bn``), weighted by the share of pixels
   whose confidence reaches ``daformer.pseudo_threshold``.
3. **ClassMix**: half of each source image's classes pasted onto the target
   image and its pseudo label (weight 1 on pasted pixels), then colour
   jitter and blur (``photometric.strong_transform``); CE of the student on
   the mixed batch, weighted per pixel.
4. **MIC** (``daformer.mask_lambda`` > 0): the colour-augmented target image
   with ``mask_ratio`` of its ``mask_block``-pixel blocks blanked; CE towards
   the teacher's full-image pseudo labels with the same weights.
   With ``daformer.hrda`` every student pass above is HRDA's (context +
   detail crop, fused and detail CE; ``hrda_step``) and the teacher's pseudo
   labels come from HRDA's sliding-window inference.
   With ``daformer.per_loss_backward`` (default) each of these losses is
   differentiated on its own and the gradients summed
   (``base.minimize_per_loss``), as the original's ``backward()`` per
   loss: one pass's activations alive at a time instead of all of them.
5. The optimiser update, then ``teacher <- a * teacher + (1 - a) * student``
   with ``a = min(1 - 1 / (t + 1), daformer.ema_alpha)``, t the new step.

The state is ``ema_driver.TeacherTrainState``: the loop's ``TrainState``
plus ``teacher`` (EMA parameters) and ``frozen`` (``{'encoder': ...}`` of the
ImageNet network, or ``{}``), so checkpoints and resume keep both.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxda.data import pipeline
from jaxda.methods import base
from jaxda.methods.daformer import feature_distance
from jaxda.methods.daformer import hrda_step
from jaxda.methods.daformer import masking
from jaxda.methods.daformer import mixing
from jaxda.methods.daformer import photometric
from jaxda.methods.daformer import teacher as teacher_lib
from jaxda.models import forward as forward_lib
from jaxda.models import mit

LEVELS = ("main", "aux")


def network(models: base.Models):
  """The single-scale network (inside HRDA's wrapper, if any)."""
  return (models.segmenter.net if hrda_step.is_hrda(models)
          else models.segmenter)


def is_mit(models: base.Models) -> bool:
  """The network is the SegFormer MiT + DAFormer head (``jaxda.models.mit``)."""
  return isinstance(network(models), mit.DAFormer)


def apply_network(models: base.Models, params, batch_stats, images, *,
                  bn_mode: str, labelled: bool, training: bool = True,
                  dropout_key: jax.Array | None = None):
  """``base.forward`` plus MiT's stochastic depth and dropout in training.

  Returns:
    ``(outputs, batch_stats)`` as ``base.forward``.
  """
  if dropout_key is None or not is_mit(models) or not training:
    return base.forward(models, params, batch_stats, images, bn_mode=bn_mode,
                        labelled=labelled, training=training)
  variables = {"params": params, "batch_stats": batch_stats}
  rngs = {"dropout": dropout_key}
  if forward_lib.uses_batch_statistics(bn_mode, labelled):
    outputs, mutated = models.segmenter.apply(
        variables, images, train_bn=True, deterministic=False, rngs=rngs,
        mutable=["batch_stats"])
    return outputs, forward_lib.statistics_after(bn_mode, batch_stats,
                                                 mutated["batch_stats"])
  return models.segmenter.apply(variables, images, train_bn=False,
                                deterministic=False, rngs=rngs), batch_stats


def logits_of(outputs: dict[str, jax.Array], size: tuple[int, int], *,
              align_corners: bool) -> dict[str, jax.Array]:
  """The segmentation levels of ``outputs`` upsampled to ``size``."""
  return base.upsample_outputs(
      {k: v for k, v in outputs.items() if k in LEVELS}, size,
      align_corners=align_corners)


def weighted_ce(logits: dict[str, jax.Array], labels, weights, *,
                lambda_aux: float, prefix: str):
  """``sum_level w_level * CE(level)`` with per-pixel ``weights``.

  The CE's denominator is the number of labelled pixels
  (``losses.softmax_cross_entropy``); mmseg divides by all pixels, which
  differs only where labels are ignored.
  """
  return base.segmentation_loss(logits, labels, lambda_aux=lambda_aux,
                               weights=weights, prefix=prefix)


def normalization_stats(mode: str) -> tuple[tuple[float, ...],
                                            tuple[float, ...], bool]:
  """``(mean, std, bgr)`` of ``data.pipeline.normalize(mode)`` in [0, 1] units
  (``bgr``: the channels are in BGR order)."""
  if mode == "unit":  # x / 127.5 - 1 = (x / 255 - 0.5) / 0.5
    return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False
  if mode == "imagenet":
    return photometric.IMAGENET_MEAN, photometric.IMAGENET_STD, False
  if mode == "caffe_bgr":  # x_bgr - mean, unscaled
    return (tuple(m / 255.0 for m in pipeline.CAFFE_BGR_MEAN),
            (1.0 / 255.0,) * 3, True)
  raise ValueError(f"unknown normalisation {mode!r}")


def strong_augment(key: jax.Array, images: jax.Array, config) -> jax.Array:
  """DACS colour jitter + blur of normalised (B, H, W, 3) images (any
  normalisation); ``color_jitter_strength`` 0 without ``blur`` is the
  identity."""
  d = config.daformer
  if not d.color_jitter_strength and not d.blur:
    return images
  mean, std, bgr = normalization_stats(config.data.normalization)
  x = images[..., ::-1] if bgr else images
  if bgr:
    mean, std = mean[::-1], std[::-1]
  out = photometric.strong_transform(
      key, x, jitter_strength=float(d.color_jitter_strength),
      jitter_skip_prob=float(d.color_jitter_skip_prob), blur=bool(d.blur),
      mean=mean, std=std)
  return out[..., ::-1] if bgr else out


def teacher_pseudo_labels(models: base.Models, config, state, images):
  """``(labels, weights, logits)`` of the EMA teacher on ``images``.

  No gradient, no dropout; BatchNorm: the student's running statistics
  (``teacher_bn='running'``) or the batch's, nothing updated (``'batch'``,
  the original's teacher in train mode with dropout off).
  """
  d = config.daformer
  teacher = jax.lax.stop_gradient(state.teacher)
  outputs, _ = base.forward(
      models, teacher, state.batch_stats, images,
      bn_mode="train" if d.teacher_bn == "batch" else config.model.bn_mode,
      labelled=False, training=d.teacher_bn == "batch")
  logits = logits_of({"main": outputs["main"]}, images.shape[1:3],
                     align_corners=config.model.upsample_align_corners)
  logits = jax.lax.stop_gradient(logits["main"])
  labels, weights = teacher_lib.pseudo_label_and_weight(
      logits, tau=float(d.pseudo_threshold),
      margins=tuple(int(m) for m in d.pseudo_margins),
      scope=d.pseudo_weight_scope)
  return labels, weights, logits


def mixed_inputs(models: base.Models, config, state, batch, rng
                 ) -> dict[str, Any]:
  """Everything the student trains on besides the source batch.

  Returns:
    dict with the teacher's ``pseudo_label`` / ``pseudo_weight`` /
    ``teacher_logits`` on the target, the ClassMix result (``mixed_image``
    after the strong augmentation, ``mixed_label``, ``mixed_weight``,
    ``mix_mask``) and, with MIC, ``masked_image`` / ``patch_mask``.
  """
  d = config.daformer
  src, tgt = batch["source"], batch["target"]
  k_mix, k_aug, k_mask_aug, k_mask = jax.random.split(rng, 4)
  labels, weights, logits = teacher_pseudo_labels(models, config, state,
                                                  tgt["image"])
  mix = mixing.class_mix(
      k_mix, src["image"], src["label"], tgt["image"], labels, weights,
      num_classes=models.segmenter.num_classes, pool=d.mix_pool,
      include_ignore=bool(d.mix_include_ignore))
  out = {"pseudo_label": labels, "pseudo_weight": weights,
         "teacher_logits": logits,
         "mixed_image": strong_augment(k_aug, mix["image"], config),
         "mixed_label": mix["label"], "mixed_weight": mix["weight"],
         "mix_mask": mix["mask"]}
  if d.mask_lambda > 0:  # Its own augmentation draw, as in MIC.
    masked, mask = masking.mask_images(
        k_mask, strong_augment(k_mask_aug, tgt["image"], config),
        block_size=int(d.mask_block), mask_ratio=float(d.mask_ratio))
    out.update(masked_image=masked, patch_mask=mask)
  return out


def imagenet_features(models: base.Models, frozen, images) -> jax.Array:
  """The frozen ImageNet MiT encoder's last-stage features (no gradient)."""
  seg = network(models)
  encoder = mit.MiT(mit.MIT_VARIANTS[seg.variant], drop_path_rate=0.0,
                    ln_eps=seg.ln_eps, dtype=seg.dtype)
  feats = encoder.apply({"params": jax.lax.stop_gradient(frozen["encoder"])},
                        images, True)
  return jax.lax.stop_gradient(feats[-1].astype(jnp.float32))


def make_student_pass(models: base.Models, config):
  """``pass(params, stats, images, labels, weights, *, labelled, key,
  prefix) -> (loss, metrics, stats, (features, feature_images))``: one
  student pass and its CE (every output level, ``{prefix}_main`` ...), or
  HRDA's (``hrda_step.make_student_pass``)."""
  if hrda_step.is_hrda(models):
    return hrda_step.make_student_pass(models, config)
  bn_mode = config.model.bn_mode
  align = config.model.upsample_align_corners
  lambda_aux = config.loss.lambda_seg_aux

  def student(params, stats, images, labels, weights, *, labelled, key,
              prefix):
    outputs, stats = apply_network(models, params, stats, images,
                                   bn_mode=bn_mode, labelled=labelled,
                                   dropout_key=key)
    loss, metrics = weighted_ce(
        logits_of(outputs, images.shape[1:3], align_corners=align), labels,
        weights, lambda_aux=lambda_aux, prefix=prefix)
    return loss, metrics, stats, (outputs.get("features"), images)

  return student


def make_step(models: base.Models, config, tx, disc_tx=None):
  """The DAFormer (``mask_lambda`` 0) / MIC step, ``(state, batch, rng)``;
  HRDA's passes with ``daformer.hrda``."""
  del disc_tx
  d = config.daformer
  frozen_regexes = base.frozen_regexes(config)
  num_classes = models.segmenter.num_classes
  fd_lambda = float(d.fd_lambda)
  mask_lambda = float(d.mask_lambda)
  per_loss = bool(d.get("per_loss_backward", True))
  student = make_student_pass(models, config)

  def step(state, batch, rng):
    k_inputs, k_src, k_mix, k_mask = jax.random.split(rng, 4)
    src = batch["source"]
    inputs = mixed_inputs(models, config, state, batch, k_inputs)

    def source_pass(params, stats, after):
      total, metrics, stats, (feats, feat_images) = student(
          params, stats, src["image"] + after, src["label"], None,
          labelled=True, key=k_src, prefix="ce")
      if fd_lambda > 0:
        mask = feature_distance.thing_class_mask(
            src["label"], feats.shape[1:3], tuple(d.fd_classes),
            min_ratio=float(d.fd_min_ratio), num_classes=num_classes)
        fd = feature_distance.feature_distance(
            feats, imagenet_features(models, state.frozen, feat_images),
            mask, lam=fd_lambda)
        metrics["feature_distance"] = fd
        total = total + fd
      return total, (stats, metrics)

    def target_pass(image, label, weight, key, prefix, scale=1.0):
      """``scale`` x the student's weighted CE on ``inputs[image]``."""
      def f(params, stats, after):
        loss, m, stats, _ = student(
            params, stats, inputs[image] + after, inputs[label],
            inputs[weight], labelled=False, key=key, prefix=prefix)
        return scale * loss, (stats, m)
      return f

    passes = [source_pass, target_pass("mixed_image", "mixed_label",
                                       "mixed_weight", k_mix, "mix_ce")]
    if mask_lambda > 0:  # MIC: towards the full image's pseudo labels
      passes.append(target_pass("masked_image", "pseudo_label",
                                "pseudo_weight", k_mask, "mask_ce",
                                mask_lambda))
    if per_loss:
      new_state, metrics = base.minimize_per_loss(state, tx, passes,
                                                  frozen_regexes)
    else:
      def loss_fn(params):
        total, stats, metrics = 0.0, state.batch_stats, {}
        for f in passes:
          loss, (stats, m) = f(params, stats, 0.0)
          total = total + loss
          metrics.update(m)
        return total, (stats, metrics)

      new_state, metrics = base.minimize(state, tx, loss_fn, frozen_regexes)
    teacher = teacher_lib.ema_update(state.teacher, new_state.params,
                                     new_state.step, alpha=float(d.ema_alpha))
    metrics["pseudo_weight"] = jnp.mean(inputs["pseudo_weight"])
    probs = jax.nn.softmax(inputs["teacher_logits"], axis=-1)
    metrics["teacher_confidence"] = jnp.mean(jnp.max(probs, axis=-1))
    return new_state.replace(teacher=teacher), metrics

  return step


def config_problems(config) -> list[str]:
  """The step's invalid ``config.daformer`` values, one line each."""
  d = config.daformer
  problems = []

  def need(cond, msg):
    if not cond:
      problems.append(msg)

  need(0.0 <= d.ema_alpha < 1.0,
       f"config.daformer.ema_alpha must be in [0, 1), got {d.ema_alpha}")
  need(0.0 < d.pseudo_threshold <= 1.0,
       "config.daformer.pseudo_threshold must be in (0, 1], got"
       f" {d.pseudo_threshold}")
  need(d.pseudo_weight_scope in ("batch", "image"),
       "config.daformer.pseudo_weight_scope must be 'batch' or 'image', got"
       f" {d.pseudo_weight_scope!r}")
  need(len(tuple(d.pseudo_margins)) == 4
       and all(int(m) >= 0 for m in d.pseudo_margins),
       "config.daformer.pseudo_margins must be 4 pixel counts >= 0 (top,"
       f" bottom, left, right), got {tuple(d.pseudo_margins)}")
  need(d.teacher_bn in ("batch", "running"),
       "config.daformer.teacher_bn must be 'batch' or 'running', got"
       f" {d.teacher_bn!r}")
  need(d.mix_pool in ("batch", "image"),
       f"config.daformer.mix_pool must be 'batch' or 'image', got"
       f" {d.mix_pool!r}")
  need(d.fd_lambda >= 0 and d.mask_lambda >= 0,
       "config.daformer.fd_lambda and mask_lambda must be >= 0")
  need(0.0 <= d.mask_ratio < 1.0,
       f"config.daformer.mask_ratio must be in [0, 1), got {d.mask_ratio}")
  need(d.mask_block >= 1,
       f"config.daformer.mask_block must be >= 1, got {d.mask_block}")
  try:
    normalization_stats(config.data.normalization)
  except ValueError as e:
    problems.append(f"config.data.normalization: {e}")
  return problems
