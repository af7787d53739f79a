"""Embedded, download-free segmentation benchmark with a real domain shift.

Procedural driving scenes are drawn by one layout generator shared by both
domains: a horizon, a road in perspective with sidewalks, a skyline of
buildings, roadside trees, poles with traffic signs, cars on the road and
people on the sidewalks. Geometry follows a pinhole camera above a flat
ground plane, so an object whose base is `s` pixels below the horizon is
drawn `s * (object height / camera height)` pixels tall.

The two domains differ only in appearance:

* ``'source'`` looks "rendered": one flat colour per class with a small
  per-image and per-instance jitter (cars get one of a few saturated paints),
  a per-image exposure gain and faint noise; no texture.
* ``'target'`` looks "captured": a different palette (per-instance façade,
  car and clothing colours), textures (asphalt noise and lane markings,
  perspective paving tiles, bricks or windows on façades, foliage noise,
  mown-grass stripes, clouds, car windows and wheels), then a random exposure,
  colour cast, gamma, vignetting, blur and sensor noise.

Layout statistics (class frequencies, positions, sizes) are therefore the
same in both domains while colour statistics and textures shift strongly: a
classifier of flat colours transfers badly, shape and context transfer well.
Both domains carry labels, so target labels can be used for evaluation and
for an oracle (train-on-target) baseline.

Every image depends only on (seed, domain, index, height, width) and
`GENERATOR_VERSION`: ``generate(..., num_images=10)`` returns the first ten
images of ``generate(..., num_images=1000)``.
"""

import os
import tempfile

import numpy as np

# Bump whenever the pixels produced for a given set of arguments change, so
# that stale cache files are not reused.
GENERATOR_VERSION = 2

CLASS_NAMES = ('road', 'sidewalk', 'building', 'sky', 'vegetation', 'pole',
               'car', 'person', 'terrain', 'traffic_sign')
NUM_CLASSES = len(CLASS_NAMES)
(ROAD, SIDEWALK, BUILDING, SKY, VEGETATION, POLE, CAR, PERSON, TERRAIN,
 TRAFFIC_SIGN) = range(NUM_CLASSES)

# Cityscapes colours of the same classes, for visualising label maps.
PALETTE = np.array([
    [128, 64, 128],  # road
    [244, 35, 232],  # sidewalk
    [70, 70, 70],  # building
    [70, 130, 180],  # sky
    [107, 142, 35],  # vegetation
    [153, 153, 153],  # pole
    [0, 0, 142],  # car
    [220, 20, 60],  # person
    [152, 251, 152],  # terrain
    [220, 220, 0],  # traffic sign
], dtype=np.uint8)

DOMAINS = ('source', 'target')
SPLITS = ('train', 'val')

# ----------------------------------------------------------------------------
# Appearance tables.
# ----------------------------------------------------------------------------

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

# ----------------------------------------------------------------------------
# Layout constants: counts of drawable things and their instance ids.
# ----------------------------------------------------------------------------

_MAX_BLOCKS = 18  # Skyline blocks; min width 0.07 W, so they cover > 1.15 W.
_NUM_TREES, _NUM_POLES, _NUM_CARS, _NUM_PEOPLE = 3, 4, 6, 4
# Instance ids index per-image colour tables: 0 sky, 1 far vegetation band,
# 2 road, 3-4 sidewalks (left, right), 5-6 roadside fill (left, right), then
# skyline blocks and objects.
_INST_BLOCK0 = 7
_INST_TREE0 = _INST_BLOCK0 + _MAX_BLOCKS
_INST_POLE0 = _INST_TREE0 + _NUM_TREES
_INST_SIGN0 = _INST_POLE0 + _NUM_POLES
_INST_CAR0 = _INST_SIGN0 + _NUM_POLES
_INST_PERSON0 = _INST_CAR0 + _NUM_CARS
_NUM_INST = _INST_PERSON0 + _NUM_PEOPLE
# Object parts that the target domain paints differently (labels unchanged).
_PART_NONE, _PART_WINDOW, _PART_WHEEL, _PART_HEAD, _PART_TRUNK = range(5)
# Distinct salts keep the streams of the two domains independent.
_DOMAIN_SALT = {'source': 0x5EED50, 'target': 0x5EED7A}
_SPLIT_SALT = {'train': 0x77A1, 'val': 0x0FA1}
# Pixels rendered at once; bounds memory at any resolution.
_CHUNK_PIXELS = 1 << 18


def _sample_layout(rng):
  """Draws the scene layout of one image (resolution-independent units).

  Horizontal ground distances are in camera heights; image positions are
  fractions of the image height or width.
  """
  k = _MAX_BLOCKS
  vanish_x = rng.uniform(0.3, 0.7)
  widths = rng.uniform(0.07, 0.2, k)
  edges = np.cumsum(widths) - rng.uniform(0.0, 0.15)
  centres = edges - widths / 2
  # Blocks far from the vanishing point are nearer to the camera: taller.
  block_h = (rng.uniform(0.04, 0.2, k) +
             np.abs(centres - vanish_x) * rng.uniform(0.4, 1.0, k))
  block_h = block_h * (rng.random(k) > 0.2)  # 20% gaps in the skyline.
  lay = {
      'horizon': rng.uniform(0.36, 0.5),
      'vanish_x': vanish_x,
      'road_c': rng.uniform(-0.7, 0.7),
      'road_r': rng.uniform(1.6, 2.6),
      'walk': rng.uniform(0.7, 1.8, 2),
      'fill': rng.choice(np.array([BUILDING, TERRAIN, VEGETATION]), size=2,
                         p=[0.5, 0.3, 0.2]),
      'edges': edges,
      'block_h': block_h,
      'band': np.array([rng.uniform(0.01, 0.05), rng.uniform(2.0, 7.0),
                        rng.uniform(0.0, 2 * np.pi)]),
  }
  # Depths t (fraction of the ground rows below the horizon) are skewed
  # towards the horizon (power > 1) for cars and people: far objects are more
  # frequent and near ones would otherwise fill the frame.
  for name, num, p, t_range, power, u_range in (
      ('tree', _NUM_TREES, 0.5, (0.1, 0.75), 1.0, (0.0, 0.8)),
      ('pole', _NUM_POLES, 0.6, (0.1, 1.0), 1.0, (0.05, 0.35)),
      ('car', _NUM_CARS, 0.5, (0.08, 1.05), 1.7, (-0.8, 0.8)),
      ('person', _NUM_PEOPLE, 0.5, (0.1, 1.0), 1.3, (0.15, 0.85))):
    lay[name + '_on'] = rng.random(num) < p
    lay[name + '_side'] = rng.integers(0, 2, num)
    lay[name + '_t'] = (t_range[0] + (t_range[1] - t_range[0]) *
                        rng.random(num)**power)
    lay[name + '_u'] = rng.uniform(*u_range, num)
    lay[name + '_size'] = rng.uniform(0.85, 1.15, num)
  lay['sign_on'] = rng.random(_NUM_POLES) < 0.5
  lay['sign_round'] = rng.random(_NUM_POLES) < 0.5
  return lay


def _sample_target_look(rng, height, width):
  """Draws the target-domain appearance parameters and noise of one image."""
  scale = height / 64.0
  mid = (int(np.ceil(height / (2 * scale))) + 2,
         int(np.ceil(width / (2 * scale))) + 2)
  coarse = (int(np.ceil(height / (12 * scale))) + 2,
            int(np.ceil(width / (12 * scale))) + 2)
  return {
      'facade': rng.integers(0, len(_FACADE_COLOURS), _NUM_INST),
      'car_colour': rng.integers(0, len(_CAR_COLOURS), _NUM_INST),
      'clothes': rng.integers(0, len(_CLOTHES_COLOURS), _NUM_INST),
      'style': rng.integers(0, 3, _NUM_INST),  # bricks / windows / plaster
      'inst_jitter': rng.normal(0.0, 8.0, (_NUM_INST, 3)),
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


def _sample_source_look(rng, height, width):
  """Draws the source-domain colour jitter and exposure of one image."""
  return {
      'class_jitter': rng.normal(0.0, 8.0, (NUM_CLASSES, 3)),
      'inst_jitter': rng.normal(0.0, 10.0, (_NUM_INST, 3)),
      'car_colour': rng.integers(0, len(_SOURCE_CAR_COLOURS), _NUM_INST),
      'gain': rng.uniform(0.8, 1.15),
      'noise_std': rng.uniform(0.0, 3.0),
      'sensor': rng.standard_normal((height, width, 3), dtype=np.float32),
  }


def _stack(dicts):
  """Stacks per-image dicts; floats become float32 (speed; ample precision)."""
  out = {}
  for k in dicts[0]:
    v = np.stack([d[k] for d in dicts])
    out[k] = v.astype(np.float32) if v.dtype == np.float64 else v
  return out


def _col(a):
  """(B,) -> (B, 1, 1) for broadcasting against (B, H, W)."""
  return np.asarray(a)[:, None, None]


def _render_layout(lay, height, width):
  """Rasterises a batch of layouts.

  Args:
    lay: stacked output of `_sample_layout`, leading dimension B.
    height: image height H.
    width: image width W.

  Returns:
    labels: uint8 (B, H, W) class ids.
    inst: int32 (B, H, W) instance ids in [0, _NUM_INST).
    part: uint8 (B, H, W) `_PART_*` codes.
    geom: dict of float arrays broadcastable to (B, H, W): 's' (pixels below
      the horizon), 'dx' (pixels right of the road centre line), 'half'
      (road half width in pixels), 'hz' (horizon row), 'zbuf' (B, H, W):
      for object pixels the base row of the object in pixels below the
      horizon (> 0), 0 for the background.
  """
  b = lay['horizon'].shape[0]
  y = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None]
  x = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :]
  hz = _col(lay['horizon'] * height)
  vx = _col(lay['vanish_x'] * width)
  road_c = _col(lay['road_c'])
  road_r = _col(lay['road_r'])
  walk_l, walk_r = _col(lay['walk'][:, 0]), _col(lay['walk'][:, 1])

  # Ground plane: a pixel s rows below the horizon sees the ground at depth
  # proportional to 1/s, so lateral extents scale with s.
  s = y - hz  # (B, H, 1)
  ground = s > 0
  dx = x - (vx + s * road_c)  # (B, H, W)
  half = s * road_r
  road = ground & (np.abs(dx) < half)
  left = dx <= -half
  right = dx >= half
  walk_left = ground & left & (dx > -half - s * walk_l)
  walk_right = ground & right & (dx < half + s * walk_r)
  fill_left = ground & left & ~walk_left
  fill_right = ground & right & ~walk_right

  # Skyline: the block under each column gives the roof row of the column.
  xf = (np.arange(width) + 0.5) / width
  bidx = (xf[None, None, :] >= lay['edges'][:, :, None]).sum(axis=1)
  bidx = np.minimum(bidx, _MAX_BLOCKS - 1)  # (B, W)
  roof_h = np.take_along_axis(lay['block_h'], bidx, axis=1)[:, None, :]
  building = ~ground & (roof_h > 0) & (y >= hz - roof_h * height)
  block_inst = (_INST_BLOCK0 + bidx)[:, None, :]
  band_h, band_f, band_p = (_col(lay['band'][:, i]) for i in range(3))
  band = ~ground & (y >= hz - band_h * height *
                    (1 + 0.6 * np.sin(2 * np.pi * band_f * x / width +
                                      band_p)))

  labels = np.full((b, height, width), SKY, np.uint8)
  inst = np.zeros((b, height, width), np.int32)
  labels[band] = VEGETATION
  inst[band] = 1
  labels = np.where(building, BUILDING, labels)
  inst = np.where(building, block_inst, inst)
  labels[road] = ROAD
  inst[road] = 2
  labels[walk_left] = SIDEWALK
  inst[walk_left] = 3
  labels[walk_right] = SIDEWALK
  inst[walk_right] = 4
  for side, fill_mask in ((0, fill_left), (1, fill_right)):
    fill_cls = _col(lay['fill'][:, side])
    labels = np.where(fill_mask, fill_cls, labels).astype(np.uint8)
    # A building fill continues the façade of the skyline block above it.
    fill_inst = np.where(fill_cls == BUILDING, block_inst, 5 + side)
    inst = np.where(fill_mask, fill_inst, inst)

  part = np.zeros((b, height, width), np.uint8)
  # Z-buffer of object depth keys (pixels below the horizon of the object's
  # base: larger is nearer); 0 = background, always behind.
  zbuf = np.zeros((b, height, width), np.float32)

  def draw(mask, key, cls, inst_id, part_code):
    m = mask & (key > zbuf)
    np.copyto(labels, np.uint8(cls), where=m)
    np.copyto(inst, inst_id, where=m)
    np.copyto(part, part_code, where=m, casting='unsafe')
    np.copyto(zbuf, key, where=m)

  def base(name, j):
    """Base row, depth key, x of the centre line and side sign of object j."""
    t = lay[name + '_t'][:, j]
    sb = t * (height - lay['horizon'] * height)  # (B,)
    sign = np.where(lay[name + '_side'][:, j] == 0, -1.0, 1.0)
    walk = np.where(lay[name + '_side'][:, j] == 0, lay['walk'][:, 0],
                    lay['walk'][:, 1])
    on = _col(lay[name + '_on'][:, j])
    return (_col(lay['horizon'] * height + sb), _col(sb), _col(sign),
            _col(walk), on, _col(lay[name + '_u'][:, j]),
            _col(lay[name + '_size'][:, j]))

  def x_at(sb, lateral):
    return vx + sb * (road_c + lateral)

  for j in range(_NUM_TREES):
    yb, sb, sign, walk, on, u, size = base('tree', j)
    xt = x_at(sb, sign * (road_r + walk + u))
    trunk_h = 1.3 * sb * size
    trunk = ((np.abs(x - xt) < np.maximum(0.5, 0.07 * sb * size)) &
             (y <= yb) & (y >= yb - trunk_h))
    ry = 0.9 * sb * size
    rx = 0.75 * ry
    cy = yb - trunk_h - 0.6 * ry
    canopy = ((x - xt) / rx)**2 + ((y - cy) / ry)**2 < 1.0
    draw(on & (trunk | canopy), sb, VEGETATION, _INST_TREE0 + j,
         np.where(canopy, _PART_NONE, _PART_TRUNK))

  for j in range(_NUM_POLES):
    yb, sb, sign, walk, on, u, size = base('pole', j)
    xp = x_at(sb, sign * (road_r + u * walk))
    pole_h = 3.0 * sb * size
    pole = ((np.abs(x - xp) < np.maximum(0.5, 0.035 * sb)) & (y <= yb) &
            (y >= yb - pole_h))
    draw(on & pole, sb, POLE, _INST_POLE0 + j, _PART_NONE)
    r = np.maximum(0.22 * sb, 0.75)
    dxs, dys = x - xp, y - (yb - 0.88 * pole_h)
    round_ = _col(lay['sign_round'][:, j])
    sign_mask = np.where(round_, dxs**2 + dys**2 < r**2,
                         (np.abs(dxs) < r) & (np.abs(dys) < 0.8 * r))
    # A hair nearer than its pole so the sign is drawn over it.
    draw(on & _col(lay['sign_on'][:, j]) & sign_mask, sb + 1e-3,
         TRAFFIC_SIGN, _INST_SIGN0 + j, _PART_NONE)

  for j in range(_NUM_CARS):
    yb, sb, _, _, on, u, size = base('car', j)
    xc = x_at(sb, u * road_r)
    hw = 0.6 * sb * size
    h = sb * size
    adx = np.abs(x - xc)
    body = (adx < hw) & (y <= yb) & (y >= yb - 0.55 * h)
    rel = (y - (yb - h)) / np.maximum(0.45 * h, 1e-3)  # 0 roof .. 1 belt
    cabin = (y >= yb - h) & (y < yb - 0.55 * h) & (adx < hw * (0.6 + 0.3 * rel))
    wheel = body & (y >= yb - 0.18 * h) & (adx > 0.55 * hw)
    draw(on & (body | cabin), sb, CAR, _INST_CAR0 + j,
         np.where(cabin, _PART_WINDOW,
                  np.where(wheel, _PART_WHEEL, _PART_NONE)))

  for j in range(_NUM_PEOPLE):
    yb, sb, sign, walk, on, u, size = base('person', j)
    xh = x_at(sb, sign * (road_r + u * walk))
    h = 1.15 * sb * size
    w = 0.32 * h
    adx = np.abs(x - xh)
    torso = (adx < 0.5 * w) & (y >= yb - 0.82 * h) & (y < yb - 0.45 * h)
    gap = np.where(w >= 4.0, 0.07 * w, -1.0)  # Split legs only when visible.
    legs = (adx < 0.42 * w) & (adx > gap) & (y >= yb - 0.45 * h) & (y <= yb)
    head = adx**2 + (y - (yb - 0.9 * h))**2 < np.maximum(0.11 * h, 0.6)**2
    draw(on & (torso | legs | head), sb, PERSON, _INST_PERSON0 + j,
         np.where(head & ~torso, _PART_HEAD, _PART_NONE))

  geom = {'s': s, 'dx': dx, 'half': half, 'hz': hz, 'zbuf': zbuf}
  return labels, inst, part, geom


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


def _paint_source(labels, inst, look):
  """Flat per-class colours with per-image and per-instance jitter.

  Cars take one of a few saturated paints per instance and each image gets
  an exposure gain and faint noise: enough within-class variation that a
  network cannot segment source images by exact colour lookup alone.
  """
  b = labels.shape[0]
  n = np.arange(b)[:, None, None]
  table = np.broadcast_to(_SOURCE_COLOURS[None, :, None, :],
                          (b, NUM_CLASSES, _NUM_INST, 3)).copy()
  table[:, CAR] = _SOURCE_CAR_COLOURS[look['car_colour']]
  table += look['class_jitter'][:, :, None] + look['inst_jitter'][:, None]
  table *= _col(look['gain'])[..., None]
  img = table[n, labels, inst]
  img += _col(look['noise_std'])[..., None] * look['sensor']
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _paint_target(labels, inst, part, geom, look):
  """Textured, re-coloured, re-lit, blurred and noisy rendering."""
  b, height, width = labels.shape
  scale = height / 64.0
  n = np.arange(b)[:, None, None]
  y = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None]
  x = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :]
  fine = look['fine'] - 0.5
  mid = _upsample(look['mid'], height, width) - 0.5
  coarse = _upsample(look['coarse'], height, width)

  # Base colour from a per-image (class, instance) table: one gather.
  table = np.broadcast_to(_TARGET_COLOURS[None, :, None, :],
                          (b, NUM_CLASSES, _NUM_INST, 3)).copy()
  table[:, BUILDING] = _FACADE_COLOURS[look['facade']]
  table[:, CAR] = _CAR_COLOURS[look['car_colour']]
  table[:, PERSON] = _CLOTHES_COLOURS[look['clothes']]
  table += look['inst_jitter'][:, None]
  img = table[n, labels, inst]

  # Per-class brightness textures, accumulated into one scalar field.
  s, dx, half = geom['s'], geom['dx'], geom['half']
  safe_s = np.maximum(s, 0.5)
  depth = height / safe_s  # Ground depth is proportional to 1 / s.
  is_building = labels == BUILDING
  style = look['style'][n, inst]
  # Road: asphalt grain.  Sidewalk: paving tiles in ground coordinates.
  grout = ((np.mod(dx / safe_s / 0.5, 1.0) < 0.12) |
           (np.mod(depth / 0.5, 1.0) < 0.12))
  # Buildings: bricks (style 0), windows (1) or plaster (2) per façade.
  bh = _col(look['brick'][:, 0]) * scale
  bw = _col(look['brick'][:, 1]) * scale
  mortar = (np.mod(y, bh) < 0.9 * scale) | (
      np.mod(x + np.mod(np.floor(y / bh), 2) * bw / 2, bw) < 0.9 * scale)
  # Sky brightens towards the horizon; grass is mown in stripes.
  sky_grad = np.clip(y / np.maximum(geom['hz'], 1.0), 0, 1)
  stripes = np.sin(2 * np.pi * (x + 0.5 * y) / (6 * scale))
  fine_gain = np.array([26, 12, 0, 0, 30, 0, 18, 0, 0, 0], np.float32)
  mid_gain = np.array([10, 0, 0, 0, 70, 0, 0, 0, 40, 0], np.float32)
  shade = fine_gain[labels] * fine + mid_gain[labels] * mid
  shade += np.where(labels == SIDEWALK, -34 * grout, 0)
  shade += np.where(is_building & (style == 0), 36 * mortar + 14 * fine, 0)
  shade += np.where(is_building & (style == 2), 30 * mid + 8 * fine, 0)
  shade += np.where(labels == SKY, 22 * sky_grad - 10, 0)
  shade += np.where(labels == TERRAIN, 14 * stripes, 0)
  img += shade[..., None]

  clouds = np.where(labels == SKY, np.clip((coarse - 0.5) * 3.0, 0, 1), 0)
  img += clouds[..., None] * (_CLOUD - img)

  # Flat overrides: lane markings, windows, object parts.  Dashes of the
  # centre line repeat in ground depth; edge lines are solid.
  line_w = np.maximum(0.35, 0.05 * s)
  dashes = np.mod(depth / 4 + _col(look['lane_phase']), 1.0) < 0.5
  marking = (labels == ROAD) & (
      ((np.abs(dx) < line_w) & dashes) |
      (np.abs(np.abs(dx) - (half - 0.15 * s)) < line_w))
  fy = np.mod(y / (_col(look['window'][:, 0]) * scale) +
              _col(look['window'][:, 2]), 1.0)
  fx = np.mod(x / (_col(look['window'][:, 1]) * scale) +
              _col(look['window'][:, 3]), 1.0)
  window = (is_building & (style == 1) & (fy > 0.3) & (fy < 0.8) &
            (fx > 0.25) & (fx < 0.75))
  # Codes 0-4 are the `_PART_*` codes (0 = keep), 5 marking, 6 window.
  code = np.where(marking, 5, np.where(window, 6, part))
  override = np.stack([np.zeros(3, np.float32), _WINDOW,
                       np.full(3, 22, np.float32), _SKIN, _TRUNK, _MARKING,
                       _WINDOW + 15])[code]
  img = np.where((code > 0)[..., None], override, img)

  # Camera: exposure and white balance, gamma, vignetting, optics, sensor.
  img *= _col(look['gain'])[..., None] * look['cast'][:, None, None, :]
  np.clip(img, 0, 255, out=img)
  img = 255.0 * (img / 255.0)**_col(look['gamma'])[..., None]
  r2 = (((y - height / 2) / height)**2 + ((x - width / 2) / width)**2) * 2
  img *= (1 - _col(look['vignette']) * r2)[..., None]
  img = _blur(img, look['blur'])
  img += _col(look['noise_std'])[..., None] * look['sensor']
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _check_generate_args(domain, num_images, height, width, seed):
  if domain not in DOMAINS:
    raise ValueError(f'unknown synthetic domain {domain!r}; use one of '
                     f'{DOMAINS}')
  if height < 8 or width < 8:
    raise ValueError(f'image size {height}x{width} too small; use >= 8x8')
  if num_images < 0 or seed < 0:
    raise ValueError('num_images and seed must be non-negative, got '
                     f'{num_images} and {seed}')


def _rendered_layouts(domain, num_images, height, width, seed):
  """Yields ``(idx, _render_layout(...))`` per chunk of images, validated.

  Separate layout and appearance streams per image: the layout draws
  (stream 0) do not depend on the domain's appearance draws (stream 1), so
  both domains share the layout distribution exactly, and depth (derived
  from the layout) needs no draws of its own.
  """
  # Checked now, not at the first iteration (the chunks are lazy).
  _check_generate_args(domain, num_images, height, width, seed)
  chunk = max(1, _CHUNK_PIXELS // (height * width))
  salt = _DOMAIN_SALT[domain]

  def chunks():
    for start in range(0, num_images, chunk):
      idx = range(start, min(start + chunk, num_images))
      lay = _stack([_sample_layout(np.random.default_rng([seed, salt, i, 0]))
                    for i in idx])
      yield idx, _render_layout(lay, height, width)

  return chunks()


def generate(domain, num_images, *, height=64, width=128, seed=0):
  """Generates labelled scenes of one domain.

  Args:
    domain: 'source' (flat rendered look) or 'target' (textured camera look).
    num_images: number of images N >= 0.
    height: image height H in pixels (>= 8).
    width: image width W in pixels (>= 8).
    seed: non-negative int. Image i depends only on (seed, domain, i, H, W).

  Returns:
    images: uint8 (N, H, W, 3) RGB.
    labels: uint8 (N, H, W) class ids in [0, NUM_CLASSES).
  """
  layouts = _rendered_layouts(domain, num_images, height, width, seed)
  images = np.zeros((num_images, height, width, 3), np.uint8)
  labels = np.zeros((num_images, height, width), np.uint8)
  salt = _DOMAIN_SALT[domain]
  for idx, (lab, inst, part, geom) in layouts:
    look_rngs = [np.random.default_rng([seed, salt, i, 1]) for i in idx]
    if domain == 'source':
      img = _paint_source(lab, inst, _stack(
          [_sample_source_look(r, height, width) for r in look_rngs]))
    else:
      img = _paint_target(lab, inst, part, geom, _stack(
          [_sample_target_look(r, height, width) for r in look_rngs]))
    images[idx.start:idx.stop] = img
    labels[idx.start:idx.stop] = lab
  return images, labels


# ----------------------------------------------------------------------------
# Per-pixel depth: a second dense task, pixel-aligned with the labels.
# ----------------------------------------------------------------------------

# Bump whenever the depth maps produced for a given set of arguments change.
DEPTH_VERSION = 1
# Depths beyond this many camera heights (the ground rows right under the
# horizon) are invalid, like the range limit of a depth sensor.
MAX_DEPTH = 40.0
# Value of invalid depth pixels: sky, skyline, far vegetation band, and
# anything beyond `MAX_DEPTH`.
INVALID_DEPTH = 0.0


def _layout_depth(geom, height):
  """Depth (camera heights) of rendered layouts; see `generate_depth`."""
  s = np.broadcast_to(geom['s'], geom['zbuf'].shape)
  zbuf = geom['zbuf']
  # Pinhole camera with focal length = image height in pixels: a ground
  # point s pixels below the horizon is height / s camera heights away, and
  # an upright object stands at the depth of its base.
  key = np.where(zbuf > 0, zbuf, s)
  depth = np.where(key > 0, height / np.maximum(key, 1e-6), INVALID_DEPTH)
  depth = np.where(depth > MAX_DEPTH, INVALID_DEPTH, depth)
  return depth.astype(np.float32)


def generate_depth(domain, num_images, *, height=64, width=128, seed=0):
  """Per-pixel depth of the scenes of `generate` with the same arguments.

  Derived from the layouts alone (the same layout random stream as
  `generate`, no extra draws), so depth map i is pixel-aligned with image
  and label map i and costs no painting. Depth is in camera heights with a
  focal length of `height` pixels: ground pixels ``height / s`` (s = pixels
  below the horizon), objects the depth of their base on the ground.

  Args:
    domain: 'source' or 'target'.
    num_images: number of images N >= 0.
    height: image height H in pixels (>= 8).
    width: image width W in pixels (>= 8).
    seed: non-negative int.

  Returns:
    float32 (N, H, W) depth; `INVALID_DEPTH` (0) marks sky, skyline, the far
    vegetation band and ground beyond `MAX_DEPTH`.
  """
  depth = np.zeros((num_images, height, width), np.float32)
  for idx, (_, _, _, geom) in _rendered_layouts(domain, num_images, height,
                                                width, seed):
    depth[idx.start:idx.stop] = _layout_depth(geom, height)
  return depth


def split_seed(seed, split):
  """Derives the generator seed of a split ('train' / 'val') from `seed`."""
  if split not in _SPLIT_SALT:
    raise ValueError(f'unknown split {split!r}; use one of {SPLITS}')
  return int(np.random.SeedSequence([seed, _SPLIT_SALT[split]])
             .generate_state(1)[0])


def cache_path(cache_dir, domain, split, *, num_images, height, width, seed):
  """Path of the .npz cache file for these arguments (see load_or_generate)."""
  name = (f'synthetic_v{GENERATOR_VERSION}_{domain}_{split}_n{num_images}_'
          f'{height}x{width}_seed{seed}.npz')
  return os.path.join(os.path.expanduser(cache_dir), name)


def load_or_generate(cache_dir, domain, split, *, num_images, height=64,
                     width=128, seed=0):
  """Returns a split of a domain, generating it once and caching it.

  The cache file name holds every argument and `GENERATOR_VERSION`; it is
  written to a temporary file and renamed, so concurrent or interrupted runs
  never leave a half-written file under the final name. An unreadable cache
  file is regenerated.

  Args:
    cache_dir: directory for the .npz file (created if missing).
    domain: 'source' or 'target'.
    split: 'train' or 'val'; the splits use different derived seeds.
    num_images: number of images N.
    height: image height H.
    width: image width W.
    seed: non-negative base seed.

  Returns:
    images: uint8 (N, H, W, 3).
    labels: uint8 (N, H, W).
  """
  path = cache_path(cache_dir, domain, split, num_images=num_images,
                    height=height, width=width, seed=seed)
  if os.path.exists(path):
    try:
      with np.load(path) as data:
        images, labels = data['images'], data['labels']
      if (images.shape == (num_images, height, width, 3) and
          labels.shape == (num_images, height, width)):
        return images, labels
    except (OSError, ValueError, KeyError, EOFError):
      pass  # Corrupt or foreign file: regenerate and overwrite it.
  images, labels = generate(domain, num_images, height=height, width=width,
                            seed=split_seed(seed, split))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, images=images, labels=labels,
               class_names=np.array(CLASS_NAMES))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return images, labels


def depth_cache_path(cache_dir, domain, split, *, num_images, height, width,
                     seed):
  """Path of the .npz depth cache file (see `load_or_generate_depth`)."""
  name = (f'synthetic_depth_v{DEPTH_VERSION}g{GENERATOR_VERSION}_{domain}_'
          f'{split}_n{num_images}_{height}x{width}_seed{seed}.npz')
  return os.path.join(os.path.expanduser(cache_dir), name)


def load_or_generate_depth(cache_dir, domain, split, *, num_images, height=64,
                           width=128, seed=0):
  """Depth maps of a split (`generate_depth`), generated once and cached.

  A separate cache file beside the images', written atomically like them;
  the image cache is never touched.

  Args:
    cache_dir: directory for the .npz file (created if missing).
    domain: 'source' or 'target'.
    split: 'train' or 'val'.
    num_images: number of images N.
    height: image height H.
    width: image width W.
    seed: non-negative base seed (the split seed is derived as for images).

  Returns:
    float32 (N, H, W) depth, 0 = invalid.
  """
  path = depth_cache_path(cache_dir, domain, split, num_images=num_images,
                          height=height, width=width, seed=seed)
  if os.path.exists(path):
    try:
      with np.load(path) as data:
        depth = data['depth']
      if depth.shape == (num_images, height, width):
        return depth
    except (OSError, ValueError, KeyError, EOFError):
      pass  # Corrupt or foreign file: regenerate and overwrite it.
  depth = generate_depth(domain, num_images, height=height, width=width,
                         seed=split_seed(seed, split))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, depth=depth)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return depth


def colorize(labels):
  """Maps class ids to `PALETTE` colours for viewing.

  Args:
    labels: integer (..., H, W) class ids; ids outside the palette (e.g. the
      ignore id 255) become black.

  Returns:
    uint8 (..., H, W, 3) RGB.
  """
  labels = np.asarray(labels)
  valid = (labels >= 0) & (labels < NUM_CLASSES)
  rgb = PALETTE[np.where(valid, labels, 0)]
  return np.where(valid[..., None], rgb, 0).astype(np.uint8)
