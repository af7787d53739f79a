"""torchvision-layout ResNet (v1.5) for classification (METHODS.md §9, §12).

The Office recipes (thuml TADA/DANN, tllib) start from torchvision's
ImageNet ResNet-50, whose bottleneck puts the stride on the 3×3 conv (v1.5),
not on the first 1×1 conv as the DeepLab/Caffe blocks of `jaxda.models.resnet`
do; the parameter shapes are identical but the function differs, so the
imported weights need this geometry to reproduce torchvision's features.

Names follow the torchvision state dict (`conv1`, `bn1`, `layerX.Y.convZ`,
`layerX.Y.bnZ`, `layerX.Y.downsample.{0,1}` -> `downsample_conv` /
`downsample_bn`, `fc`), so `jaxda.weights.torchvision_import` maps names
one to one. Every BatchNorm module name contains "bn" (the optimiser freezes
BN affine parameters by that).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_MOMENTUM = 0.9  # PyTorch momentum 0.1 = Flax 0.9 (weight of the old mean)
BN_EPSILON = 1e-5
EXPANSION = 4

# torchvision's init: kaiming_normal_(mode='fan_out', nonlinearity='relu').
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _bn(train_bn: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train_bn, momentum=BN_MOMENTUM,
                      epsilon=BN_EPSILON, name=name)


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=CONV_INIT, name=name)


class TorchvisionBottleneck(nn.Module):
  """torchvision `Bottleneck`: 1×1 -> 3×3 (stride here) -> 1×1, expansion 4.

  Attributes:
    width: channels of the 1×1 and 3×3 convs; the block outputs 4 × width.
    stride: stride of the 3×3 conv and of the downsample branch.
    downsample: whether the shortcut has a 1×1 conv + BN projection.
  """
  width: int
  stride: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train_bn: bool = False) -> jax.Array:
    y = nn.relu(_bn(train_bn, 'bn1')(_conv(self.width, 1, 1, 'conv1')(x)))
    y = nn.relu(_bn(train_bn, 'bn2')(
        _conv(self.width, 3, self.stride, 'conv2')(y)))
    y = _bn(train_bn, 'bn3')(_conv(self.width * EXPANSION, 1, 1, 'conv3')(y))
    if self.downsample:
      x = _bn(train_bn, 'downsample_bn')(
          _conv(self.width * EXPANSION, 1, self.stride, 'downsample_conv')(x))
    return nn.relu(y + x)


class TorchvisionLayer(nn.Module):
  """A stage of bottlenecks named '0', '1', ... (torchvision `layerX.Y`).

  Attributes:
    num_blocks: blocks in the stage.
    width: bottleneck width.
    stride: stride of the first block.
  """
  num_blocks: int
  width: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train_bn: bool = False) -> jax.Array:
    for i in range(self.num_blocks):
      x = TorchvisionBottleneck(self.width, stride=self.stride if i == 0 else 1,
                                downsample=i == 0, name=str(i))(x, train_bn)
    return x


class TorchvisionResNet(nn.Module):
  """torchvision `ResNet` up to layer4 (and `fc` when `num_classes` > 0).

  Attributes:
    stage_sizes: blocks per stage; (3, 4, 6, 3) is ResNet-50.
    base_width: stem channels and layer1 width (torchvision: 64); the final
      map has 32 * base_width channels.
    num_classes: 0 (a feature extractor: returns the layer4 map) or the
      width of torchvision's `fc` (returns `(map, logits)`, as the ImageNet
      classifier; used to check imported weights end to end).
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  base_width: int = 64
  num_classes: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, *, train_bn: bool = False):
    """(B, H, W, 3) -> (B, ~H/32, ~W/32, 32 * base_width) [, (B, classes)]."""
    w = self.base_width
    x = nn.relu(_bn(train_bn, 'bn1')(_conv(w, 7, 2, 'conv1')(x)))
    # Floor-mode pool, padding 1 (torchvision): 112 -> 56 at 224.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for k, num_blocks in enumerate(self.stage_sizes):
      x = TorchvisionLayer(num_blocks, w * 2**k, stride=1 if k == 0 else 2,
                           name=f'layer{k + 1}')(x, train_bn)
    if not self.num_classes:
      return x
    logits = nn.Dense(self.num_classes, name='fc')(jnp.mean(x, axis=(1, 2)))
    return x, logits
