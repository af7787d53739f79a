"""DeepLab-v2 ResNet backbone (METHODS.md §3.1, §3.6).

Reproduces the geometry of `wasidennis/AdaptSegNet:model/deeplab_multi.py`,
which differs from a torchvision ResNet in ways that change the logit size:

* the stem max-pool uses `ceil_mode=True` (Flax has no ceil mode, see
  `max_pool_ceil`);
* a strided bottleneck puts its stride on the first 1×1 conv, not on the 3×3;
* layer3 and layer4 keep stride 1 and dilate their 3×3 convs by 2 and 4
  (padding = dilation), for an output stride of 8;
* the first block of every layer has a downsample branch, dilated layers
  included.

Parameter names follow the PyTorch state dict so a weight importer only has to
map `layerX.Y.convZ` -> `layerX/Y/convZ` (and `downsample.0/1` ->
`downsample_conv` / `downsample_bn`). Every BatchNorm module name contains
"bn", which the optimiser relies on to freeze BN scale/bias.
"""

from collections.abc import Sequence
import math

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxda.models.kernels import conv as conv_lib
from jaxda.models.kernels import fusion
from jaxda.models.kernels import remat as remat_lib

# The originals initialise every conv weight from N(0, 0.01).
CONV_INIT = nn.initializers.normal(stddev=0.01)

# PyTorch BN momentum 0.1 (weight of the new batch) is Flax momentum 0.9
# (weight of the old running average).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

EXPANSION = 4

REMAT_IMPLS = ('gated', 'jax')


def ceil_mode_pool_padding(size: int, window: int, stride: int,
                           padding: int) -> tuple[int, int]:
  """Padding that makes a VALID pool reproduce PyTorch's `ceil_mode=True`.

  PyTorch computes `out = ceil((size + 2 * padding - window) / stride) + 1`
  and drops the last window if it would start inside the right padding only.
  Extra windows added by the ceil rule read past the symmetric padding; those
  positions are padded here too (the caller pads with -inf).

  Args:
    size: input length along one spatial axis.
    window: pooling window length.
    stride: pooling stride.
    padding: PyTorch's symmetric padding.

  Returns:
    (low, high) padding for this axis.
  """
  out = math.ceil((size + 2 * padding - window) / stride) + 1
  if (out - 1) * stride >= size + padding:
    out -= 1
  high = (out - 1) * stride + window - size - padding
  return padding, high


def max_pool_ceil(x: jax.Array, window: int = 3, stride: int = 2,
                  padding: int = 1) -> jax.Array:
  """Max pool equal to PyTorch `MaxPool2d(..., ceil_mode=True)`.

  Args:
    x: (B, H, W, C) input.
    window: square window size.
    stride: stride along both spatial axes.
    padding: PyTorch's symmetric padding along both spatial axes.

  Returns:
    (B, h, w, C) pooled array, with h, w from PyTorch's ceil-mode formula.
  """
  pads = tuple(
      ceil_mode_pool_padding(n, window, stride, padding) for n in x.shape[1:3])
  # `nn.max_pool` pads through `lax.reduce_window` with its init value -inf,
  # so padded positions never win the max.
  return nn.max_pool(x, (window, window), strides=(stride, stride),
                     padding=pads)


def _batch_norm(train_bn: bool, name: str,
                dtype: Any = None) -> nn.BatchNorm:
  # train_bn=False normalises with the running statistics and never writes
  # them, so `batch_stats` need not be mutable (bn_mode='frozen'). Flax
  # computes the batch statistics in float32 whatever `dtype` is.
  return nn.BatchNorm(use_running_average=not train_bn, momentum=BN_MOMENTUM,
                      epsilon=BN_EPSILON, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


class Bottleneck(nn.Module):
  """DeepLab-v2 bottleneck block (expansion 4).

  Attributes:
    width: channels of the 1×1 and 3×3 convs; the block outputs 4 × width.
    stride: stride of the first 1×1 conv (and of the downsample branch).
    dilation: dilation (= padding) of the 3×3 conv.
    downsample: whether the shortcut has a 1×1 conv + BN projection.
    dtype: compute dtype (None: float32); parameters stay float32.
    conv_impl: `conv.Conv` implementation, one of `conv.IMPLS`.
  """
  width: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = None
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train_bn: bool = False) -> jax.Array:
    """Applies the block.

    Args:
      x: (B, H, W, C_in) features.
      train_bn: use batch statistics and update the running ones.

    Returns:
      (B, H', W', 4 * width) features; H' = ceil(H / stride).
    """
    conv = lambda features, kernel, **kw: conv_lib.Conv(
        features, kernel, use_bias=False, kernel_init=CONV_INIT,
        dtype=self.dtype, impl=self.conv_impl, **kw)
    bn = lambda name: _batch_norm(train_bn, name, self.dtype)
    d = self.dilation
    s = self.stride
    block_input = x
    y = conv(self.width, (1, 1), strides=(s, s), padding='VALID',
             name='conv1')(x)
    y = nn.relu(bn('bn1')(y))
    y = conv(self.width, (3, 3), kernel_dilation=(d, d),
             padding=((d, d), (d, d)), name='conv2')(y)
    y = nn.relu(bn('bn2')(y))
    y = conv(self.width * EXPANSION, (1, 1), padding='VALID', name='conv3')(y)
    y = bn('bn3')(y)
    if self.downsample:
      x = conv(self.width * EXPANSION, (1, 1), strides=(s, s),
               padding='VALID', name='downsample_conv')(x)
      x = bn('downsample_bn')(x)
    out = nn.relu(y + x)
    if jnp.dtype(self.dtype or jnp.float32) == jnp.float32:
      # Cut the elementwise shortcut chain that XLA:CPU would otherwise
      # recompute inside every later block (`fusion.py`). bf16 outputs are
      # materialised by their cast already (measured: no gain there).
      out = fusion.fusion_boundary(out, block_input.ravel()[0])
    return out


class ResNetLayer(nn.Module):
  """A stage of bottleneck blocks, named '0', '1', ... like PyTorch.

  Attributes:
    num_blocks: number of bottleneck blocks.
    width: bottleneck width (output channels are 4 × width).
    stride: stride of the first block.
    dilation: dilation of every block's 3×3 conv.
    dtype: compute dtype (None: float32); parameters stay float32.
    remat: recompute each block's activations in the backward pass
      instead of keeping them: only block inputs stay alive.
    remat_impl: 'gated' (`remat.gated_remat`: recomputation waits for the
      block's output cotangent, so one block is alive at a time) or 'jax'
      (`nn.remat`, which XLA may schedule all at once).
    conv_impl: `conv.Conv` implementation, one of `conv.IMPLS`.
  """
  num_blocks: int
  width: int
  stride: int = 1
  dilation: int = 1
  dtype: Any = None
  remat: bool = False
  remat_impl: str = 'gated'
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, train_bn: bool = False) -> jax.Array:
    """Applies the stage.

    Args:
      x: (B, H, W, C_in) features.
      train_bn: use batch statistics and update the running ones.

    Returns:
      (B, H', W', 4 * width) features; H' = ceil(H / stride).
    """
    if self.remat_impl not in REMAT_IMPLS:
      raise ValueError(f'remat_impl {self.remat_impl!r} not in {REMAT_IMPLS}')
    gated = self.remat and self.remat_impl == 'gated'
    # `train_bn` is a Python bool deciding the graph: static under remat
    # (argument 2, counting the module itself as 0).
    block_cls = (nn.remat(Bottleneck, static_argnums=(2,))
                 if self.remat and not gated else Bottleneck)
    for i in range(self.num_blocks):
      # AdaptSegNet's `_make_layer` gives every first block a projection,
      # also when only the dilation changes (layer3, layer4).
      block = block_cls(self.width, stride=self.stride if i == 0 else 1,
                        dilation=self.dilation, downsample=i == 0,
                        dtype=self.dtype, conv_impl=self.conv_impl,
                        name=str(i))
      x = (remat_lib.gated_remat(block, x, train_bn) if gated
           else block(x, train_bn))
    return x


class ResNet(nn.Module):
  """DeepLab-v2 ResNet feature extractor with output stride 8.

  Attributes:
    stage_sizes: blocks per stage, (3, 4, 23, 3) for ResNet-101 and
      (3, 4, 6, 3) for ResNet-50.
    base_width: stem channels and layer1 bottleneck width (64 in the
      originals); layer k has width base_width * 2**(k-1).
    dilations: dilation of layer3 and layer4.
    dtype: compute dtype (None: float32); parameters stay float32.
    remat: rematerialise every bottleneck block in the backward pass.
    remat_impl: 'gated' or 'jax' (see `ResNetLayer`).
    conv_impl: `conv.Conv` implementation, one of `conv.IMPLS`.
  """
  stage_sizes: Sequence[int] = (3, 4, 23, 3)
  base_width: int = 64
  dilations: tuple[int, int] = (2, 4)
  dtype: Any = None
  remat: bool = False
  remat_impl: str = 'gated'
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *,
               train_bn: bool = False) -> dict[str, jax.Array]:
    """Extracts stage features.

    Args:
      x: (B, H, W, 3) images.
      train_bn: use batch statistics and update the running ones (the caller
        must then make `batch_stats` mutable).

    Returns:
      Dict with 'layer1' (B, h1, w1, 4w), 'layer2' (B, h, w, 8w),
      'layer3' (B, h, w, 16w) and 'layer4' (B, h, w, 32w) with w = base_width,
      h1 = ceil-pool size (≈ H/4) and h = ceil(h1 / 2) (≈ H/8).
    """
    if len(self.stage_sizes) != 4:
      raise ValueError(f'stage_sizes must have 4 entries: {self.stage_sizes}')
    w = self.base_width
    x = conv_lib.Conv(w, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                      use_bias=False, kernel_init=CONV_INIT, dtype=self.dtype,
                      impl=self.conv_impl, name='conv1')(x)
    x = nn.relu(_batch_norm(train_bn, 'bn1', self.dtype)(x))
    x = max_pool_ceil(x, window=3, stride=2, padding=1)
    strides = (1, 2, 1, 1)
    dilations = (1, 1) + tuple(self.dilations)
    features = {}
    for k, num_blocks in enumerate(self.stage_sizes):
      name = f'layer{k + 1}'
      x = ResNetLayer(num_blocks, w * 2**k, stride=strides[k],
                      dilation=dilations[k], dtype=self.dtype,
                      remat=self.remat, remat_impl=self.remat_impl,
                      conv_impl=self.conv_impl, name=name)(x, train_bn=train_bn)
      features[name] = x
    return features
