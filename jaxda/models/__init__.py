"""Flax Linen models: DeepLab-v2, VGG and SegFormer-MiT segmenters, the FC
discriminator.

This package is the only place in jaxda with Flax modules. Build models by
name through `create_segmenter` / `create_discriminator`.

Parameter-path regexes below match paths inside the `params` collection,
joined with '/', e.g. 'backbone/layer1/0/bn1/scale' or 'aspp_main/branch_0/
kernel'. The optimiser uses them for the 10× LR heads and to freeze BN.
"""

from typing import Any

from jaxda.models import classifier
from jaxda.models import deeplab
from jaxda.models import discriminator
from jaxda.models import forward
from jaxda.models import mit
from jaxda.models import multitask
from jaxda.models import resnet
from jaxda.models import vgg

ASPP = deeplab.ASPP
# The containers of a run's modules (``jaxda.models.forward``).
Models = forward.Models
ClassificationModels = forward.ClassificationModels
DeepLabV2 = deeplab.DeepLabV2
FCDiscriminator = discriminator.FCDiscriminator
MultiTaskNet = multitask.MultiTaskNet
ResNet = resnet.ResNet
# VGG-16 (torchvision classifier) and DeepLab-v2 VGG-16 (METHODS.md §3.3;
# in the segmenter registry as 'deeplabv2_vgg16').
VGG16 = vgg.VGG16
DeepLabV2VGG = vgg.DeepLabV2VGG
ImageClassifier = classifier.ImageClassifier
DomainDiscriminator = classifier.DomainDiscriminator
RegionDiscriminators = classifier.RegionDiscriminators
# Classification backbones (`create_classifier`).
CLASSIFIER_NAMES = classifier.CLASSIFIER_NAMES
# Params of the classification feature extractor G_f (the rest is the
# bottleneck and classifier heads).
classifier_backbone_param_regex = r'^feature_extractor/'

# Params of the ASPP heads (PyTorch layer5/layer6), trained at 10× the LR.
head_param_regex = r'^(aspp_main|aspp_aux)/'
# BatchNorm scale/bias: every BN module is named 'bn<k>' or '<something>_bn'.
batchnorm_param_regex = r'(^|/)(bn\d*|\w+_bn)/(scale|bias)$'


def segmenter_frozen_regexes(config) -> list[str]:
  """Segmenter parameter-path regexes never updated: config extras,
  BatchNorm affine parameters, and the ASPP branches AdaptSegNet's early
  return leaves dead (PyTorch's SGD skips parameters without gradients, so
  they keep their init values and get no weight decay)."""
  frozen = list(config.optim.frozen_regexes)
  frozen.append(batchnorm_param_regex)
  if config.model.aspp_branches_used < 4:
    dead = '|'.join(str(i) for i in range(config.model.aspp_branches_used, 4))
    frozen.append(rf'aspp_(main|aux)/branch_({dead})/')
  return frozen

# name -> constructor keyword arguments of DeepLabV2.
_SEGMENTERS: dict[str, dict[str, Any]] = {
    'deeplabv2_resnet101': dict(stage_sizes=(3, 4, 23, 3), base_width=64),
    'deeplabv2_resnet50': dict(stage_sizes=(3, 4, 6, 3), base_width=64),
    # Same structure and geometry (ceil pool, 1×1 stride, dilations 2/4,
    # ASPP, two heads) at CPU-test cost; 0.39 M params.
    'deeplabv2_tiny': dict(stage_sizes=(1, 1, 1, 1), base_width=8),
}
# name -> constructor keyword arguments of DeepLabV2VGG (single output, no
# BatchNorm; the originals train it without the 10x head LR).
_VGG_SEGMENTERS: dict[str, dict[str, Any]] = {
    'deeplabv2_vgg16': dict(base_width=64),
}
# SegFormer MiT + DAFormer head (single output at stride 4); the DAFormer /
# MIC driver builds the same net with its extra outputs (features,
# attention) from `config.daformer.network`.
MIT_SEGMENTERS = tuple(mit.MIT_VARIANTS)
SEGMENTER_NAMES = (tuple(_SEGMENTERS) + tuple(_VGG_SEGMENTERS)
                   + MIT_SEGMENTERS)


def create_segmenter(name: str, num_classes: int,
                     **overrides: Any) -> deeplab.DeepLabV2:
  """Builds a registered segmenter.

  Args:
    name: one of `SEGMENTER_NAMES`.
    num_classes: number of output classes C.
    **overrides: DeepLabV2 attributes replacing the registry's defaults, e.g.
      `multi_level=False` or `aspp_branches_used=2`.

  Returns:
    An unbound `DeepLabV2`; `apply(variables, x)` maps (B, H, W, 3) images to
    {'main': (B, h, w, C), 'aux': (B, h, w, C)} logits at output stride 8.
  """
  if name in _VGG_SEGMENTERS:
    return _create_vgg_segmenter(name, num_classes, **overrides)
  if name in MIT_SEGMENTERS:
    return _create_mit_segmenter(name, num_classes, **overrides)
  if name not in _SEGMENTERS:
    raise ValueError(f'Unknown segmenter {name!r}; known: {SEGMENTER_NAMES}')
  kwargs = {**_SEGMENTERS[name], **overrides}
  return deeplab.DeepLabV2(num_classes=num_classes, **kwargs)


def _create_vgg_segmenter(name: str, num_classes: int, *,
                          multi_level: bool = False, dtype: Any = None,
                          remat: bool = False, conv_impl: str = 'auto',
                          remat_impl: str = 'gated',
                          **overrides: Any) -> vgg.DeepLabV2VGG:
  """`DeepLabV2VGG`; options it does not have are refused, not ignored."""
  del conv_impl, remat_impl  # lax convolutions; no remat to pick.
  if multi_level:
    raise ValueError(f'{name} has a single output; set'
                     ' config.model.multi_level=False')
  if dtype is not None or remat:
    raise ValueError(f'{name} computes in float32 without remat; set'
                     " config.model.compute_dtype='float32' and"
                     ' config.model.remat=False')
  return vgg.DeepLabV2VGG(num_classes=num_classes,
                          **{**_VGG_SEGMENTERS[name], **overrides})


def _create_mit_segmenter(name: str, num_classes: int, *,
                          multi_level: bool = False,
                          aspp_branches_used: int = 4, remat: bool = False,
                          dtype: Any = None, conv_impl: str = 'auto',
                          remat_impl: str = 'gated',
                          **overrides: Any) -> mit.MiTSegmenter:
  """`mit.MiTSegmenter`; DeepLab options it does not have are refused."""
  del conv_impl, remat_impl  # XLA's convolutions; no remat to pick.
  if multi_level:
    raise ValueError(f'{name} has a single output; set'
                     ' config.model.multi_level=False')
  if aspp_branches_used != 4:
    raise ValueError(f'{name} has no DeepLab ASPP early return; set'
                     ' config.model.aspp_branches_used=4')
  return mit.MiTSegmenter(num_classes=num_classes, variant=name, dtype=dtype,
                          remat=remat, **overrides)


def create_discriminator(ndf: int = 64) -> discriminator.FCDiscriminator:
  """Builds the FC discriminator.

  Args:
    ndf: channels of its first conv.

  Returns:
    An unbound `FCDiscriminator`; (B, H, W, C) -> (B, H/32, W/32, 1) logits.
  """
  return discriminator.FCDiscriminator(ndf=ndf)


def create_multitask(name: str, task_channels, **overrides: Any
                     ) -> multitask.MultiTaskNet:
  """Builds a `MultiTaskNet` whose encoder is the named segmenter's backbone.

  Args:
    name: one of `SEGMENTER_NAMES` (gives the ResNet stage sizes and width).
    task_channels: ``((task, channels), ...)``, one head per task.
    **overrides: `MultiTaskNet` attributes, e.g. `decoder_features=32`.

  Returns:
    An unbound `MultiTaskNet`; `apply(variables, x)` maps (B, H, W, 3) images
    to ``{task: (B, h, w, channels)}`` at output stride 4.
  """
  if name not in _SEGMENTERS:
    raise ValueError(f'Unknown segmenter {name!r}; known: {SEGMENTER_NAMES}')
  backbone = _SEGMENTERS[name]
  return multitask.MultiTaskNet(
      task_channels=tuple((str(t), int(c)) for t, c in task_channels),
      stage_sizes=backbone['stage_sizes'], base_width=backbone['base_width'],
      **overrides)


def create_classifier(name: str, num_classes: int,
                      bottleneck_dim: int = 256) -> classifier.ImageClassifier:
  """Builds an image classifier (G_f -> pool -> G_b -> G_y).

  Args:
    name: backbone, one of `CLASSIFIER_NAMES`.
    num_classes: number of classes C.
    bottleneck_dim: bottleneck width D.

  Returns:
    An unbound `ImageClassifier`; `apply(variables, x)` maps (B, H, W, 3)
    images to {'features': (B, h, w, C'), 'bottleneck': (B, D),
    'logits': (B, C)}.
  """
  if name not in CLASSIFIER_NAMES:
    raise ValueError(f'Unknown classifier {name!r}; known: {CLASSIFIER_NAMES}')
  return classifier.ImageClassifier(backbone=name, num_classes=num_classes,
                                    bottleneck_dim=bottleneck_dim)
