"""MIC block masks (METHODS.md §17.3.7).

The student must predict the teacher's full-image pseudo label from a target
image with 70% of its blocks blanked out, which forces it to use context.
Masked pixels become 0 in normalised space, i.e. the dataset mean colour.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grid_shape(height: int, width: int, block_size: int) -> tuple[int, int]:
  """(round(H / b), round(W / b)), Python's round as in the original."""
  return round(height / block_size), round(width / block_size)


def nearest_indices(out_size: int, in_size: int) -> jax.Array:
  """PyTorch 'nearest' source index: min(floor(dst * in / out), in - 1)."""
  scale = jnp.float32(in_size) / jnp.float32(out_size)
  idx = jnp.floor(jnp.arange(out_size, dtype=jnp.float32) * scale)
  return jnp.minimum(idx.astype(jnp.int32), in_size - 1)


def mask_from_uniform(uniform: jax.Array, out_hw: tuple[int, int],
                      mask_ratio: float = 0.7) -> jax.Array:
  """Deterministic part: (..., h, w) uniforms -> (..., H, W) float32 mask.

  A cell is kept (1) iff u > ``mask_ratio``; the grid is upsampled with
  PyTorch's nearest rule.
  """
  keep = (uniform > mask_ratio).astype(jnp.float32)
  rows = nearest_indices(out_hw[0], uniform.shape[-2])
  cols = nearest_indices(out_hw[1], uniform.shape[-1])
  return jnp.take(jnp.take(keep, rows, axis=-2), cols, axis=-1)


def block_mask(key: jax.Array, batch: int, height: int, width: int,
               block_size: int = 64, mask_ratio: float = 0.7) -> jax.Array:
  """(B, H, W) float32 random block mask, independent per sample."""
  h, w = grid_shape(height, width, block_size)
  u = jax.random.uniform(key, (batch, h, w))
  return mask_from_uniform(u, (height, width), mask_ratio)


def mask_images(key: jax.Array, images: jax.Array, block_size: int = 64,
                mask_ratio: float = 0.7) -> tuple[jax.Array, jax.Array]:
  """Masks normalised (B, H, W, C) images; returns (masked, mask (B, H, W))."""
  b, h, w, _ = images.shape
  mask = block_mask(key, b, h, w, block_size, mask_ratio)
  return images * mask[..., None].astype(images.dtype), mask
