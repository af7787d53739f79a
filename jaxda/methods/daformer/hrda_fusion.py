"""HRDA scale-attention fusion of context and detail logits (METHODS.md
§17.3.8).

A learned per-class attention decides, pixel by pixel, how much the fused
prediction trusts the high-resolution detail crop (small objects) over the
low-resolution context view (large structures). The attention is zeroed
outside the detail crop, where there is no detail prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


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
