"""VGG-16 in PyTorch with torchvision's state-dict names, and DeepLab-v2 VGG.

torchvision cannot be installed here, so `VGG16` is written by hand to have
exactly the parameter names and shapes of `torchvision.models.vgg16()`
(`features.{0,2,5,...,28}`, `classifier.{0,3,6}`), and the same forward pass
(ReLU after every conv, 2×2 max pools, 7×7 adaptive average pool, flatten in
(C, H, W) order, dropout in the classifier). `DeeplabVGG` is
`wasidennis/AdaptSegNet:model/deeplab_vgg.py` (METHODS.md §3.3): the
torchvision features without pool4 / pool5, conv5 dilated by 2, then dilated
`fc6` / `fc7` convs (`features.29`, `features.31`) and an ASPP `classifier`.
"""

from collections.abc import Sequence

import torch
from torch import nn

from benchmarks.torch_reference import deeplab_v2

# torchvision `cfgs['D']`: conv widths in units of base_width / 64, 'M' = pool.
CFG_D = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M',
         512, 512, 512, 'M')


def make_features(base_width: int = 64) -> nn.Sequential:
  """torchvision `make_layers(cfgs['D'])`: 3×3 convs (padding 1) and ReLUs."""
  layers = []
  in_channels = 3
  for v in CFG_D:
    if v == 'M':
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      out = v * base_width // 64
      layers += [nn.Conv2d(in_channels, out, kernel_size=3, padding=1),
                 nn.ReLU(inplace=True)]
      in_channels = out
  return nn.Sequential(*layers)


class VGG16(nn.Module):
  """torchvision `vgg16()` (no batch norm).

  Args:
    num_classes: classifier outputs (1000 for ImageNet).
    base_width: channels of the first conv (64 in torchvision; smaller gives
      a cheap test network with the same names).
    hidden_dim: width of the two hidden fully connected layers (4096).
    dropout: dropout rate in the classifier.

  `forward(x)` maps (B, 3, H, W) to (B, num_classes) logits.
  """

  def __init__(self, num_classes: int = 1000, base_width: int = 64,
               hidden_dim: int = 4096, dropout: float = 0.5):
    super().__init__()
    self.features = make_features(base_width)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
        nn.Linear(8 * base_width * 7 * 7, hidden_dim), nn.ReLU(True),
        nn.Dropout(p=dropout), nn.Linear(hidden_dim, hidden_dim),
        nn.ReLU(True), nn.Dropout(p=dropout),
        nn.Linear(hidden_dim, num_classes))
    # torchvision's init.
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        nn.init.constant_(m.bias, 0)
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.constant_(m.bias, 0)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.avgpool(self.features(x))
    return self.classifier(torch.flatten(x, 1))


class DeeplabVGG(nn.Module):
  """AdaptSegNet / ADVENT DeepLab-v2 VGG-16 (single output).

  Args:
    num_classes: output classes C.
    base_width: channels of the first conv (64 in the originals).
    aspp_branches_used: 4 (summed, default) or 2 (AdaptSegNet's bug).
    dilations: ASPP dilations.

  `forward(x)` maps (B, 3, H, W) to (B, C, h, w) logits at output stride 8
  (three floor-mode 2×2 pools).
  """

  def __init__(self, num_classes: int = 19, base_width: int = 64,
               aspp_branches_used: int = 4,
               dilations: Sequence[int] = deeplab_v2.DILATIONS):
    super().__init__()
    features = list(make_features(base_width).children())
    # Remove pool4 (index 23) and pool5 (index 30).
    features = [features[i] for i in list(range(23)) + list(range(24, 30))]
    for i in (23, 25, 27):
      features[i].dilation = (2, 2)
      features[i].padding = (2, 2)
    c5 = 8 * base_width
    c6 = 16 * base_width
    fc6 = nn.Conv2d(c5, c6, kernel_size=3, padding=4, dilation=4)
    fc7 = nn.Conv2d(c6, c6, kernel_size=3, padding=4, dilation=4)
    self.features = nn.Sequential(
        *features, fc6, nn.ReLU(inplace=True), fc7, nn.ReLU(inplace=True))
    self.classifier = deeplab_v2.Classifier_Module(
        c6, dilations, num_classes, aspp_branches_used)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.classifier(self.features(x))
