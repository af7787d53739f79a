"""HRDA scale-attention fusion of context and detail logits (METHODS.md
§17.3.8).

A learned per-class attention decides, pixel by pixel, how much the fused
prediction trusts the high-resolution detail crop (small objects) over the
low-resolution context view (large structures). The attention is zeroed
outside the detail crop, where there is no detail prediction.

Also the view geometry: the 0.5x context view, the random detail box of
training (``detail_box``, ``crop``) and the sliding detail windows of
inference (``slide_boxes``, ``average_windows``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxda import ops


def upsample2x(x: jax.Array) -> jax.Array:
  """(B, h, w, C) -> (B, 2h, 2w, C) bilinear, align_corners=False.

  `jax.image.resize` uses half-pixel centres, which is PyTorch's
  ``align_corners=False``; upsampling needs no antialiasing.
  """
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), 'linear', antialias=False)


def box_mask(hw: tuple[int, int], box: jax.Array) -> jax.Array:
  """(h, w) float32: 1 inside rows [y1, y2) and columns [x1, x2) of ``box``."""
  y1, y2, x1, x2 = box[0], box[1], box[2], box[3]
  rows = jnp.arange(hw[0])[:, None]
  cols = jnp.arange(hw[1])[None, :]
  inside = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
  return inside.astype(jnp.float32)


def fuse(context_logits: jax.Array, attention_logits: jax.Array,
         detail_logits: jax.Array, box: Sequence[int] | jax.Array | None,
         output_stride: int = 4, context_scale: float = 0.5
         ) -> tuple[jax.Array, jax.Array]:
  """HRDA's ``HRDAHead.forward`` fusion.

  a = sigmoid(attention), zeroed outside box / (os / scale) on the context
  grid; context <- (1 - a) * context; both upsampled by 1 / scale (only 2x is
  supported, HRDA's [1, 0.5]); detail inserted into zeros at box / os;
  fused = up(a) * detail_inserted + up((1 - a) * context).

  Args:
    context_logits: (B, hc, wc, C) context-branch logits (stride os/scale
      w.r.t. the full-resolution input).
    attention_logits: (B, hc, wc, C) or (B, hc, wc, 1) scale-attention logits
      from the context features.
    detail_logits: (B, hd, wd, C) detail logits (stride os in the crop).
    box: (y1, y2, x1, x2) of the detail crop in full-resolution input pixels,
      multiples of os / scale (traced values are fine); None when the detail
      branch covers the whole input (then shapes must match 2x context).
    output_stride: decoder output stride (4).
    context_scale: context downscale factor (0.5).

  Returns:
    (fused (B, 2hc, 2wc, C), upsampled attention (B, 2hc, 2wc, C or 1)).
  """
  if context_scale != 0.5:
    raise NotImplementedError('only HRDA scales [1, 0.5] are supported')
  att = jax.nn.sigmoid(attention_logits.astype(jnp.float32))
  ctx = context_logits.astype(jnp.float32)
  det = detail_logits.astype(jnp.float32)
  b, hc, wc, c = ctx.shape
  if box is not None:
    box = jnp.asarray(box, jnp.int32)
    ctx_os = int(round(output_stride / context_scale))
    att = att * box_mask((hc, wc), box // ctx_os)[None, :, :, None]
    inserted = jnp.zeros((b, 2 * hc, 2 * wc, c), jnp.float32)
    start = box // output_stride
    det = jax.lax.dynamic_update_slice(inserted, det,
                                       (0, start[0], start[2], 0))
  ctx = (1.0 - att) * ctx
  up_att = upsample2x(att)
  return up_att * det + upsample2x(ctx), up_att


# ---------------------------------------------------------------- geometry
# Training views (a 0.5x context of the whole crop, a full-resolution detail
# crop) and the sliding detail windows of inference (METHODS.md §17.3.8).


def resolve_size(spec: Sequence[float], whole: tuple[int, int]
                 ) -> tuple[int, int]:
  """(h, w) pixels of ``spec``: entries <= 1 are fractions of ``whole``,
  larger ones pixel counts (``config.daformer.hrda_detail_crop`` (0.5, 0.5)
  of a 1024x1024 crop or (512, 512): both 512x512)."""
  return tuple(int(round(float(s) * n)) if float(s) <= 1.0 else int(s)
               for s, n in zip(spec, whole))


def downscale(images: jax.Array, scale: float = 0.5) -> jax.Array:
  """(B, H, W, C) -> (B, round(sH), round(sW), C) bilinear, align_corners
  False, no antialiasing (PyTorch ``resize(scale_factor=s)``; at 0.5 the
  mean of each 2x2 block)."""
  _, h, w, _ = images.shape
  size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
  return ops.upsample_bilinear(images, size, align_corners=False)


def offset_choices(margin: int, divisible: int, max_offset: str = 'full'
                   ) -> int:
  """How many offsets k * ``divisible`` a crop with ``margin`` pixels of
  play can take: 'full' reaches the far border (margin // k + 1), 'code'
  the original's ``randint(0, (margin + 1) // k)`` (never the far border)."""
  if margin <= 0:
    return 1
  if max_offset == 'full':
    return margin // divisible + 1
  if max_offset == 'code':
    return max((margin + 1) // divisible, 1)
  raise ValueError(f"max_offset must be 'full' or 'code', got {max_offset!r}")


def detail_box(key: jax.Array, hw: tuple[int, int], detail_hw: tuple[int, int],
               divisible: int, max_offset: str = 'full') -> jax.Array:
  """A random (y1, y2, x1, x2) int32 detail box inside an ``hw`` crop.

  Offsets are multiples of ``divisible`` (output stride / context scale, so
  the box lands on the context grid), drawn uniformly per axis; one box per
  call (HRDA draws one per forward pass, shared by the batch).
  """
  offsets = []
  for k, side, d in zip(jax.random.split(key), hw, detail_hw):
    n = offset_choices(int(side) - int(d), divisible, max_offset)
    offsets.append(jax.random.randint(k, (), 0, n) * divisible)
  y1, x1 = offsets
  return jnp.stack([y1, y1 + detail_hw[0], x1, x1 + detail_hw[1]]).astype(
      jnp.int32)


def crop(x: jax.Array, box: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Rows [y1, y1 + h) and columns [x1, x1 + w) of (B, H, W, ...) ``x``
  (``box`` may be traced; ``size`` = (h, w) is static)."""
  start = (0, box[0], box[2]) + (0,) * (x.ndim - 3)
  return jax.lax.dynamic_slice(
      x, start, (x.shape[0], int(size[0]), int(size[1])) + x.shape[3:])


def slide_boxes(h: int, w: int, crop_h: int, crop_w: int, stride_h: int,
                stride_w: int) -> list[tuple[int, int, int, int]]:
  """mmseg / HRDA sliding windows (y1, y2, x1, x2) over an h x w image; the
  last window of a row or column is shifted back to end at the border."""
  crop_h, crop_w = min(crop_h, h), min(crop_w, w)
  rows = max(h - crop_h + stride_h - 1, 0) // stride_h + 1
  cols = max(w - crop_w + stride_w - 1, 0) // stride_w + 1
  boxes = []
  for i in range(rows):
    for j in range(cols):
      y2 = min(i * stride_h + crop_h, h)
      x2 = min(j * stride_w + crop_w, w)
      boxes.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
  return boxes


def average_windows(windows: jax.Array,
                    boxes: Sequence[tuple[int, int, int, int]],
                    out_hw: tuple[int, int], output_stride: int) -> jax.Array:
  """Window logits placed at ``boxes`` / os and averaged where they overlap.

  Args:
    windows: (n, B, h, w, C) logits, one per box (h = box height / os).
    boxes: the n static (y1, y2, x1, x2) boxes in input pixels, multiples
      of ``output_stride``, covering the whole input.
    out_hw: (H / os, W / os).
    output_stride: os.

  Returns:
    (B, H / os, W / os, C) float32.
  """
  n, b, _, _, c = windows.shape
  if n != len(boxes):
    raise ValueError(f'{n} windows but {len(boxes)} boxes')
  total = jnp.zeros((b,) + tuple(out_hw) + (c,), jnp.float32)
  count = np.zeros(tuple(out_hw), np.float32)
  for i, box in enumerate(boxes):
    y1, y2, x1, x2 = (int(v) // output_stride for v in box)
    total = total.at[:, y1:y2, x1:x2].add(windows[i].astype(jnp.float32))
    count[y1:y2, x1:x2] += 1
  if not count.all():
    raise ValueError('the windows do not cover the whole input')
  return total / jnp.asarray(count)[None, :, :, None]
