"""VGG-16 backbones: torchvision's classifier and DeepLab-v2 VGG-16.

`VGG16` has the geometry of `torchvision.models.vgg16()` (13 3×3 convs with
ReLU, five floor-mode 2×2 max pools, a 7×7 adaptive average pool, three fully
connected layers with dropout). `DeepLabV2VGG` is
`wasidennis/AdaptSegNet:model/deeplab_vgg.py` (METHODS.md §3.3): the same
convs without pool4 and pool5, conv5 dilated by 2, then two 3×3 convs `fc6`,
`fc7` dilated by 4 and one ASPP head, output stride 8.

Both keep the convs under a submodule `backbone` with Caffe names
(`conv1_1` ... `conv5_3`), so ImageNet weights imported for `VGG16` (with the
classifier dropped) initialise `DeepLabV2VGG`'s backbone unchanged, as the
originals do (`jaxda.weights.torch_import`). No BatchNorm.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxda.models import deeplab as deeplab_lib
from jaxda.models import discriminator

# Conv widths per block in units of base_width (64 in torchvision).
BLOCKS = ((1, 1), (2, 2), (4, 4, 4), (8, 8, 8), (8, 8, 8))
CONV_NAMES = tuple(f'conv{b + 1}_{i + 1}' for b, block in enumerate(BLOCKS)
                   for i in range(len(block)))

# torchvision's VGG init: kaiming_normal_(mode='fan_out', relu), bias 0;
# Linear N(0, 0.01), bias 0.
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
DENSE_INIT = nn.initializers.normal(stddev=0.01)


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """PyTorch `AdaptiveAvgPool2d`: window i covers [⌊iH/h⌋, ⌈(i+1)H/h⌉).

  Args:
    x: (B, H, W, C) features.
    size: output (h, w).

  Returns:
    (B, h, w, C) averages; windows overlap when h does not divide H and
    repeat input positions when h > H.
  """
  def pool_axis(x, axis, out):
    n = x.shape[axis]
    if n == out:
      return x
    slices = []
    for i in range(out):
      start = (i * n) // out
      end = math.ceil((i + 1) * n / out)
      window = jax.lax.slice_in_dim(x, start, end, axis=axis)
      slices.append(jnp.mean(window, axis=axis, keepdims=True))
    return jnp.concatenate(slices, axis=axis)

  return pool_axis(pool_axis(x, 1, size[0]), 2, size[1])


class VGG16Features(nn.Module):
  """The 13 convs of VGG-16, each followed by ReLU.

  Attributes:
    base_width: channels of conv1_1 (64 in torchvision).
    deeplab: DeepLab-v2 geometry: no pool4 / pool5, conv5 dilated by 2
      (output stride 8), then convs fc6, fc7; otherwise torchvision's (five
      pools, stride 32).
  """
  base_width: int = 64
  deeplab: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps (B, H, W, 3) images to (B, h, w, C) features.

    torchvision: h = ⌊H/32⌋ (floor-mode pools), C = 8 * base_width.
    deeplab: h = ⌊H/8⌋, C = 16 * base_width (after fc6, fc7).
    """
    for b, block in enumerate(BLOCKS):
      d = 2 if self.deeplab and b == 4 else 1
      for i, mult in enumerate(block):
        x = nn.Conv(mult * self.base_width, (3, 3), kernel_dilation=(d, d),
                    padding=((d, d), (d, d)), kernel_init=KAIMING_FAN_OUT,
                    name=f'conv{b + 1}_{i + 1}')(x)
        x = nn.relu(x)
      if not (self.deeplab and b >= 3):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    if self.deeplab:
      # fc6 / fc7 as dilated 3×3 convs (the original appends them to
      # `features`). Not re-initialised there: PyTorch's default conv init.
      for name in ('fc6', 'fc7'):
        fan_in = x.shape[-1] * 9
        x = nn.Conv(16 * self.base_width, (3, 3), kernel_dilation=(4, 4),
                    padding=((4, 4), (4, 4)),
                    kernel_init=discriminator.TORCH_DEFAULT_KERNEL_INIT,
                    bias_init=deeplab_lib.torch_default_bias_init(fan_in),
                    name=name)(x)
        x = nn.relu(x)
    return x


class VGG16(nn.Module):
  """torchvision VGG-16 classifier.

  Submodules: `backbone` (`VGG16Features`), `fc6`, `fc7`, `fc8` (torchvision
  `classifier.0`, `.3`, `.6`).

  Attributes:
    num_classes: outputs of fc8 (1000 for ImageNet).
    base_width: channels of conv1_1 (64).
    hidden_dim: width of fc6 and fc7 (4096).
    dropout_rate: dropout after fc6 and fc7 when `train`.
  """
  num_classes: int = 1000
  base_width: int = 64
  hidden_dim: int = 4096
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: (B, H, W, 3) images (224 × 224 in torchvision).
      train: apply dropout (needs a 'dropout' RNG).

    Returns:
      (B, num_classes) logits.
    """
    x = VGG16Features(self.base_width, name='backbone')(x)
    # Channels-last flatten order is (h, w, c); torchvision flattens (c, h,
    # w). The importer permutes fc6's rows accordingly.
    x = adaptive_avg_pool(x, (7, 7)).reshape(x.shape[0], -1)
    for name in ('fc6', 'fc7'):
      x = nn.relu(nn.Dense(self.hidden_dim, kernel_init=DENSE_INIT,
                           name=name)(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=DENSE_INIT, name='fc8')(x)


class DeepLabV2VGG(nn.Module):
  """DeepLab-v2 VGG-16: dilated VGG features, fc6/fc7 convs, one ASPP head.

  Submodules: `backbone` (`VGG16Features`, deeplab geometry, with fc6/fc7)
  and `aspp_main`.

  Same call signature and output dict as `DeepLabV2` (single level), so
  method steps can use either. In `create_segmenter`'s registry as
  'deeplabv2_vgg16'; the originals train it with no 10× head LR
  (`config.optim.head_lr_mult=1`).

  Attributes:
    num_classes: number of classes C.
    base_width: channels of conv1_1 (64).
    multi_level: must be False (the original has one output).
    aspp_branches_used: 4 (summed) or 2 (AdaptSegNet's early return).
    aspp_dilations: dilations of the ASPP branches.
  """
  num_classes: int
  base_width: int = 64
  multi_level: bool = False
  aspp_branches_used: int = 4
  aspp_dilations: tuple[int, ...] = (6, 12, 18, 24)

  @nn.compact
  def __call__(self, x: jax.Array, *,
               train_bn: bool = False) -> dict[str, jax.Array]:
    """Computes segmentation logits at output stride 8.

    Args:
      x: (B, H, W, 3) preprocessed images.
      train_bn: ignored (no BatchNorm); kept for the `DeepLabV2` signature.

    Returns:
      {'main': (B, ⌊H/8⌋, ⌊W/8⌋, C) logits}.
    """
    del train_bn
    if self.multi_level:
      raise ValueError('DeepLab-v2 VGG-16 has a single output; set '
                       'config.model.multi_level=False')
    x = VGG16Features(self.base_width, deeplab=True, name='backbone')(x)
    logits = deeplab_lib.ASPP(self.num_classes, self.aspp_dilations,
                          self.aspp_branches_used, name='aspp_main')(x)
    return {'main': logits}
