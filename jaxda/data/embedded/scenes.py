"""Scene layout and rasterisation of the embedded synthetic benchmark.

One layout generator serves both domains (`synthetic`): a horizon, a road in
perspective with sidewalks, a skyline of buildings, roadside trees, poles
with traffic signs, cars on the road and people on the sidewalks. Geometry
follows a pinhole camera above a flat ground plane, so an object whose base
is `s` pixels below the horizon is drawn `s * (object height / camera
height)` pixels tall. This module draws layouts and turns them into label,
instance and part maps; `looks` paints them.
"""

import numpy as np

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
NUM_INST = _INST_PERSON0 + _NUM_PEOPLE
# Object parts that the target domain paints differently (labels unchanged).
_PART_NONE, _PART_WINDOW, _PART_WHEEL, _PART_HEAD, _PART_TRUNK = range(5)


def sample_layout(rng):
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

def stack_draws(dicts):
  """Stacks per-image dicts; floats become float32 (speed; ample precision)."""
  out = {}
  for k in dicts[0]:
    v = np.stack([d[k] for d in dicts])
    out[k] = v.astype(np.float32) if v.dtype == np.float64 else v
  return out


def column(a):
  """(B,) -> (B, 1, 1) for broadcasting against (B, H, W)."""
  return np.asarray(a)[:, None, None]

def render_layout(lay, height, width):
  """Rasterises a batch of layouts.

  Args:
    lay: stacked output of `sample_layout`, leading dimension B.
    height: image height H.
    width: image width W.

  Returns:
    labels: uint8 (B, H, W) class ids.
    inst: int32 (B, H, W) instance ids in [0, NUM_INST).
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
  hz = column(lay['horizon'] * height)
  vx = column(lay['vanish_x'] * width)
  road_c = column(lay['road_c'])
  road_r = column(lay['road_r'])
  walk_l, walk_r = column(lay['walk'][:, 0]), column(lay['walk'][:, 1])

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
  band_h, band_f, band_p = (column(lay['band'][:, i]) for i in range(3))
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
    fill_cls = column(lay['fill'][:, side])
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
    on = column(lay[name + '_on'][:, j])
    return (column(lay['horizon'] * height + sb), column(sb), column(sign),
            column(walk), on, column(lay[name + '_u'][:, j]),
            column(lay[name + '_size'][:, j]))

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
    round_ = column(lay['sign_round'][:, j])
    sign_mask = np.where(round_, dxs**2 + dys**2 < r**2,
                         (np.abs(dxs) < r) & (np.abs(dys) < 0.8 * r))
    # A hair nearer than its pole so the sign is drawn over it.
    draw(on & column(lay['sign_on'][:, j]) & sign_mask, sb + 1e-3,
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
