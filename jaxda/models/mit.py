"""SegFormer MiT-B0..B5 encoder and the DAFormer decoder (METHODS.md §17.1).

DAFormer, HRDA and MIC all run on this network: a hierarchical Transformer
encoder (overlapping patch embeddings, attention with spatially reduced keys
and values, Mix-FFN with a depth-wise 3x3 conv instead of position embeddings)
and a decoder that embeds each level, upsamples it to stride 4 and fuses the
levels with a depth-wise separable ASPP. Channels-last throughout.

Parameter names follow the original mmseg MiT (`patch_embed1`, `block1_0`,
`attn/q`, `attn/kv`, `attn/sr`, `mlp/fc1`, `norm1`, ...), so that
`jaxda.weights.mit_import` is a rename plus layout change.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxda.models.kernels import remat as remat_lib


@dataclasses.dataclass(frozen=True)
class MiTConfig:
  """Geometry of one MiT variant."""
  hidden_sizes: tuple[int, ...] = (64, 128, 320, 512)
  depths: tuple[int, ...] = (3, 6, 40, 3)
  num_heads: tuple[int, ...] = (1, 2, 5, 8)
  sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
  mlp_ratio: int = 4
  patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
  strides: tuple[int, ...] = (4, 2, 2, 2)


_WIDE = (64, 128, 320, 512)
MIT_VARIANTS = {
    'mit_b0': MiTConfig(hidden_sizes=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    'mit_b1': MiTConfig(hidden_sizes=_WIDE, depths=(2, 2, 2, 2)),
    'mit_b2': MiTConfig(hidden_sizes=_WIDE, depths=(3, 4, 6, 3)),
    'mit_b3': MiTConfig(hidden_sizes=_WIDE, depths=(3, 4, 18, 3)),
    'mit_b4': MiTConfig(hidden_sizes=_WIDE, depths=(3, 8, 27, 3)),
    'mit_b5': MiTConfig(hidden_sizes=_WIDE, depths=(3, 6, 40, 3)),
    # Test-sized: seconds on a CPU, same code paths (every SR ratio).
    'mit_tiny': MiTConfig(hidden_sizes=(8, 16, 32, 64), depths=(1, 1, 1, 1),
                          num_heads=(1, 2, 2, 4)),
}

# PyTorch MiT init: Linear trunc_normal(0.02), bias 0; conv
# N(0, sqrt(2 / fan_out)).
_LINEAR_INIT = nn.initializers.truncated_normal(0.02)


def _conv_init(kernel_size: int, out_channels: int, groups: int = 1):
  fan_out = kernel_size * kernel_size * out_channels // groups
  return nn.initializers.normal(math.sqrt(2.0 / fan_out))


def resize_bilinear(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """(B, h, w, C) -> (B, H, W, C), PyTorch bilinear with align_corners=False
  (half-pixel centres, no antialiasing)."""
  if x.shape[1:3] == tuple(hw):
    return x
  return jax.image.resize(x, (x.shape[0], hw[0], hw[1], x.shape[3]), 'linear',
                          antialias=False)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if self.rate == 0.0:
      return x
    return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)))(
        x, deterministic=deterministic)


class EfficientAttention(nn.Module):
  """Multi-head attention whose keys/values come from an SR x SR strided conv
  of the tokens (spatial reduction), so its cost is N * N / SR^2."""
  dim: int
  num_heads: int
  sr_ratio: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    b, n, c = x.shape
    head = c // self.num_heads
    dense = lambda feats, name: nn.Dense(feats, dtype=self.dtype,
                                         kernel_init=_LINEAR_INIT, name=name)
    q = dense(c, 'q')(x).reshape(b, n, self.num_heads, head)
    kv_in = x
    if self.sr_ratio > 1:
      r = self.sr_ratio
      grid = x.reshape(b, hw[0], hw[1], c)
      grid = nn.Conv(c, (r, r), strides=(r, r), padding='VALID',
                     dtype=self.dtype, kernel_init=_conv_init(r, c),
                     name='sr')(grid)
      kv_in = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='norm')(
          grid.reshape(b, -1, c))
    kv = dense(2 * c, 'kv')(kv_in).reshape(b, -1, 2, self.num_heads, head)
    k, v = kv[:, :, 0], kv[:, :, 1]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * (head ** -0.5)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(b, n, c)
    return dense(c, 'proj')(out)


class MixFFN(nn.Module):
  """Linear(C -> rC) -> depth-wise 3x3 conv -> exact GELU -> Linear(rC -> C)."""
  dim: int
  hidden: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    b, n, _ = x.shape
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_LINEAR_INIT,
                 name='fc1')(x)
    x = x.reshape(b, hw[0], hw[1], self.hidden)
    # Named dwconv/dwconv as the original's `DWConv.dwconv`.
    x = _DWConv(self.hidden, dtype=self.dtype, name='dwconv')(x)
    x = nn.gelu(x.reshape(b, n, self.hidden), approximate=False)
    return nn.Dense(self.dim, dtype=self.dtype, kernel_init=_LINEAR_INIT,
                    name='fc2')(x)


class _DWConv(nn.Module):
  channels: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)),
                   feature_group_count=self.channels, dtype=self.dtype,
                   kernel_init=_conv_init(3, self.channels, self.channels),
                   name='dwconv')(x)


class MiTBlock(nn.Module):
  """Pre-norm block: x += DropPath(Attn(LN x)); x += DropPath(FFN(LN x))."""
  dim: int
  num_heads: int
  sr_ratio: int
  mlp_ratio: int = 4
  drop_path: float = 0.0
  ln_eps: float = 1e-6
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, hw: tuple[int, int],
               deterministic: bool = True) -> jax.Array:
    drop = DropPath(self.drop_path)
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name='norm1')(x)
    y = EfficientAttention(self.dim, self.num_heads, self.sr_ratio,
                           dtype=self.dtype, name='attn')(y, hw)
    x = x + drop(y, deterministic)
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name='norm2')(x)
    y = MixFFN(self.dim, self.dim * self.mlp_ratio, dtype=self.dtype,
               name='mlp')(y, hw)
    return x + drop(y, deterministic)


class MiT(nn.Module):
  """Mix Transformer encoder; returns the four stage outputs (strides 4..32).

  Attributes:
    config: a `MiTConfig` (see `MIT_VARIANTS`).
    drop_path_rate: stochastic depth, spread linearly over all blocks (0.1).
    ln_eps: LayerNorm eps of the blocks and stage-end norms (1e-6 in the
      original MiT; the transformers port uses 1e-5). Patch-embedding and SR
      norms always use 1e-5.
    dtype: compute dtype (None: float32).
    remat: recompute each block in the backward from its input, once the
      block's output cotangent exists (`kernels.remat.gated_remat`; DropPath
      redraws the forward's masks): one block's activations alive at a time.
  """
  config: MiTConfig = MiTConfig()
  drop_path_rate: float = 0.1
  ln_eps: float = 1e-6
  dtype: Any = None
  remat: bool = False  # recompute each block in the backward (memory)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True
               ) -> tuple[jax.Array, ...]:
    cfg = self.config
    total = sum(cfg.depths)
    rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    outs = []
    k = 0
    for s, (dim, depth) in enumerate(zip(cfg.hidden_sizes, cfg.depths)):
      p, st = cfg.patch_sizes[s], cfg.strides[s]
      x = nn.Conv(dim, (p, p), strides=(st, st),
                  padding=((p // 2, p // 2), (p // 2, p // 2)),
                  dtype=self.dtype, kernel_init=_conv_init(p, dim),
                  name=f'patch_embed{s + 1}_proj')(x)
      b, h, w, _ = x.shape
      t = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype,
                       name=f'patch_embed{s + 1}_norm')(
                           x.reshape(b, h * w, dim))
      for j in range(depth):
        block = MiTBlock(dim, cfg.num_heads[s], cfg.sr_ratios[s],
                         cfg.mlp_ratio, rates[k], self.ln_eps,
                         dtype=self.dtype, name=f'block{s + 1}_{j}')
        if self.remat:  # recomputed once its output cotangent exists
          rngs = (None if deterministic or not rates[k]
                  else {'dropout': self.make_rng('dropout')})
          t = remat_lib.gated_remat(block, t, (h, w), deterministic,
                                    rngs=rngs)
        else:
          t = block(t, (h, w), deterministic)
        k += 1
      t = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype,
                       name=f'norm{s + 1}')(t)
      x = t.reshape(b, h, w, dim)
      outs.append(x)
    return tuple(outs)


class ConvBNReLU(nn.Module):
  """mmcv ConvModule: conv without bias, BatchNorm (PyTorch defaults), ReLU."""
  features: int
  kernel: int = 1
  dilation: int = 1
  groups: int = 1
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train_bn: bool) -> jax.Array:
    pad = self.dilation * (self.kernel // 2)
    x = nn.Conv(self.features, (self.kernel, self.kernel),
                padding=((pad, pad), (pad, pad)),
                kernel_dilation=(self.dilation, self.dilation),
                feature_group_count=self.groups, use_bias=False,
                dtype=self.dtype, name='conv')(x)
    x = nn.BatchNorm(use_running_average=not train_bn, momentum=0.9,
                     epsilon=1e-5, dtype=self.dtype, name='bn')(x)
    return nn.relu(x)


class SeparableASPP(nn.Module):
  """DAFormer's context-aware fusion: 1x1 branch + depth-wise separable
  dilated 3x3 branches (each: dw conv+BN+ReLU, pw conv+BN+ReLU), concatenated,
  then a 3x3 bottleneck conv+BN+ReLU. No image pooling."""
  features: int = 256
  dilations: Sequence[int] = (1, 6, 12, 18)
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train_bn: bool) -> jax.Array:
    c = x.shape[-1]
    outs = []
    for i, d in enumerate(self.dilations):
      if d == 1:
        y = ConvBNReLU(self.features, 1, dtype=self.dtype,
                       name=f'aspp{i}')(x, train_bn)
      else:
        y = ConvBNReLU(c, 3, d, groups=c, dtype=self.dtype,
                       name=f'aspp{i}_dw')(x, train_bn)
        y = ConvBNReLU(self.features, 1, dtype=self.dtype,
                       name=f'aspp{i}_pw')(y, train_bn)
      outs.append(y)
    return ConvBNReLU(self.features, 3, dtype=self.dtype,
                      name='bottleneck')(jnp.concatenate(outs, -1), train_bn)


class DAFormerHead(nn.Module):
  """Per-level Linear embeddings, resized to stride 4, concatenated, fused.

  Attributes:
    num_classes: outputs (19; HRDA's scale-attention head: one per class).
    embed_dim: embedding / fusion channels (256).
    fusion: 'aspp' (separable ASPP, DAFormer) or 'conv1x1' (1x1 conv+BN+ReLU,
      HRDA's attention head).
    dilations: ASPP dilations.
    dropout: Dropout2d rate before the classifier (0.1).
    dtype: compute dtype.
  """
  num_classes: int
  embed_dim: int = 256
  fusion: str = 'aspp'
  dilations: Sequence[int] = (1, 6, 12, 18)
  dropout: float = 0.1
  dtype: Any = None

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], train_bn: bool = False,
               deterministic: bool = True) -> jax.Array:
    hw = features[0].shape[1:3]
    x = jnp.concatenate([
        resize_bilinear(nn.Dense(self.embed_dim, dtype=self.dtype,
                                 name=f'embed{i + 1}')(f), hw)
        for i, f in enumerate(features)], axis=-1)
    if self.fusion == 'aspp':
      x = SeparableASPP(self.embed_dim, self.dilations, dtype=self.dtype,
                        name='fuse')(x, train_bn)
    elif self.fusion == 'conv1x1':
      x = ConvBNReLU(self.embed_dim, 1, dtype=self.dtype, name='fuse')(
          x, train_bn)
    else:
      raise ValueError(f'fusion must be aspp or conv1x1, got {self.fusion!r}')
    x = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(
        x, deterministic=deterministic)
    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                kernel_init=nn.initializers.normal(0.01), name='cls')(x)
    return x.astype(jnp.float32)


class DAFormer(nn.Module):
  """MiT encoder + DAFormer head (+ HRDA's scale-attention head).

  Submodules: `encoder` (MiT), `head` (DAFormerHead) and, with
  `scale_attention`, `head_att` (a conv1x1-fusion DAFormerHead). Everything
  under a name containing 'head' gets the 10x LR of the DAFormer optimiser.
  """
  num_classes: int
  variant: str = 'mit_b5'
  embed_dim: int = 256
  dilations: Sequence[int] = (1, 6, 12, 18)
  drop_path_rate: float = 0.1
  dropout: float = 0.1
  ln_eps: float = 1e-6
  scale_attention: bool = False
  attention_dim: int = 0  # head_att channels; 0: embed_dim
  attention_classes: int = 0  # head_att outputs; 0: num_classes (class-wise)
  dtype: Any = None
  remat: bool = False  # MiT blocks recomputed in the backward

  @nn.compact
  def __call__(self, x: jax.Array, *, train_bn: bool = False,
               deterministic: bool = True,
               attention: bool = True) -> dict[str, jax.Array]:
    """Computes logits at output stride 4.

    Args:
      x: (B, H, W, 3) normalised images.
      train_bn: head BatchNorms use and update batch statistics
        (`batch_stats` mutable).
      deterministic: False enables DropPath and Dropout2d (needs a
        'dropout' rng).
      attention: with `scale_attention`, run `head_att` (HRDA's detail
        passes skip it).

    Returns:
      {'main': (B, H/4, W/4, C) float32 logits, 'features': the last encoder
      stage (B, H/32, W/32, C4) (feature distance), and with
      `scale_attention` 'attention': (B, H/4, W/4, C) attention logits}.
    """
    feats = MiT(MIT_VARIANTS[self.variant], self.drop_path_rate, self.ln_eps,
                dtype=self.dtype, remat=self.remat, name='encoder')(
                    x, deterministic)
    out = {'main': DAFormerHead(self.num_classes, self.embed_dim, 'aspp',
                                self.dilations, self.dropout, dtype=self.dtype,
                                name='head')(feats, train_bn, deterministic),
           'features': feats[-1].astype(jnp.float32)}
    if self.scale_attention and attention:
      out['attention'] = DAFormerHead(
          self.attention_classes or self.num_classes,
          self.attention_dim or self.embed_dim, 'conv1x1', self.dilations,
          self.dropout, dtype=self.dtype, name='head_att')(
              feats, train_bn, deterministic)
    return out


class MiTSegmenter(DAFormer):
  """The DAFormer net as a registry segmenter (``models.create_segmenter``
  names ``mit_b0`` ... ``mit_b5``, ``mit_tiny``): the same parameters as
  `DAFormer` (``encoder/``, ``head/``: MiT weight import applies), but only
  ``{'main': (B, H/4, W/4, C)}`` out, as every segmentation method reads its
  output levels."""

  @nn.compact
  def __call__(self, x: jax.Array, *, train_bn: bool = False,
               deterministic: bool = True,
               attention: bool = True) -> dict[str, jax.Array]:
    out = super().__call__(x, train_bn=train_bn, deterministic=deterministic,
                           attention=attention)
    return {'main': out['main']}
