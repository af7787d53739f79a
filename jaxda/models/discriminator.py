"""Fully-convolutional domain discriminator (METHODS.md §3.4).

`wasidennis/AdaptSegNet:model/discriminator.py:FCDiscriminator`, identical to
ADVENT's `get_fc_discriminator`. No normalisation, no sigmoid: the output is
logits, to be used with a sigmoid BCE on the small output map.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxda.models.kernels import conv as conv_lib
from jaxda.models import deeplab

# PyTorch's default conv weight init, kaiming_uniform(a=sqrt(5)), is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the originals keep it for D.
TORCH_DEFAULT_KERNEL_INIT = nn.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform')


class FCDiscriminator(nn.Module):
  """Five 4×4 stride-2 convs, C -> ndf -> 2ndf -> 4ndf -> 8ndf -> 1.

  Attributes:
    ndf: channels of the first conv.
    negative_slope: LeakyReLU slope after the first four convs.
    dtype: compute dtype (None: float32); parameters stay float32 and the
      logits are returned in float32 (for the losses).
    conv_impl: `conv.Conv` implementation, one of `conv.IMPLS`.
  """
  ndf: int = 64
  negative_slope: float = 0.2
  dtype: Any = None
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Computes per-patch domain logits.

    Args:
      x: (B, H, W, C) input, usually softmax(upsampled logits) or an
        entropy/weighted self-information map.

    Returns:
      (B, h, w, 1) logits; each conv maps n -> floor(n / 2) for k4 s2 p1,
      e.g. 16 × 32 for 512 × 1024 and 22 × 40 for 720 × 1280.
    """
    channels = (self.ndf, self.ndf * 2, self.ndf * 4, self.ndf * 8, 1)
    # AdaptSegNet's attribute names, for importing its weights.
    names = ('conv1', 'conv2', 'conv3', 'conv4', 'classifier')
    for i, features in enumerate(channels):
      fan_in = x.shape[-1] * 16
      # PyTorch padding=1 is explicit ((1, 1), (1, 1)); 'SAME' would pad
      # (1, 2) for stride 2 and shift the windows.
      x = conv_lib.Conv(features, (4, 4), strides=(2, 2),
                        padding=((1, 1), (1, 1)), use_bias=True,
                        kernel_init=TORCH_DEFAULT_KERNEL_INIT,
                        bias_init=deeplab.torch_default_bias_init(fan_in),
                        dtype=self.dtype, impl=self.conv_impl,
                        name=names[i])(x)
      if i < len(channels) - 1:
        x = nn.leaky_relu(x, negative_slope=self.negative_slope)
    return x.astype(jnp.float32)
