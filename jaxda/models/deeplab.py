"""DeepLab-v2 segmenter: ResNet backbone + ASPP heads (METHODS.md §3.1, §3.2).

`DeepLabV2` returns logits at output stride 8, not upsampled; the losses
upsample them to the input size (§3.5).
"""

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxda.models.kernels import conv as conv_lib
from jaxda.models import resnet


def torch_default_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  The originals overwrite only conv weights with N(0, 0.01); biases keep
  PyTorch's default. A bias shape does not carry fan_in, hence the closure.

  Args:
    fan_in: input channels × kernel height × kernel width.

  Returns:
    An initializer `(key, shape, dtype) -> array`.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class ASPP(nn.Module):
  """DeepLab-v2 ASPP classifier (`Classifier_Module`).

  Attributes:
    num_classes: output channels C.
    dilations: dilation (= padding) of each 3×3 branch.
    branches_used: how many leading branches are summed. 2 reproduces the
      AdaptSegNet early-return bug (METHODS.md §3.2); the other branches stay
      in the parameter tree (for checkpoint compatibility) but do not touch
      the output, so they get zero gradients.
    dtype: compute dtype (None: float32); parameters stay float32.
    conv_impl: `conv.Conv` implementation, one of `conv.IMPLS`.
  """
  num_classes: int
  dilations: Sequence[int] = (6, 12, 18, 24)
  branches_used: int = 4
  dtype: Any = None
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Computes logits.

    Args:
      x: (B, h, w, C_in) features.

    Returns:
      (B, h, w, num_classes) logits.
    """
    if not 1 <= self.branches_used <= len(self.dilations):
      raise ValueError(
          f'branches_used={self.branches_used} not in '
          f'[1, {len(self.dilations)}]')
    fan_in = x.shape[-1] * 9
    outputs = []
    for i, d in enumerate(self.dilations):
      # Every branch is created (and applied) so that the parameter tree is
      # independent of `branches_used`; unused outputs are dropped by XLA.
      outputs.append(
          conv_lib.Conv(self.num_classes, (3, 3), kernel_dilation=(d, d),
                        padding=((d, d), (d, d)), use_bias=True,
                        kernel_init=resnet.CONV_INIT,
                        bias_init=torch_default_bias_init(fan_in),
                        dtype=self.dtype, impl=self.conv_impl,
                        name=f'branch_{i}')(x))
    return sum(outputs[1:self.branches_used], outputs[0])


class DeepLabV2(nn.Module):
  """DeepLab-v2 with optional multi-level (layer3) auxiliary head.

  Submodules: `backbone` (ResNet), `aspp_main` (on layer4, PyTorch `layer6`)
  and, if `multi_level`, `aspp_aux` (on layer3, PyTorch `layer5`).

  Attributes:
    num_classes: number of classes C.
    stage_sizes: bottleneck blocks per ResNet stage.
    base_width: ResNet stem channels / layer1 width.
    multi_level: whether to build the auxiliary head on layer3.
    aspp_branches_used: 4 (default, fixed) or 2 (AdaptSegNet quirk).
    aspp_dilations: dilations of the ASPP branches.
    dtype: compute dtype (None: float32); parameters stay float32 and the
      logits are returned in float32, so losses never see bfloat16.
    remat: rematerialise every backbone bottleneck in the backward pass.
    remat_impl: 'gated' or 'jax' (see `resnet.ResNetLayer`).
    conv_impl: `conv.Conv` implementation, one of `conv.IMPLS`.
  """
  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 23, 3)
  base_width: int = 64
  multi_level: bool = True
  aspp_branches_used: int = 4
  aspp_dilations: Sequence[int] = (6, 12, 18, 24)
  dtype: Any = None
  remat: bool = False
  remat_impl: str = 'gated'
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *,
               train_bn: bool = False) -> dict[str, jax.Array]:
    """Computes segmentation logits at output stride 8.

    Args:
      x: (B, H, W, 3) preprocessed images.
      train_bn: BatchNorm uses batch statistics and updates the running ones
        (bn_mode='train'); `batch_stats` must then be mutable. With False
        (bn_mode='frozen') the running statistics are used and left alone.

    Returns:
      {'main': (B, h, w, C) logits from layer4, 'aux': (B, h, w, C) logits
      from layer3 (only if multi_level)}; e.g. h × w = 65 × 129 for a
      512 × 1024 input.
    """
    features = resnet.ResNet(self.stage_sizes, self.base_width,
                             dtype=self.dtype, remat=self.remat,
                             remat_impl=self.remat_impl,
                             conv_impl=self.conv_impl,
                             name='backbone')(x, train_bn=train_bn)
    aspp = lambda name: ASPP(self.num_classes, self.aspp_dilations,
                             self.aspp_branches_used, dtype=self.dtype,
                             conv_impl=self.conv_impl, name=name)
    # Logits leave the model in float32: upsampling, softmax and the losses
    # run in full precision whatever the compute dtype.
    out = {'main': aspp('aspp_main')(features['layer4']).astype(jnp.float32)}
    if self.multi_level:
      out['aux'] = aspp('aspp_aux')(features['layer3']).astype(jnp.float32)
    return out
