"""AdaptSegNet `FCDiscriminator` in PyTorch (METHODS.md §3.4).

`wasidennis/AdaptSegNet:model/discriminator.py`; ADVENT's
`get_fc_discriminator` builds the same layers (as an `nn.Sequential`, so its
state-dict names are `0`, `2`, ... instead of `conv1`, ...). The originals
define an unused `up_sample` and `sigmoid`; the forward pass returns logits.
"""

import torch
from torch import nn


class FCDiscriminator(nn.Module):
  """Five 4×4 stride-2 convs, C -> ndf -> 2ndf -> 4ndf -> 8ndf -> 1.

  Args:
    num_classes: input channels C.
    ndf: channels of the first conv.

  `forward(x)` maps (B, C, H, W) to (B, 1, H/32, W/32) logits.
  """

  def __init__(self, num_classes: int, ndf: int = 64):
    super().__init__()
    self.conv1 = nn.Conv2d(num_classes, ndf, kernel_size=4, stride=2,
                           padding=1)
    self.conv2 = nn.Conv2d(ndf, ndf * 2, kernel_size=4, stride=2, padding=1)
    self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, kernel_size=4, stride=2,
                           padding=1)
    self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, kernel_size=4, stride=2,
                           padding=1)
    self.classifier = nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=2,
                                padding=1)
    self.leaky_relu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
      x = self.leaky_relu(conv(x))
    return self.classifier(x)
