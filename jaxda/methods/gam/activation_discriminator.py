"""Per-layer activation discriminator of DAM / GAM (METHODS.md §10).

The paper gives no discriminator architecture for segmentation
(UNVERIFIED); the released digits code uses an MLP 500-500-2 on fc
activations (``adda/adversary.py``). This module is the same idea at any
rank: hidden layers with LeakyReLU, then one logit per position.

* (B, h, w, C) feature maps: 3×3 stride-1 convolutions ('SAME' padding), so
  the output keeps the map's resolution, (B, h, w, 1). The maps tapped in a
  DeepLab-v2 are already at output stride 4–8 (e.g. 8 × 16 for a 64 × 128
  input), too small for the output-space FC discriminator's five stride-2
  convolutions.
* (B, C) vectors (classification, e.g. LeNet fc3/fc4): Dense layers, output
  (B, 1). One logit with sigmoid BCE equals the released code's two-way
  softmax.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

from jaxda.models import discriminator


class ActivationDiscriminator(nn.Module):
  """Hidden layers ``features`` + LeakyReLU, then a 1-channel logit layer.

  Attributes:
    features: widths of the hidden layers.
    negative_slope: LeakyReLU slope.
  """
  features: Sequence[int] = (64, 64)
  negative_slope: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Scores each position's activation vector as source (0) or target (1).

    Args:
      x: (B, h, w, C) feature map or (B, C) vectors.

    Returns:
      Logits (B, h, w, 1) or (B, 1).
    """
    if x.ndim not in (2, 4):
      raise ValueError(
          f"ActivationDiscriminator takes (B, C) or (B, H, W, C), got"
          f" shape {x.shape}")
    for i, width in enumerate(tuple(self.features) + (1,)):
      if x.ndim == 4:
        x = nn.Conv(width, (3, 3), padding="SAME",
                    kernel_init=discriminator.TORCH_DEFAULT_KERNEL_INIT,
                    name=f"conv{i}")(x)
      else:
        x = nn.Dense(width,
                     kernel_init=discriminator.TORCH_DEFAULT_KERNEL_INIT,
                     name=f"dense{i}")(x)
      if i < len(self.features):
        x = nn.leaky_relu(x, negative_slope=self.negative_slope)
    return x
