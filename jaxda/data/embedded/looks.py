"""Appearance of the two domains of the synthetic benchmark: painting.

`scenes` gives label, instance and part maps; these functions colour them.
'source' is flat and game-like (one colour per class, small jitter),
'target' camera-like (other palette, textures, exposure, blur, noise), so
layout statistics match while colour statistics shift.

The target painter is split into the scene (`paint_target_scene`: colours
and textures from a palette, `TARGET_PALETTE` by default) and the camera
(`camera`: exposure, white balance, gamma, vignetting, blur, noise), so the
named target shifts of `shifts` can swap the palette or act between the
two (fog) or after them (compression).
"""

import numpy as np

from jaxda.data.embedded import scenes

_col = scenes.column  # (B,) -> (B, 1, 1).

# 'source': saturated, game-like flat colours.
_SOURCE_COLOURS = np.array([
    [96, 92, 108],  # road
    [196, 170, 178],  # sidewalk
    [168, 124, 96],  # building
    [112, 178, 242],  # sky
    [52, 168, 64],  # vegetation
    [150, 150, 160],  # pole
    [36, 72, 210],  # car
    [232, 64, 64],  # person
    [160, 210, 96],  # terrain
    [250, 214, 24],  # traffic sign
], dtype=np.float32)

_SOURCE_CAR_COLOURS = np.array(
    [[36, 72, 210], [210, 40, 40], [232, 232, 236], [40, 40, 52]],
    dtype=np.float32)

# 'target': duller, camera-like colours; building, car and person colours are
# drawn per instance from the sets below instead.
_TARGET_COLOURS = np.array([
    [74, 76, 74],  # road
    [150, 144, 142],  # sidewalk
    [130, 122, 112],  # building
    [150, 182, 220],  # sky
    [62, 108, 46],  # vegetation
    [84, 86, 82],  # pole
    [150, 150, 155],  # car
    [70, 62, 72],  # person
    [140, 146, 80],  # terrain
    [214, 150, 30],  # traffic sign
], dtype=np.float32)
_FACADE_COLOURS = np.array(
    [[128, 120, 110], [156, 128, 96], [96, 100, 114], [176, 166, 150],
     [122, 74, 62]], dtype=np.float32)
_CAR_COLOURS = np.array(
    [[40, 60, 150], [190, 190, 195], [34, 34, 38], [225, 225, 222],
     [150, 32, 30], [60, 80, 170], [110, 112, 118]], dtype=np.float32)
_CLOTHES_COLOURS = np.array(
    [[150, 40, 50], [40, 40, 48], [60, 70, 100], [170, 60, 60],
     [90, 70, 60]], dtype=np.float32)
_SKIN = np.array([196, 156, 128], np.float32)
_WINDOW = np.array([44, 52, 62], np.float32)
_TRUNK = np.array([82, 62, 46], np.float32)
_CLOUD = np.array([236, 236, 240], np.float32)
_MARKING = np.array([206, 206, 196], np.float32)

# Everything `paint_target_scene` takes from a palette: class colours,
# per-instance colour sets, per-class texture gains and the flat override
# colours. `shifts.TEXTURE_PALETTE` is another city's.
TARGET_PALETTE = {
    'colours': _TARGET_COLOURS,
    'facade': _FACADE_COLOURS,
    'car': _CAR_COLOURS,
    'clothes': _CLOTHES_COLOURS,
    # Brightness texture gains per class: fine grain and mid-scale blotches.
    'fine_gain': np.array([26, 12, 0, 0, 30, 0, 18, 0, 0, 0], np.float32),
    'mid_gain': np.array([10, 0, 0, 0, 70, 0, 0, 0, 40, 0], np.float32),
    # Ground tiles (grout lines every `tile` camera heights) per class.
    'grout_gain': np.array([0, -34, 0, 0, 0, 0, 0, 0, 0, 0], np.float32),
    'tile': 0.5,
    'window': _WINDOW,
    'wheel': np.full(3, 22, np.float32),
    'skin': _SKIN,
    'trunk': _TRUNK,
    'marking': _MARKING,
    'cloud': _CLOUD,
}


def sample_target_look(rng, height, width, palette=None):
  """Draws the target-domain appearance parameters and noise of one image.

  `palette` (default `TARGET_PALETTE`) sets how many façade, car and
  clothes colours the per-instance draws pick from.
  """
  palette = TARGET_PALETTE if palette is None else palette
  scale = height / 64.0
  mid = (int(np.ceil(height / (2 * scale))) + 2,
         int(np.ceil(width / (2 * scale))) + 2)
  coarse = (int(np.ceil(height / (12 * scale))) + 2,
            int(np.ceil(width / (12 * scale))) + 2)
  return {
      'facade': rng.integers(0, len(palette['facade']), scenes.NUM_INST),
      'car_colour': rng.integers(0, len(palette['car']), scenes.NUM_INST),
      'clothes': rng.integers(0, len(palette['clothes']), scenes.NUM_INST),
      # Façade style: bricks / windows / plaster.
      'style': rng.integers(0, 3, scenes.NUM_INST),
      'inst_jitter': rng.normal(0.0, 8.0, (scenes.NUM_INST, 3)),
      'brick': np.array([rng.uniform(3.0, 4.5), rng.uniform(6.0, 9.0)]),
      'window': np.array([rng.uniform(6.0, 9.0), rng.uniform(5.0, 8.0),
                          rng.uniform(0, 1), rng.uniform(0, 1)]),
      'lane_phase': rng.uniform(0, 1),
      'gain': rng.uniform(0.65, 1.1),
      'cast': rng.uniform(0.88, 1.12, 3),
      'gamma': rng.uniform(0.8, 1.3),
      'vignette': rng.uniform(0.0, 0.35),
      'blur': rng.integers(1, 3),
      'noise_std': rng.uniform(3.0, 9.0),
      'fine': rng.random((height, width), dtype=np.float32),
      'mid': rng.random(mid, dtype=np.float32),
      'coarse': rng.random(coarse, dtype=np.float32),
      'sensor': rng.standard_normal((height, width, 3), dtype=np.float32),
  }


def sample_source_look(rng, height, width):
  """Draws the source-domain colour jitter and exposure of one image."""
  return {
      'class_jitter': rng.normal(0.0, 8.0, (scenes.NUM_CLASSES, 3)),
      'inst_jitter': rng.normal(0.0, 10.0, (scenes.NUM_INST, 3)),
      'car_colour': rng.integers(0, len(_SOURCE_CAR_COLOURS), scenes.NUM_INST),
      'gain': rng.uniform(0.8, 1.15),
      'noise_std': rng.uniform(0.0, 3.0),
      'sensor': rng.standard_normal((height, width, 3), dtype=np.float32),
  }

def _upsample(grid, height, width):
  """Smoothstep-bilinear upsampling of (B, gy, gx) grids to (B, H, W)."""
  gy, gx = grid.shape[1:]
  ys = (np.arange(height) + 0.5) / height * (gy - 1)
  xs = (np.arange(width) + 0.5) / width * (gx - 1)
  y0 = np.minimum(ys.astype(np.int64), gy - 2)
  x0 = np.minimum(xs.astype(np.int64), gx - 2)
  fy = ys - y0
  fx = xs - x0
  fy = (fy * fy * (3 - 2 * fy))[None, :, None]
  fx = (fx * fx * (3 - 2 * fx))[None, None, :]
  g00 = grid[:, y0][:, :, x0]
  g01 = grid[:, y0][:, :, x0 + 1]
  g10 = grid[:, y0 + 1][:, :, x0]
  g11 = grid[:, y0 + 1][:, :, x0 + 1]
  top = g00 + (g01 - g00) * fx
  bottom = g10 + (g11 - g10) * fx
  return (top + (bottom - top) * fy).astype(np.float32)


def _blur(img, passes):
  """Separable [1, 2, 1] / 4 blur of (B, H, W, 3), `passes` (B,) times each."""
  out = img
  for p in range(int(passes.max(initial=0))):
    pad = np.pad(out, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
    blurred = (pad[:, :-2] + 2 * pad[:, 1:-1] + pad[:, 2:]) / 4
    blurred = (blurred[:, :, :-2] + 2 * blurred[:, :, 1:-1] +
               blurred[:, :, 2:]) / 4
    out = np.where((passes > p)[:, None, None, None], blurred, out)
  return out


def paint_source(labels, inst, look):
  """Flat per-class colours with per-image and per-instance jitter.

  Cars take one of a few saturated paints per instance and each image gets
  an exposure gain and faint noise: enough within-class variation that a
  network cannot segment source images by exact colour lookup alone.
  """
  b = labels.shape[0]
  n = np.arange(b)[:, None, None]
  table = np.broadcast_to(_SOURCE_COLOURS[None, :, None, :],
                          (b, scenes.NUM_CLASSES, scenes.NUM_INST, 3)).copy()
  table[:, scenes.CAR] = _SOURCE_CAR_COLOURS[look['car_colour']]
  table += look['class_jitter'][:, :, None] + look['inst_jitter'][:, None]
  table *= _col(look['gain'])[..., None]
  img = table[n, labels, inst]
  img += _col(look['noise_std'])[..., None] * look['sensor']
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def paint_target(labels, inst, part, geom, look):
  """Textured, re-coloured, re-lit, blurred and noisy rendering."""
  return camera(paint_target_scene(labels, inst, part, geom, look), look)


def paint_target_scene(labels, inst, part, geom, look, palette=None):
  """The scene before the camera: float32 (B, H, W, 3) radiance, 0..~255.

  Colours and textures come from `palette` (default `TARGET_PALETTE`).
  """
  palette = TARGET_PALETTE if palette is None else palette
  b, height, width = labels.shape
  scale = height / 64.0
  n = np.arange(b)[:, None, None]
  y = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None]
  x = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :]
  fine = look['fine'] - 0.5
  mid = _upsample(look['mid'], height, width) - 0.5
  coarse = _upsample(look['coarse'], height, width)

  # Base colour from a per-image (class, instance) table: one gather.
  table = np.broadcast_to(palette['colours'][None, :, None, :],
                          (b, scenes.NUM_CLASSES, scenes.NUM_INST, 3)).copy()
  table[:, scenes.BUILDING] = palette['facade'][look['facade']]
  table[:, scenes.CAR] = palette['car'][look['car_colour']]
  table[:, scenes.PERSON] = palette['clothes'][look['clothes']]
  table += look['inst_jitter'][:, None]
  img = table[n, labels, inst]

  # Per-class brightness textures, accumulated into one scalar field.
  s, dx, half = geom['s'], geom['dx'], geom['half']
  safe_s = np.maximum(s, 0.5)
  depth = height / safe_s  # Ground depth is proportional to 1 / s.
  is_building = labels == scenes.BUILDING
  style = look['style'][n, inst]
  # Ground tiles (the sidewalk's paving) in ground coordinates.
  tile = palette['tile']
  grout = ((np.mod(dx / safe_s / tile, 1.0) < 0.12) |
           (np.mod(depth / tile, 1.0) < 0.12))
  # Buildings: bricks (style 0), windows (1) or plaster (2) per façade.
  bh = _col(look['brick'][:, 0]) * scale
  bw = _col(look['brick'][:, 1]) * scale
  mortar = (np.mod(y, bh) < 0.9 * scale) | (
      np.mod(x + np.mod(np.floor(y / bh), 2) * bw / 2, bw) < 0.9 * scale)
  # Sky brightens towards the horizon; grass is mown in stripes.
  sky_grad = np.clip(y / np.maximum(geom['hz'], 1.0), 0, 1)
  stripes = np.sin(2 * np.pi * (x + 0.5 * y) / (6 * scale))
  shade = (palette['fine_gain'][labels] * fine +
           palette['mid_gain'][labels] * mid)
  shade += palette['grout_gain'][labels] * grout
  shade += np.where(is_building & (style == 0), 36 * mortar + 14 * fine, 0)
  shade += np.where(is_building & (style == 2), 30 * mid + 8 * fine, 0)
  shade += np.where(labels == scenes.SKY, 22 * sky_grad - 10, 0)
  shade += np.where(labels == scenes.TERRAIN, 14 * stripes, 0)
  img += shade[..., None]

  clouds = np.where(labels == scenes.SKY,
                    np.clip((coarse - 0.5) * 3.0, 0, 1), 0)
  img += clouds[..., None] * (palette['cloud'] - img)

  # Flat overrides: lane markings, windows, object parts.  Dashes of the
  # centre line repeat in ground depth; edge lines are solid.
  line_w = np.maximum(0.35, 0.05 * s)
  dashes = np.mod(depth / 4 + _col(look['lane_phase']), 1.0) < 0.5
  marking = (labels == scenes.ROAD) & (
      ((np.abs(dx) < line_w) & dashes) |
      (np.abs(np.abs(dx) - (half - 0.15 * s)) < line_w))
  fy = np.mod(y / (_col(look['window'][:, 0]) * scale) +
              _col(look['window'][:, 2]), 1.0)
  fx = np.mod(x / (_col(look['window'][:, 1]) * scale) +
              _col(look['window'][:, 3]), 1.0)
  window = (is_building & (style == 1) & (fy > 0.3) & (fy < 0.8) &
            (fx > 0.25) & (fx < 0.75))
  # Codes 0-4 are the part codes of `scenes` (0 = keep), 5 marking, 6 window.
  code = np.where(marking, 5, np.where(window, 6, part))
  override = np.stack([np.zeros(3, np.float32), palette['window'],
                       palette['wheel'], palette['skin'], palette['trunk'],
                       palette['marking'], palette['window'] + 15])[code]
  return np.where((code > 0)[..., None], override, img)


def camera(img, look):
  """Exposure and white balance, gamma, vignetting, optics, sensor: uint8.

  Args:
    img: float32 (B, H, W, 3) scene radiance (`paint_target_scene`).
    look: `sample_target_look` draws, stacked (gain, cast, gamma,
      vignette, blur passes, noise_std, sensor noise).
  """
  b, height, width = img.shape[:3]
  del b
  y = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None]
  x = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :]
  img = img * (_col(look['gain'])[..., None] *
               look['cast'][:, None, None, :])
  np.clip(img, 0, 255, out=img)
  img = 255.0 * (img / 255.0)**_col(look['gamma'])[..., None]
  r2 = (((y - height / 2) / height)**2 + ((x - width / 2) / width)**2) * 2
  img *= (1 - _col(look['vignette']) * r2)[..., None]
  img = _blur(img, look['blur'])
  img += _col(look['noise_std'])[..., None] * look['sensor']
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)
