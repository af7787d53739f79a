"""HRDA (Hoyer et al., ECCV 2022): a segmenter run at two resolutions.

`HRDA` wraps a single-scale segmenter (DeepLab-v2 or MiT + DAFormer head)
whose parameters stay where they were (``nn.share_scope``: `backbone/...`,
`aspp_main/...` or `encoder/...`, `head/...`), plus its scale-attention head
`head_att` on the context features (METHODS.md §17.1, §17.3.8):

* ``__call__`` (evaluation, pseudo labels): the context view (the input
  downscaled 0.5x) over the whole image and the detail branch slid over the
  full-resolution input (windows of ``detail_size``, stride
  ``slide_stride``, logits averaged where windows overlap; all windows in one
  batch, as HRDA), fused with the attention everywhere. Returns
  ``{'main': fused logits}`` at output stride (plus MiT's ``'features'`` of
  the context), the keys every other caller reads, so evaluation and the
  loop need no HRDA branch.
* ``train_views(images, box)`` (training): the context of the whole crop and
  the detail crop ``box``, their logits, the attention and the fused
  prediction (attention zeroed outside the box).

Network logits are resized to the exact grid (input / output stride) before
the fusion: DeepLab-v2's ceil-mode pooling gives one row and column more
(65 x 129 for 512 x 1024). The geometry and the fusion are the pure
functions of `jaxda.hrda_fusion`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxda import ops
from jaxda import hrda_fusion
from jaxda.models import deeplab
from jaxda.models import mit
from jaxda.models import resnet


class DeepLabV2Attention(deeplab.DeepLabV2):
  """`DeepLabV2` (same parameter names) plus HRDA's DeepLab-v2 scale
  attention: a copy of the ASPP classifier (`head_att`) on layer4.

  Attributes:
    attention_classes: attention maps (0: num_classes, class-wise).
  """
  attention_classes: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, *, train_bn: bool = False,
               attention: bool = True) -> dict[str, jax.Array]:
    """``DeepLabV2.__call__``'s outputs, plus ``'attention'`` logits at the
    same grid when ``attention``."""
    features = resnet.ResNet(self.stage_sizes, self.base_width,
                             dtype=self.dtype, remat=self.remat,
                             remat_impl=self.remat_impl,
                             conv_impl=self.conv_impl,
                             name='backbone')(x, train_bn=train_bn)
    aspp = lambda name, n: deeplab.ASPP(
        n, self.aspp_dilations, self.aspp_branches_used, dtype=self.dtype,
        conv_impl=self.conv_impl, name=name)
    out = {'main': aspp('aspp_main', self.num_classes)(
        features['layer4']).astype(jnp.float32)}
    if self.multi_level:
      out['aux'] = aspp('aspp_aux', self.num_classes)(
          features['layer3']).astype(jnp.float32)
    if attention:
      out['attention'] = aspp(
          'head_att', self.attention_classes or self.num_classes)(
              features['layer4']).astype(jnp.float32)
    return out


def with_attention(net: nn.Module, *, classes: int = 0,
                   embed_dim: int = 0) -> nn.Module:
  """``net`` with a scale-attention head: `DeepLabV2Attention` for a
  `DeepLabV2`, ``scale_attention=True`` for a `mit.DAFormer`.

  Args:
    net: unbound single-scale segmenter.
    classes: attention maps (0: one per class).
    embed_dim: MiT attention-head channels (0: the decoder's).
  """
  if isinstance(net, mit.DAFormer):
    return net.clone(scale_attention=True, attention_dim=embed_dim,
                     attention_classes=classes)
  if type(net) is deeplab.DeepLabV2:  # pylint: disable=unidiomatic-typecheck
    fields = {f.name: getattr(net, f.name)
              for f in dataclasses.fields(deeplab.DeepLabV2)
              if f.init and f.name not in ('parent', 'name')}
    return DeepLabV2Attention(**fields, attention_classes=classes)
  raise ValueError(f'HRDA wraps a DeepLab-v2 ResNet or a MiT + DAFormer'
                   f' head, not {type(net).__name__}')


class HRDA(nn.Module):
  """Context + detail segmentation with learned scale attention.

  Attributes:
    net: the segmenter with its attention head (`with_attention`); its
      parameters live at this module's scope.
    output_stride: the net's logit stride (4 MiT, 8 DeepLab-v2).
    detail_size: (h, w) of the detail crop / sliding window, input pixels.
    slide_stride: (h, w) stride of the inference windows.
    context_scale: context downscale (0.5, HRDA's scales [1, 0.5]).
    align_corners: resize convention of a net's logits to the exact grid.
  """
  net: nn.Module
  output_stride: int
  detail_size: tuple[int, int]
  slide_stride: tuple[int, int]
  context_scale: float = 0.5
  align_corners: bool = False

  def setup(self):
    nn.share_scope(self, self.net)

  @property
  def num_classes(self) -> int:
    return self.net.num_classes

  def _run(self, x: jax.Array, *, attention: bool, train_bn: bool,
           deterministic: bool) -> dict[str, Any]:
    """The net on ``x``, logits resized to (H / os, W / os)."""
    kwargs = ({'deterministic': deterministic}
              if isinstance(self.net, mit.DAFormer) else {})
    out = self.net(x, train_bn=train_bn, attention=attention, **kwargs)
    grid = (x.shape[1] // self.output_stride, x.shape[2] // self.output_stride)
    resized = {k: ops.upsample_bilinear(out[k], grid,
                                        align_corners=self.align_corners)
               for k in ('main', 'attention') if k in out}
    if 'features' in out:
      resized['features'] = out['features']
    return resized

  def train_views(self, images: jax.Array, box: jax.Array, *,
                  train_bn: bool = False, deterministic: bool = True
                  ) -> dict[str, jax.Array]:
    """Training views of a (B, H, W, 3) crop with the detail crop ``box``.

    Args:
      images: normalised (B, H, W, 3) training crops.
      box: (y1, y2, x1, x2) int32 of the detail crop (traced), multiples of
        os / context_scale, of size ``detail_size``.
      train_bn: BatchNorm uses (and updates) batch statistics.
      deterministic: False enables MiT's DropPath / Dropout2d.

    Returns:
      ``{'main'`` fused (B, H/os, W/os, C), ``'context'`` (B, H/(2 os),
      W/(2 os), C), ``'attention'`` logits on the context grid, ``'detail'``
      (B, h/os, w/os, C), and MiT's context ``'features'``}.
    """
    context = hrda_fusion.downscale(images, self.context_scale)
    detail = hrda_fusion.crop(images, box, self.detail_size)
    ctx = self._run(context, attention=True, train_bn=train_bn,
                    deterministic=deterministic)
    det = self._run(detail, attention=False, train_bn=train_bn,
                    deterministic=deterministic)
    fused, _ = hrda_fusion.fuse(ctx['main'], ctx['attention'], det['main'],
                                box, self.output_stride, self.context_scale)
    out = {'main': fused, 'context': ctx['main'],
           'attention': ctx['attention'], 'detail': det['main']}
    if 'features' in ctx:
      out['features'] = ctx['features']
    return out

  def __call__(self, x: jax.Array, *, train_bn: bool = False,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """HRDA inference on (B, H, W, 3): ``{'main': (B, H/os, W/os, C)}``."""
    b, h, w, _ = x.shape
    ctx = self._run(hrda_fusion.downscale(x, self.context_scale),
                    attention=True, train_bn=train_bn,
                    deterministic=deterministic)
    boxes = hrda_fusion.slide_boxes(h, w, *self.detail_size,
                                    *self.slide_stride)
    windows = jnp.concatenate([x[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
    det = self._run(windows, attention=False, train_bn=train_bn,
                    deterministic=deterministic)['main']
    det = det.reshape((len(boxes), b) + det.shape[1:])
    os_ = self.output_stride
    detail = hrda_fusion.average_windows(det, boxes, (h // os_, w // os_), os_)
    fused, _ = hrda_fusion.fuse(ctx['main'], ctx['attention'], detail, None,
                                os_, self.context_scale)
    out = {'main': fused}
    if 'features' in ctx:
      out['features'] = ctx['features']
    return out
