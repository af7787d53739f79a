"""Multi-task dense network for anchor tasks (METHODS.md §11).

One shared encoder (the DeepLab-v2 ResNet backbone), one shared decoder and
one head per task. Parameter paths name the parts, so a config can choose
which layers are "late" (frozen by HeadFreeze) with a path regex:

  encoder/...        ResNet: conv1, bn1, layer1..layer4 (early by default)
  decoder/...        context convs on layer4, fused with a layer1 skip
  head_<task>/...    one 3x3 conv per task

The decoder has no BatchNorm: freezing it freezes it completely (no running
statistics that a forward pass could still move).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxda import ops
from jaxda.models import resnet

# Decoder and heads start from He-normal weights: unlike the backbone they
# are not followed by BatchNorm, and N(0, 0.01) would make them vanish.
_DECODER_INIT = nn.initializers.kaiming_normal()


class Decoder(nn.Module):
  """Shared late layers: context on layer4, upsampled, fused with layer1.

  Attributes:
    features: channels of every decoder conv.
    skip_features: channels of the 1x1 projection of the layer1 skip.
  """
  features: int = 64
  skip_features: int = 16

  @nn.compact
  def __call__(self, deep: jax.Array, skip: jax.Array) -> jax.Array:
    """Decodes features.

    Args:
      deep: (B, h, w, C4) layer4 features (output stride 8).
      skip: (B, h1, w1, C1) layer1 features (output stride 4).

    Returns:
      (B, h1, w1, features) decoded features at the skip's resolution.
    """
    conv = lambda f, k, name, d=1: nn.Conv(
        f, (k, k), kernel_dilation=(d, d), padding=((d * (k // 2),) * 2,) * 2,
        kernel_init=_DECODER_INIT, name=name)
    y = nn.relu(conv(self.features, 3, "context1")(deep))
    y = nn.relu(conv(self.features, 3, "context2", d=2)(y))
    y = ops.upsample_bilinear(y, skip.shape[1:3], align_corners=True)
    s = nn.relu(conv(self.skip_features, 1, "skip")(skip))
    y = jnp.concatenate([y, s], axis=-1)
    return nn.relu(conv(self.features, 3, "fuse")(y))


class MultiTaskNet(nn.Module):
  """Shared encoder + shared decoder + one head per task.

  Attributes:
    task_channels: ``((task, channels), ...)``, e.g.
      ``(('depth', 1), ('seg', 10))``; one head ``head_<task>`` each.
    stage_sizes: bottleneck blocks per ResNet stage.
    base_width: ResNet stem channels / layer1 width.
    decoder_features: channels of the decoder convs.
    skip_features: channels of the layer1 skip projection.
  """
  task_channels: Sequence[tuple[str, int]]
  stage_sizes: Sequence[int] = (1, 1, 1, 1)
  base_width: int = 8
  decoder_features: int = 64
  skip_features: int = 16

  @nn.compact
  def __call__(self, x: jax.Array, *,
               train_bn: bool = False) -> dict[str, jax.Array]:
    """Computes every task's dense output.

    Args:
      x: (B, H, W, 3) preprocessed images.
      train_bn: the encoder's BatchNorm uses batch statistics and updates the
        running ones (``batch_stats`` must then be mutable).

    Returns:
      ``{task: (B, h1, w1, channels)}`` at output stride 4 (h1 = the ceil
      max-pool size, e.g. 16 x 32 for a 64 x 128 input), not upsampled.
    """
    features = resnet.ResNet(self.stage_sizes, self.base_width,
                             name="encoder")(x, train_bn=train_bn)
    y = Decoder(self.decoder_features, self.skip_features,
                name="decoder")(features["layer4"], features["layer1"])
    return {task: nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)),
                          kernel_init=_DECODER_INIT, name=f"head_{task}")(y)
            for task, channels in self.task_channels}
