"""DeepLab-v2 ResNet in PyTorch, named as in AdaptSegNet and ADVENT.

`ResNetMulti` is `wasidennis/AdaptSegNet:model/deeplab_multi.py:ResNetMulti`
(METHODS.md §3.1): Caffe-style bottleneck with the stride on conv1, layer3 /
layer4 at stride 1 with dilation 2 / 4, a ceil-mode stem max pool, and two
ASPP heads, `layer5` on layer3 (aux) and `layer6` on layer4 (main). With
`multi_level=False` it is ADVENT's single-level network
(`valeoai/ADVENT:advent/model/deeplabv2.py`, no `layer5`, main head still
`layer6`). `ResNetSingle` is AdaptSegNet's single-level `model/deeplab.py`,
whose only head on layer4 is named `layer5`.

Differences from the originals, all optional: `block_counts` / `base_width`
give ResNet-50 or a small test network (the originals hard-code 101 layers and
width 64), and `aspp_branches_used` chooses between ADVENT's fixed ASPP (4,
default) and AdaptSegNet's early-return bug (2, METHODS.md §3.2).
"""

from collections.abc import Sequence

import torch
from torch import nn

DILATIONS = (6, 12, 18, 24)


class Bottleneck(nn.Module):
  """AdaptSegNet `Bottleneck`: stride on the 1×1 conv1, padding = dilation."""
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int = 1,
               dilation: int = 1, downsample: nn.Module | None = None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(planes, affine=True)
    self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1,
                           padding=dilation, bias=False, dilation=dilation)
    self.bn2 = nn.BatchNorm2d(planes, affine=True)
    self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4, affine=True)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample
    for bn in (self.bn1, self.bn2, self.bn3):
      for p in bn.parameters():
        p.requires_grad = False

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    residual = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      residual = self.downsample(x)
    return self.relu(out + residual)


class Classifier_Module(nn.Module):  # pylint: disable=invalid-name
  """ASPP head: parallel dilated 3×3 convs `conv2d_list.i`, outputs summed.

  Args:
    inplanes: input channels.
    dilation_series: dilations (= paddings) of the branches.
    num_classes: output channels.
    branches_used: how many leading branches are summed; AdaptSegNet's
      `return out` inside the loop makes it 2 (its branches 2, 3 stay dead
      parameters in the state dict).
  """

  def __init__(self, inplanes: int, dilation_series: Sequence[int],
               num_classes: int, branches_used: int | None = None):
    super().__init__()
    self.branches_used = (len(dilation_series) if branches_used is None
                          else branches_used)
    self.conv2d_list = nn.ModuleList(
        nn.Conv2d(inplanes, num_classes, kernel_size=3, stride=1, padding=d,
                  dilation=d, bias=True) for d in dilation_series)
    for m in self.conv2d_list:
      m.weight.data.normal_(0, 0.01)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.conv2d_list[0](x)
    for i in range(1, self.branches_used):
      out = out + self.conv2d_list[i](x)
    return out


class _ResNetBase(nn.Module):
  """Stem and layer1..layer4 shared by `ResNetMulti` and `ResNetSingle`."""

  def __init__(self, block_counts: Sequence[int], base_width: int):
    super().__init__()
    if len(block_counts) != 4:
      raise ValueError(f'block_counts needs 4 entries: {block_counts}')
    w = base_width
    self.inplanes = w
    self.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(w, affine=True)
    for p in self.bn1.parameters():
      p.requires_grad = False
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1,
                                ceil_mode=True)
    self.layer1 = self._make_layer(w, block_counts[0])
    self.layer2 = self._make_layer(2 * w, block_counts[1], stride=2)
    self.layer3 = self._make_layer(4 * w, block_counts[2], dilation=2)
    self.layer4 = self._make_layer(8 * w, block_counts[3], dilation=4)

  def _make_layer(self, planes: int, blocks: int, stride: int = 1,
                  dilation: int = 1) -> nn.Sequential:
    # The original condition (stride != 1, channel change, or dilation 2/4)
    # holds for the first block of every layer.
    downsample = nn.Sequential(
        nn.Conv2d(self.inplanes, planes * 4, kernel_size=1, stride=stride,
                  bias=False),
        nn.BatchNorm2d(planes * 4, affine=True))
    for p in downsample[1].parameters():
      p.requires_grad = False
    layers = [Bottleneck(self.inplanes, planes, stride, dilation=dilation,
                         downsample=downsample)]
    self.inplanes = planes * 4
    layers += [Bottleneck(self.inplanes, planes, dilation=dilation)
               for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def _init_weights(self) -> None:
    # The originals: every conv N(0, 0.01), BN weight 1 and bias 0.
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        m.weight.data.normal_(0, 0.01)
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.data.fill_(1)
        m.bias.data.zero_()

  def stem_to_layer3(self, x: torch.Tensor) -> torch.Tensor:
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer3(self.layer2(self.layer1(x)))


class ResNetMulti(_ResNetBase):
  """AdaptSegNet `ResNetMulti` / ADVENT `ResNetMulti` (DeepLab-v2).

  Args:
    block_counts: bottleneck blocks per layer; (3, 4, 23, 3) is ResNet-101,
      (3, 4, 6, 3) ResNet-50.
    num_classes: output classes C.
    base_width: stem channels / layer1 width (64 in the originals).
    multi_level: build `layer5` on layer3 (AdaptSegNet always; ADVENT's
      `MULTI_LEVEL`).
    aspp_branches_used: 4 (ADVENT, fixed) or 2 (AdaptSegNet's bug).

  `forward(x)` maps (B, 3, H, W) to `(aux, main)` logits (B, C, h, w) at
  output stride 8 (`aux` is None without `multi_level`), as the originals do.
  """

  def __init__(self, block_counts: Sequence[int] = (3, 4, 23, 3),
               num_classes: int = 19, base_width: int = 64,
               multi_level: bool = True, aspp_branches_used: int = 4):
    super().__init__(block_counts, base_width)
    self.multi_level = multi_level
    if multi_level:
      self.layer5 = Classifier_Module(16 * base_width, DILATIONS, num_classes,
                                      aspp_branches_used)
    self.layer6 = Classifier_Module(32 * base_width, DILATIONS, num_classes,
                                    aspp_branches_used)
    self._init_weights()

  def forward(self, x: torch.Tensor):
    x = self.stem_to_layer3(x)
    aux = self.layer5(x) if self.multi_level else None
    return aux, self.layer6(self.layer4(x))


class ResNetSingle(_ResNetBase):
  """AdaptSegNet single-level `model/deeplab.py:ResNet`: one head, `layer5`.

  Args:
    block_counts, num_classes, base_width, aspp_branches_used: as in
      `ResNetMulti`.

  `forward(x)` maps (B, 3, H, W) to (B, C, h, w) logits from layer4.
  """

  def __init__(self, block_counts: Sequence[int] = (3, 4, 23, 3),
               num_classes: int = 19, base_width: int = 64,
               aspp_branches_used: int = 4):
    super().__init__(block_counts, base_width)
    self.layer5 = Classifier_Module(32 * base_width, DILATIONS, num_classes,
                                    aspp_branches_used)
    self._init_weights()

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.layer5(self.layer4(self.stem_to_layer3(x)))


# pylint: disable-next=invalid-name
def DeeplabMulti(num_classes: int = 21) -> ResNetMulti:
  """AdaptSegNet's factory: ResNet-101, multi-level, its 2-branch ASPP."""
  return ResNetMulti((3, 4, 23, 3), num_classes, aspp_branches_used=2)


def get_deeplab_v2(num_classes: int = 19, multi_level: bool = True
                   ) -> ResNetMulti:
  """ADVENT's factory: ResNet-101 with the fixed 4-branch ASPP."""
  return ResNetMulti((3, 4, 23, 3), num_classes, multi_level=multi_level)
