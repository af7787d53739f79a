"""DACS strong augmentation on device: colour jitter and Gaussian blur.

Mirrors ``dacs_transforms.strong_transform`` with kornia 0.5.8 semantics
(METHODS.md §17.3.4), used on ClassMix and MIC images only, so the student has
to agree with the teacher's clean-image pseudo labels under photometric change.
The two switches are drawn once per call (the original draws them once per
iteration); factors, op order and sigma are drawn per image (the original calls
the transform once per mixed image).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, images scaled to [0, 1].
IMAGENET_STD = (0.229, 0.224, 0.225)
_TWO_PI = 2.0 * math.pi


def rgb_to_hsv(rgb: jax.Array, eps: float = 1e-8) -> jax.Array:
  """(..., 3) RGB in [0, 1] -> HSV with hue in [0, 2*pi) (kornia convention)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc = jnp.max(rgb, axis=-1)
  minc = jnp.min(rgb, axis=-1)
  delta = maxc - minc
  s = delta / (maxc + eps)
  safe = jnp.where(delta == 0, 1.0, delta)
  # First maximum wins, in R, G, B order (kornia's cumsum trick).
  h_r = (g - b) / safe
  h_g = (b - r) / safe + 2.0
  h_b = (r - g) / safe + 4.0
  h = jnp.where(r == maxc, h_r, jnp.where(g == maxc, h_g, h_b))
  h = jnp.where(delta == 0, 0.0, h)
  h = jnp.mod(h / 6.0, 1.0) * _TWO_PI
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """Inverse of `rgb_to_hsv` (hue in radians, any real value, wrapped)."""
  h = hsv[..., 0] / _TWO_PI
  s, v = hsv[..., 1], hsv[..., 2]
  h6 = jnp.mod(h * 6.0, 6.0)
  hi = jnp.floor(h6)
  f = h6 - hi
  p = v * (1.0 - s)
  q = v * (1.0 - f * s)
  t = v * (1.0 - (1.0 - f) * s)
  hi = hi.astype(jnp.int32) % 6
  choices = jnp.stack([
      jnp.stack([v, t, p], -1), jnp.stack([q, v, p], -1),
      jnp.stack([p, v, t], -1), jnp.stack([p, q, v], -1),
      jnp.stack([t, p, v], -1), jnp.stack([v, p, q], -1)], axis=0)
  return jnp.take_along_axis(choices, hi[None, ..., None], axis=0)[0]


def adjust_brightness(x: jax.Array, delta: jax.Array) -> jax.Array:
  return jnp.clip(x + delta, 0.0, 1.0)


def adjust_contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
  """Multiplies, without blending towards the mean (kornia 0.5.8)."""
  return jnp.clip(x * factor, 0.0, 1.0)


def adjust_saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
  hsv = rgb_to_hsv(x)
  hsv = hsv.at[..., 1].set(jnp.clip(hsv[..., 1] * factor, 0.0, 1.0))
  return hsv_to_rgb(hsv)


def adjust_hue(x: jax.Array, radians: jax.Array) -> jax.Array:
  hsv = rgb_to_hsv(x)
  hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + radians, _TWO_PI))
  return hsv_to_rgb(hsv)


def jitter_params(key: jax.Array,
                  strength: float = 0.2) -> dict[str, jax.Array]:
  """One image's kornia ``ColorJitter(s, s, s, s)`` draw.

  Returns brightness delta U(-s, s), contrast and saturation factors
  U(1-s, 1+s), hue shift 2*pi*U(-s, s) radians, and a permutation of the four
  ops (0 brightness, 1 contrast, 2 saturation, 3 hue).
  """
  kb, kc, ks, kh, ko = jax.random.split(key, 5)
  u = lambda k: jax.random.uniform(k, (), jnp.float32, -strength, strength)
  return {'brightness': u(kb), 'contrast': 1.0 + u(kc),
          'saturation': 1.0 + u(ks), 'hue': _TWO_PI * u(kh),
          'order': jax.random.permutation(ko, 4)}


def color_jitter(image01: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
  """Applies the four ops to one (H, W, 3) [0, 1] image, in
  ``params['order']``."""
  ops = (lambda x: adjust_brightness(x, params['brightness']),
         lambda x: adjust_contrast(x, params['contrast']),
         lambda x: adjust_saturation(x, params['saturation']),
         lambda x: adjust_hue(x, params['hue']))
  x = image01
  for i in range(4):
    x = jax.lax.switch(params['order'][i], ops, x)
  return x


def blur_kernel_size(side: int) -> int:
  """Largest odd integer <= ceil(0.1 * side): 51 at 512, 103 at 1024."""
  c = math.ceil(0.1 * side)
  return int(math.floor(c - 0.5 + c % 2))


def gaussian_kernel1d(size: int, sigma: jax.Array) -> jax.Array:
  """kornia ``get_gaussian_kernel1d``: exp(-x^2 / 2 sigma^2), normalised."""
  x = jnp.arange(size, dtype=jnp.float32) - size // 2
  if size % 2 == 0:
    x = x + 0.5
  g = jnp.exp(-(x ** 2) / (2.0 * sigma ** 2))
  return g / jnp.sum(g)


def gaussian_blur(image: jax.Array, sigma: jax.Array) -> jax.Array:
  """Separable Gaussian blur of one (H, W, C) image, reflect padding.

  Kernel sizes per axis follow `blur_kernel_size` of the image's own side.
  """
  h, w, c = image.shape
  out = image.astype(jnp.float32)
  for axis, side in ((0, h), (1, w)):
    size = blur_kernel_size(side)
    k = gaussian_kernel1d(size, sigma)
    pad = [(0, 0)] * 3
    pad[axis] = (size // 2, (size - 1) // 2)
    padded = jnp.pad(out, pad, mode='reflect')
    kshape = (size, 1) if axis == 0 else (1, size)
    kernel = jnp.broadcast_to(k.reshape(kshape + (1, 1)), kshape + (1, c))
    out = jax.lax.conv_general_dilated(
        padded[None], kernel, (1, 1), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST)[0]
  return out.astype(image.dtype)


def strong_transform(key: jax.Array, images: jax.Array, *,
                     jitter_strength: float = 0.2,
                     jitter_skip_prob: float = 0.2, blur: bool = True,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     switches: tuple[jax.Array, jax.Array] | None = None
                     ) -> jax.Array:
  """Colour jitter then Gaussian blur of normalised (B, H, W, 3) images.

  Jitter runs iff u_cj > ``jitter_skip_prob`` (the original's
  ``color_jitter_probability`` is the probability of *not* jittering: 0.2
  gives jitter with probability 0.8) on the de-normalised [0, 1] image, which
  is re-normalised after. Blur runs iff ``blur`` and u_blur > 0.5, with
  sigma ~ U(0.15, 1.15) per image, on the normalised image.

  Args:
    key: PRNG key.
    images: (B, H, W, 3) normalised as (x - mean) / std.
    jitter_strength: the s of ``ColorJitter(s, s, s, s)``.
    jitter_skip_prob: see above.
    blur: whether blur may run.
    mean, std: per-channel normalisation in [0, 1] units.
    switches: optional given (u_cj, u_blur), shared by the batch; drawn from
      ``key`` when None.

  Returns:
    (B, H, W, 3) augmented normalised images.
  """
  k_switch, k_img = jax.random.split(key)
  if switches is None:
    u_cj, u_blur = jax.random.uniform(k_switch, (2,))
  else:
    u_cj, u_blur = switches
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  k_jit, k_blur = jax.random.split(k_img)
  b = images.shape[0]

  def jitter_one(k, img):
    x01 = img.astype(jnp.float32) * std + mean
    out = (color_jitter(x01, jitter_params(k, jitter_strength)) - mean) / std
    return out.astype(images.dtype)

  def blur_one(k, img):
    sigma = jax.random.uniform(k, (), jnp.float32, 0.15, 1.15)
    return gaussian_blur(img, sigma)

  # The switches are shared by the batch, so `cond` skips the work entirely.
  out = jax.lax.cond(
      u_cj > jitter_skip_prob,
      lambda x: jax.vmap(jitter_one)(jax.random.split(k_jit, b), x),
      lambda x: x, images)
  if blur:
    out = jax.lax.cond(
        u_blur > 0.5,
        lambda x: jax.vmap(blur_one)(jax.random.split(k_blur, b), x),
        lambda x: x, out)
  return out
