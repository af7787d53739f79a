"""HRDA in the DAFormer / MIC step (METHODS.md §17.3.8): the network wrapper,
the student's multi-resolution pass and its loss, the config checks.

With ``config.daformer.hrda`` the segmenter is ``jaxda.models.hrda.HRDA``
around the configured network (``wrap``). Every student pass (source,
ClassMix, MIC) draws its own detail box (``hrda_fusion.detail_box``; one per
pass, shared by the batch, as HRDA) and trains on

  (1 - hr_loss_weight) * CE(fused, y) + hr_loss_weight * CE(detail, crop(y))

with the pixel weights cropped like the labels (HRDA's ``HRDAHead.losses``,
``lr_loss_weight`` 0; the fused logits cover the whole crop, the context
alone outside the box). The teacher's pseudo labels and evaluation go
through the wrapper's ``__call__`` (sliding-window HRDA inference), so the
rest of the step is DAFormer's.
"""

from __future__ import annotations

import jax

from jaxda import losses
from jaxda import models as models_lib
from jaxda import ops
from jaxda.methods import base
from jaxda import hrda_fusion
from jaxda.models import hrda as hrda_model
from jaxda.models import forward as forward_lib
from jaxda.models import mit
from jaxda.tasks import splits

MAX_OFFSETS = ("full", "code")


def output_stride(config) -> int:
  """Logit stride of the configured network: 4 (MiT), 8 (DeepLab-v2)."""
  return 4 if config.daformer.network in mit.MIT_VARIANTS else 8


def divisor(config) -> int:
  """Sizes and detail offsets are multiples of this: output stride /
  context scale (HRDA: 4 / 0.5 = 8)."""
  return int(round(output_stride(config) / float(
      config.daformer.hrda_context_scale)))


def train_size(config) -> tuple[int, int]:
  """``(h, w)`` of the target training crops (ClassMix: both domains)."""
  crop = (int(config.data.get("crop_height", 0)),
          int(config.data.get("crop_width", 0)))
  return crop if all(crop) else splits.domain_size(config, "target")


def detail_size(config) -> tuple[int, int]:
  """The detail crop in pixels (``hrda_detail_crop`` of the training crop)."""
  return hrda_fusion.resolve_size(config.daformer.hrda_detail_crop,
                                  train_size(config))


def slide_stride(config) -> tuple[int, int]:
  """The inference windows' stride in pixels (``hrda_sliding_stride`` of
  the detail crop)."""
  return hrda_fusion.resolve_size(config.daformer.hrda_sliding_stride,
                                  detail_size(config))


def wrap(config, net):
  """``HRDA`` around ``net`` (an unbound DeepLab-v2 or MiT segmenter)."""
  d = config.daformer
  classes = 0 if d.hrda_attention_classwise else 1
  return hrda_model.HRDA(
      hrda_model.with_attention(net, classes=classes,
                                embed_dim=int(d.hrda_attention_embed_dim)),
      output_stride=output_stride(config), detail_size=detail_size(config),
      slide_stride=slide_stride(config),
      context_scale=float(d.hrda_context_scale),
      align_corners=bool(config.model.upsample_align_corners))


def is_hrda(models: base.Models) -> bool:
  return isinstance(models.segmenter, hrda_model.HRDA)


def apply_views(models: base.Models, params, batch_stats, images, box, *,
                bn_mode: str, labelled: bool, dropout_key=None):
  """``HRDA.train_views`` with ``base.forward``'s BatchNorm rule (and MiT's
  DropPath / dropout when ``dropout_key`` is given).

  Returns:
    ``(views, batch_stats)``.
  """
  seg = models.segmenter
  variables = {"params": params, "batch_stats": batch_stats}
  use_batch = forward_lib.uses_batch_statistics(bn_mode, labelled)
  stochastic = dropout_key is not None and isinstance(seg.net, mit.DAFormer)
  kwargs = dict(train_bn=use_batch, deterministic=not stochastic,
                method=hrda_model.HRDA.train_views)
  if stochastic:
    kwargs["rngs"] = {"dropout": dropout_key}
  if use_batch:
    views, mutated = seg.apply(variables, images, box,
                               mutable=["batch_stats"], **kwargs)
    return views, forward_lib.statistics_after(bn_mode, batch_stats,
                                               mutated["batch_stats"])
  return seg.apply(variables, images, box, **kwargs), batch_stats


def make_student_pass(models: base.Models, config):
  """``pass(params, stats, images, labels, weights, *, labelled, key,
  prefix) -> (loss, metrics, stats, (features, feature_images))``.

  ``metrics``: ``{prefix}_main`` (CE of the fused prediction) and
  ``{prefix}_detail`` (CE of the detail crop). ``features`` are MiT's
  context features (None for DeepLab), ``feature_images`` the context view
  they came from (the feature distance's ImageNet input).
  """
  d = config.daformer
  bn_mode = config.model.bn_mode
  align = config.model.upsample_align_corners
  detail_hw = models.segmenter.detail_size
  div = divisor(config)
  lam = float(d.hrda_hr_loss_weight)
  scale = float(d.hrda_context_scale)
  max_offset = str(d.hrda_crop_max_offset)

  def student(params, stats, images, labels, weights, *, labelled, key,
              prefix):
    k_box, k_drop = jax.random.split(key)
    size = images.shape[1:3]
    box = hrda_fusion.detail_box(k_box, size, detail_hw, div, max_offset)
    views, stats = apply_views(models, params, stats, images, box,
                               bn_mode=bn_mode, labelled=labelled,
                               dropout_key=k_drop)
    fused = ops.upsample_bilinear(views["main"], size, align_corners=align)
    detail = ops.upsample_bilinear(views["detail"], detail_hw,
                                   align_corners=align)
    crop = lambda x: hrda_fusion.crop(x, box, detail_hw)
    ce_fused = losses.softmax_cross_entropy(logits=fused, labels=labels,
                                            weights=weights)
    ce_detail = losses.softmax_cross_entropy(
        logits=detail, labels=crop(labels),
        weights=None if weights is None else crop(weights))
    loss = (1.0 - lam) * ce_fused + lam * ce_detail
    metrics = {f"{prefix}_main": ce_fused, f"{prefix}_detail": ce_detail}
    feats = (views.get("features"), hrda_fusion.downscale(images, scale))
    return loss, metrics, stats, feats

  return student


def config_problems(config) -> list[str]:
  """Invalid HRDA settings of ``config.daformer`` (one line each, naming
  the field and what to set); ``[]`` without ``hrda``."""
  d = config.daformer
  if not d.hrda:
    return []
  problems = []

  def need(cond, msg):
    if not cond:
      problems.append(msg)

  if d.hrda_context_scale != 0.5:
    return [f"config.daformer.hrda_context_scale must be 0.5 (HRDA's scales"
            f" [1, 0.5]; the fusion upsamples the context x2), got"
            f" {d.hrda_context_scale}"]
  if d.hrda_crop_max_offset not in MAX_OFFSETS:
    return [f"config.daformer.hrda_crop_max_offset must be one of"
            f" {MAX_OFFSETS}, got {d.hrda_crop_max_offset!r}"]
  name = config.model.name
  need(d.network in mit.MIT_VARIANTS
       or (name in models_lib.SEGMENTER_NAMES and "vgg" not in name),
       f"config.daformer.hrda: HRDA needs a DeepLab-v2 ResNet or a MiT"
       f" network (config.daformer.network), not {name}")
  need(not config.model.multi_level,
       "config.model.multi_level must be False with config.daformer.hrda"
       " (HRDA fuses one output)")
  need(0.0 <= d.hrda_hr_loss_weight <= 1.0,
       "config.daformer.hrda_hr_loss_weight must be in [0, 1], got"
       f" {d.hrda_hr_loss_weight}")
  need(d.hrda_attention_embed_dim >= 1,
       "config.daformer.hrda_attention_embed_dim must be >= 1")
  scales = tuple(config.eval.get("scales", (1.0,)))
  need(scales == (1.0,),
       f"config.eval.scales must be (1.0,) with config.daformer.hrda (HRDA"
       f" infers at one scale; its sizes must divide), got {scales}")
  need(len(tuple(d.hrda_detail_crop)) == 2
       and len(tuple(d.hrda_sliding_stride)) == 2
       and all(float(v) > 0 for v in tuple(d.hrda_detail_crop)
               + tuple(d.hrda_sliding_stride)),
       "config.daformer.hrda_detail_crop and hrda_sliding_stride must be"
       " (h, w) pairs > 0 (pixels, or fractions <= 1)")
  if problems:
    return problems
  os_, div = output_stride(config), divisor(config)
  crop = train_size(config)
  field = ("config.data.crop_height/width" if all(
      (config.data.get("crop_height", 0), config.data.get("crop_width", 0)))
           else "config.data.height/width (or config.target.height/width)")
  if crop[0] % div or crop[1] % div:
    return [f"{field}: HRDA trains on {crop[0]}x{crop[1]} crops; both sides"
            f" must be multiples of {div} (output stride {os_} / context"
            f" scale 0.5): set them to multiples of {div}"]
  det = detail_size(config)
  if not (0 < det[0] <= crop[0] and 0 < det[1] <= crop[1]):
    return [f"config.daformer.hrda_detail_crop gives a {det[0]}x{det[1]}"
            f" detail crop, larger than the {crop[0]}x{crop[1]} training"
            f" crop: set it to at most the crop, e.g. (0.5, 0.5) (HRDA: 512"
            " of 1024)"]
  if det[0] % div or det[1] % div:
    return [f"config.daformer.hrda_detail_crop gives a {det[0]}x{det[1]}"
            f" detail crop; both sides must be multiples of {div} (output"
            f" stride {os_} / context scale 0.5): set e.g."
            f" ({max(div, det[0] // div * div)},"
            f" {max(div, det[1] // div * div)})"]
  stride = slide_stride(config)
  need(stride[0] % os_ == 0 and stride[1] % os_ == 0,
       f"config.daformer.hrda_sliding_stride gives a {stride[0]}x{stride[1]}"
       f" stride; both must be multiples of the output stride {os_}: set"
       " e.g. (0.5, 0.5) (half the detail crop)")
  val = splits.domain_size(config, "target")
  need(val[0] % div == 0 and val[1] % div == 0 and val[0] >= det[0]
       and val[1] >= det[1],
       f"config.target.height/width (or config.data's): HRDA evaluates"
       f" {val[0]}x{val[1]} target images; both sides must be multiples of"
       f" {div} and at least the {det[0]}x{det[1]} detail crop")
  return problems
