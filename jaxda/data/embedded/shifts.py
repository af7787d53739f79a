"""Named target shifts of the embedded segmentation benchmark.

One source domain (the flat "rendered" look of `looks.paint_source`) and a
family of target domains that differ from it, and from each other, in kind:

* ``'default'``: the original target (`looks.paint_target`): another palette,
  textures and a camera (exposure, colour cast, gamma, vignetting, mild blur,
  sensor noise). Bit-identical to the generator before shifts existed.
* ``'texture'``: another city: the default camera, but another palette
  (ochre and white façades, terracotta paving, cobbled roads, autumn
  foliage, dry grass, blue signs, yellow markings) and other ground textures
  (`TEXTURE_PALETTE`).
* ``'weather'``: the default look under fog and overcast light: the scene is
  dimmed and desaturated, then blended with a bright fog colour by its depth
  (transmission ``exp(-depth / visibility)``; the skyline sits at
  `FOG_FAR_DEPTH` camera heights, the sky is all fog). Lower contrast.
* ``'sensor'``: the default look through a poor camera: strong blur,
  stronger noise, then JPEG-like compression (8x8 DCT quantisation of
  YCbCr at quality 8-25, chroma subsampled 2x2). Less high-frequency detail,
  8x8 block edges.
* ``'layout'``: the default look, another street: the camera sits 1.15-1.4x
  lower and is pitched down (horizon at 24-36% of the height instead of
  36-50%), streets are urban canyons (taller buildings, building-lined
  roadsides) with more cars and people and few trees. Other class
  frequencies, object sizes and positions.

The appearance shifts ('texture', 'weather', 'sensor') keep the layouts of
'default' (the same label maps for the same seed and index), so a paired
comparison isolates what they change; 'layout' keeps the default look.
Each shift's extra draws come from its own random stream per image.

`DEVELOPMENT_SHIFT` is the one shift on which defaults may be tuned; the
others are for reporting only.
"""

import numpy as np

from jaxda.data.embedded import looks
from jaxda.data.embedded import scenes

DEFAULT_SHIFT = 'default'
SHIFTS = ('default', 'texture', 'weather', 'sensor', 'layout')
# The shift on which method defaults are chosen (not the default target, so
# that the reported default target was not tuned on).
DEVELOPMENT_SHIFT = 'weather'
DESCRIPTIONS = {
    'default': 'the original target: textured camera look',
    'texture': 'another city: palette and ground/foliage textures',
    'weather': 'fog by depth, overcast dimming, desaturation',
    'sensor': 'strong blur and noise, JPEG-like 8x8 DCT compression',
    'layout': 'lower, pitched-down camera; urban canyon, more cars/people',
}
assert set(DESCRIPTIONS) == set(SHIFTS)
# Bump whenever the pixels of a non-default shift change (cache keys).
SHIFT_VERSION = 1
# Salt of each shift's own random stream (the default draws none).
_SHIFT_SALT = {'texture': 0x7E47, 'weather': 0x3EA7, 'sensor': 0x5E50,
               'layout': 0x1A70}

_C = scenes  # Class ids.


def check_shift(shift):
  """Raises ValueError naming the known shifts if `shift` is not one."""
  if shift not in SHIFTS:
    raise ValueError(f'unknown target shift {shift!r}; known shifts: '
                     f'{", ".join(SHIFTS)}')


def shift_rng(shift, seed, salt, index):
  """The extra random stream of image `index` of a non-default shift."""
  return np.random.default_rng([seed, salt, index, 2, _SHIFT_SALT[shift]])


# ----------------------------------------------------------------------------
# 'layout': camera height, pitch and street statistics.
# ----------------------------------------------------------------------------


def shift_layout(lay, rng):
  """A default layout (`scenes.sample_layout`) seen by another camera/street.

  A camera `k` times lower sees every ground distance in camera heights `k`
  times larger: road, sidewalks, lateral offsets and object sizes scale by
  `k`. The camera is pitched down (higher horizon); the street is an urban
  canyon: taller skyline blocks, roadsides lined with buildings, cars and
  people on 85% of their slots, trees on 15%.
  """
  lay = dict(lay)
  k = rng.uniform(1.15, 1.4)
  lay['horizon'] = rng.uniform(0.24, 0.36)
  for key in ('road_c', 'road_r', 'walk', 'tree_u'):
    lay[key] = lay[key] * k
  for name in ('tree', 'pole', 'car', 'person'):
    lay[name + '_size'] = lay[name + '_size'] * k
  lay['block_h'] = lay['block_h'] * rng.uniform(1.5, 2.2)
  # Parked and moving traffic further down the street: fewer frame-filling
  # cars right in front of the (lower) camera.
  lay['car_t'] = lay['car_t'] * 0.75
  lay['fill'] = rng.choice(np.array([_C.BUILDING, _C.TERRAIN]), size=2,
                           p=[0.85, 0.15]).astype(lay['fill'].dtype)
  for name, p in (('car', 0.75), ('person', 0.85), ('tree', 0.15)):
    lay[name + '_on'] = rng.random(len(lay[name + '_on'])) < p
  return lay


# ----------------------------------------------------------------------------
# 'texture': another city's palette.
# ----------------------------------------------------------------------------

_f32 = lambda rows: np.array(rows, np.float32)  # pylint: disable=invalid-name

TEXTURE_PALETTE = dict(
    looks.TARGET_PALETTE,
    colours=_f32([
        [118, 100, 88],  # road: cobbles
        [178, 112, 86],  # sidewalk: terracotta
        [204, 168, 110],  # building (façades come from 'facade')
        [172, 196, 230],  # sky
        [178, 104, 34],  # vegetation: autumn
        [44, 72, 54],  # pole: dark green
        [200, 200, 200],  # car (from 'car')
        [90, 90, 90],  # person (from 'clothes')
        [192, 170, 98],  # terrain: dry grass
        [34, 78, 170],  # traffic sign: blue
    ]),
    facade=_f32([[206, 160, 92], [228, 222, 208], [208, 150, 138],
                 [222, 202, 140], [172, 92, 62], [150, 170, 192]]),
    car=_f32([[232, 200, 40], [32, 112, 62], [204, 204, 210],
              [124, 30, 42], [242, 242, 242], [22, 22, 26]]),
    clothes=_f32([[204, 182, 62], [32, 92, 142], [222, 222, 222],
                  [122, 42, 112], [62, 62, 62]]),
    fine_gain=_f32([34, 10, 12, 0, 40, 0, 18, 0, 10, 0]),
    mid_gain=_f32([8, 6, 10, 0, 90, 0, 0, 0, 30, 0]),
    grout_gain=_f32([-40, -26, 0, 0, 0, 0, 0, 0, 0, 0]),
    tile=0.25,
    window=_f32([72, 46, 32]),  # wooden shutters
    skin=_f32([160, 116, 86]),
    trunk=_f32([64, 52, 40]),
    marking=_f32([232, 200, 60]),  # yellow lines
    cloud=_f32([242, 238, 230]),
)


# ----------------------------------------------------------------------------
# 'weather': fog and overcast light.
# ----------------------------------------------------------------------------

# Depth (camera heights) given to the skyline and the far vegetation band,
# which have no ground geometry; the sky is infinitely far.
FOG_FAR_DEPTH = 10.0


def sample_weather(rng):
  """Fog visibility, fog colour, dimming and desaturation of one image."""
  grey = rng.uniform(170.0, 215.0)
  return {
      'visibility': rng.uniform(6.0, 14.0),
      'fog': grey * rng.uniform(0.96, 1.04, 3),
      'dim': rng.uniform(0.6, 0.85),
      'desat': rng.uniform(0.2, 0.5),
  }


def apply_weather(img, labels, geom, weather):
  """Fogs and dims scene radiance (B, H, W, 3) by depth; same shape."""
  height = labels.shape[1]
  s = np.broadcast_to(geom['s'], labels.shape)
  key = np.where(geom['zbuf'] > 0, geom['zbuf'], s)
  depth = np.where(key > 0, height / np.maximum(key, 1e-6), FOG_FAR_DEPTH)
  depth = np.where(labels == _C.SKY, np.inf, depth)
  col = lambda a: np.asarray(a, np.float32)[:, None, None, None]
  grey = img.mean(axis=-1, keepdims=True)
  img = img + col(weather['desat']) * (grey - img)
  img = img * col(weather['dim'])
  t = np.exp(-depth / scenes.column(weather['visibility']))[..., None]
  fog = np.asarray(weather['fog'], np.float32)[:, None, None, :]
  return (img * t + fog * (1 - t)).astype(np.float32)


# ----------------------------------------------------------------------------
# 'sensor': blur, noise and JPEG-like compression.
# ----------------------------------------------------------------------------

_LUMA_Q = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99],
], np.float32)  # The JPEG standard's luminance table (Annex K).
_CHROMA_Q = np.full((8, 8), 99, np.float32)
_CHROMA_Q[:4, :4] = np.array([[17, 18, 24, 47], [18, 21, 26, 66],
                              [24, 26, 56, 99], [47, 66, 99, 99]])
_K = np.arange(8)
_DCT = (np.cos(np.pi * (2 * _K[None, :] + 1) * _K[:, None] / 16) *
        np.sqrt(2 / 8)).astype(np.float32)
_DCT[0] /= np.sqrt(2)  # Orthonormal DCT-II: coefficients = D @ block @ D.T.


def sample_sensor(rng):
  """Blur passes, noise level and JPEG quality of one image."""
  return {'blur': rng.integers(3, 6), 'noise_std': rng.uniform(8.0, 16.0),
          'quality': rng.uniform(8.0, 25.0)}


def _quant_tables(quality):
  """(B, 8, 8) luma and chroma tables at JPEG quality (B,) in 1..100."""
  q = np.asarray(quality, np.float32)
  scale = np.where(q < 50, 5000 / q, 200 - 2 * q)[:, None, None]
  return tuple(np.clip(np.floor((t * scale + 50) / 100), 1, 255)
               for t in (_LUMA_Q, _CHROMA_Q))


def _dct_quantise(channel, table):
  """Quantises (B, H, W) in 8x8 DCT blocks (H, W multiples of 8)."""
  b, h, w = channel.shape
  blocks = channel.reshape(b, h // 8, 8, w // 8, 8)
  coef = np.einsum('ui,bhiwj,vj->bhuwv', _DCT, blocks, _DCT)
  t = table[:, None, :, None, :]
  coef = np.rint(coef / t) * t
  out = np.einsum('ui,bhuwv,vj->bhiwj', _DCT, coef, _DCT)
  return out.reshape(b, h, w)


def jpeg_like(images, quality):
  """JPEG-like compression of uint8 (B, H, W, 3): YCbCr, chroma 4:2:0,
  8x8 DCT quantisation with the standard tables at `quality` (B,)."""
  b, h, w, _ = images.shape
  ph, pw = -h % 16, -w % 16
  x = np.pad(images.astype(np.float32), ((0, 0), (0, ph), (0, pw), (0, 0)),
             mode='edge')
  r, g, bl = x[..., 0], x[..., 1], x[..., 2]
  y = 0.299 * r + 0.587 * g + 0.114 * bl
  cb = -0.168736 * r - 0.331264 * g + 0.5 * bl
  cr = 0.5 * r - 0.418688 * g - 0.081312 * bl
  luma_q, chroma_q = _quant_tables(quality)
  y = _dct_quantise(y - 128, luma_q) + 128

  def chroma(c):
    small = c.reshape(b, c.shape[1] // 2, 2, c.shape[2] // 2, 2).mean((2, 4))
    sp = np.pad(small, ((0, 0), (0, -small.shape[1] % 8),
                        (0, -small.shape[2] % 8)), mode='edge')
    sp = _dct_quantise(sp, chroma_q)[:, :small.shape[1], :small.shape[2]]
    return sp.repeat(2, axis=1).repeat(2, axis=2)

  cb, cr = chroma(cb), chroma(cr)
  rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr,
                  y + 1.772 * cb], axis=-1)[:, :h, :w]
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# Painting a shift.
# ----------------------------------------------------------------------------


def paint(shift, lab, inst, part, geom, look_rngs, extra_rngs):
  """Paints rendered layouts as target shift `shift`: uint8 (B, H, W, 3).

  Args:
    shift: one of `SHIFTS`.
    lab, inst, part, geom: `scenes.render_layout` output.
    look_rngs: per image, the target look stream (`looks.sample_target_look`).
    extra_rngs: per image, the shift's own stream (`shift_rng`); unused by
      'default' and 'layout'.
  """
  check_shift(shift)
  height, width = lab.shape[1:]
  palette = TEXTURE_PALETTE if shift == 'texture' else None
  look = scenes.stack_draws([looks.sample_target_look(r, height, width,
                                                      palette)
                             for r in look_rngs])
  if shift in ('default', 'layout'):
    return looks.paint_target(lab, inst, part, geom, look)
  scene = looks.paint_target_scene(lab, inst, part, geom, look, palette)
  if shift == 'weather':
    weather = scenes.stack_draws([sample_weather(r) for r in extra_rngs])
    scene = apply_weather(scene, lab, geom, weather)
  if shift != 'sensor':
    return looks.camera(scene, look)
  sensor = scenes.stack_draws([sample_sensor(r) for r in extra_rngs])
  look = dict(look, blur=sensor['blur'], noise_std=sensor['noise_std'])
  return jpeg_like(looks.camera(scene, look), sensor['quality'])
