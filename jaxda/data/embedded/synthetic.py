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

The target has named variants, ``shift=`` one of `SHIFTS` (`shifts`):
'default' (the target above, bit-identical to before shifts existed),
'texture' (another palette and textures), 'weather' (fog, overcast),
'sensor' (blur, noise, JPEG-like compression) and 'layout' (camera height
and pitch, class frequencies). `DEVELOPMENT_SHIFT` ('weather') is the one
defaults may be tuned on.

Every image depends only on (seed, domain, shift, index, height, width) and
`GENERATOR_VERSION` (and `shifts.SHIFT_VERSION` for a non-default shift):
``generate(..., num_images=10)`` returns the first ten images of
``generate(..., num_images=1000)``.

This module is the benchmark's public face (generation, depth, caches);
`scenes` draws and rasterises the layouts, `looks` paints the two domains,
`shifts` the named target shifts.
"""

import os
import tempfile

import numpy as np

from jaxda.data.embedded import looks
from jaxda.data.embedded import scenes
from jaxda.data.embedded import shifts
# The class list, ids and palette live with the layout; re-exported here, the
# benchmark's public module.
# pylint: disable-next=unused-import,g-importing-member
from jaxda.data.embedded.scenes import (
    BUILDING, CAR, CLASS_NAMES, NUM_CLASSES, PALETTE, PERSON, POLE, ROAD,
    SIDEWALK, SKY, TERRAIN, TRAFFIC_SIGN, VEGETATION)

# Bump whenever the pixels produced for a given set of arguments change, so
# that stale cache files are not reused.
GENERATOR_VERSION = 2

DOMAINS = ('source', 'target')
# Named target domains (`shifts`); the source has one look.
SHIFTS = shifts.SHIFTS
DEFAULT_SHIFT = shifts.DEFAULT_SHIFT
DEVELOPMENT_SHIFT = shifts.DEVELOPMENT_SHIFT
SPLITS = ('train', 'val')
# Distinct salts keep the streams of the two domains independent.
_DOMAIN_SALT = {'source': 0x5EED50, 'target': 0x5EED7A}
_SPLIT_SALT = {'train': 0x77A1, 'val': 0x0FA1}
# Pixels rendered at once; bounds memory at any resolution.
_CHUNK_PIXELS = 1 << 18


def _check_generate_args(domain, num_images, height, width, seed, shift):
  if domain not in DOMAINS:
    raise ValueError(f'unknown synthetic domain {domain!r}; use one of '
                     f'{DOMAINS}')
  shifts.check_shift(shift)
  if domain != 'target' and shift != DEFAULT_SHIFT:
    raise ValueError(f'shift {shift!r} is a target domain; the source has '
                     f'only shift {DEFAULT_SHIFT!r}')
  if height < 8 or width < 8:
    raise ValueError(f'image size {height}x{width} too small; use >= 8x8')
  if num_images < 0 or seed < 0:
    raise ValueError('num_images and seed must be non-negative, got '
                     f'{num_images} and {seed}')


def _rendered_layouts(domain, num_images, height, width, seed,
                      shift=DEFAULT_SHIFT):
  """Yields ``(idx, scenes.render_layout(...))`` per chunk of images, validated.

  Separate layout and appearance streams per image: the layout draws
  (stream 0) do not depend on the domain's appearance draws (stream 1), so
  both domains share the layout distribution exactly, and depth (derived
  from the layout) needs no draws of its own. The 'layout' shift changes
  each default layout with draws of its own stream (`shifts.shift_rng`).
  """
  # Checked now, not at the first iteration (the chunks are lazy).
  _check_generate_args(domain, num_images, height, width, seed, shift)
  chunk = max(1, _CHUNK_PIXELS // (height * width))
  salt = _DOMAIN_SALT[domain]

  def layout(i):
    lay = scenes.sample_layout(np.random.default_rng([seed, salt, i, 0]))
    if shift == 'layout':
      lay = shifts.shift_layout(lay, shifts.shift_rng(shift, seed, salt, i))
    return lay

  def chunks():
    for start in range(0, num_images, chunk):
      idx = range(start, min(start + chunk, num_images))
      lay = scenes.stack_draws([layout(i) for i in idx])
      yield idx, scenes.render_layout(lay, height, width)

  return chunks()


def generate(domain, num_images, *, height=64, width=128, seed=0,
             shift=DEFAULT_SHIFT):
  """Generates labelled scenes of one domain.

  Args:
    domain: 'source' (flat rendered look) or 'target' (textured camera look).
    num_images: number of images N >= 0.
    height: image height H in pixels (>= 8).
    width: image width W in pixels (>= 8).
    seed: non-negative int. Image i depends only on (seed, domain, shift, i,
      H, W).
    shift: the target's variant, one of `SHIFTS` (`shifts`); the source
      takes only 'default'.

  Returns:
    images: uint8 (N, H, W, 3) RGB.
    labels: uint8 (N, H, W) class ids in [0, NUM_CLASSES).
  """
  layouts = _rendered_layouts(domain, num_images, height, width, seed, shift)
  images = np.zeros((num_images, height, width, 3), np.uint8)
  labels = np.zeros((num_images, height, width), np.uint8)
  salt = _DOMAIN_SALT[domain]
  for idx, (lab, inst, part, geom) in layouts:
    look_rngs = [np.random.default_rng([seed, salt, i, 1]) for i in idx]
    if domain == 'source':
      img = looks.paint_source(lab, inst, scenes.stack_draws(
          [looks.sample_source_look(r, height, width) for r in look_rngs]))
    elif shift == DEFAULT_SHIFT:
      img = looks.paint_target(lab, inst, part, geom, scenes.stack_draws(
          [looks.sample_target_look(r, height, width) for r in look_rngs]))
    else:
      img = shifts.paint(shift, lab, inst, part, geom, look_rngs,
                         [shifts.shift_rng(shift, seed, salt, i)
                          for i in idx])
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


def generate_depth(domain, num_images, *, height=64, width=128, seed=0,
                   shift=DEFAULT_SHIFT):
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
    shift: as for `generate` (only 'layout' changes the geometry).

  Returns:
    float32 (N, H, W) depth; `INVALID_DEPTH` (0) marks sky, skyline, the far
    vegetation band and ground beyond `MAX_DEPTH`.
  """
  depth = np.zeros((num_images, height, width), np.float32)
  for idx, (_, _, _, geom) in _rendered_layouts(domain, num_images, height,
                                                width, seed, shift):
    depth[idx.start:idx.stop] = _layout_depth(geom, height)
  return depth


def split_seed(seed, split):
  """Derives the generator seed of a split ('train' / 'val') from `seed`."""
  if split not in _SPLIT_SALT:
    raise ValueError(f'unknown split {split!r}; use one of {SPLITS}')
  return int(np.random.SeedSequence([seed, _SPLIT_SALT[split]])
             .generate_state(1)[0])


def _domain_key(domain, shift):
  """The domain part of a cache file name: 'target' for the default shift
  (the file names from before shifts existed), else 'target-<shift>-s<v>'
  with `shifts.SHIFT_VERSION`, so no two shifts share a file."""
  if shift == DEFAULT_SHIFT:
    return domain
  shifts.check_shift(shift)
  return f'{domain}-{shift}-s{shifts.SHIFT_VERSION}'


def cache_path(cache_dir, domain, split, *, num_images, height, width, seed,
               shift=DEFAULT_SHIFT):
  """Path of the .npz cache file for these arguments (see load_or_generate)."""
  name = (f'synthetic_v{GENERATOR_VERSION}_{_domain_key(domain, shift)}_'
          f'{split}_n{num_images}_{height}x{width}_seed{seed}.npz')
  return os.path.join(os.path.expanduser(cache_dir), name)


def load_or_generate(cache_dir, domain, split, *, num_images, height=64,
                     width=128, seed=0, shift=DEFAULT_SHIFT):
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
    shift: the target's variant (`generate`); part of the cache file name.

  Returns:
    images: uint8 (N, H, W, 3).
    labels: uint8 (N, H, W).
  """
  path = cache_path(cache_dir, domain, split, num_images=num_images,
                    height=height, width=width, seed=seed, shift=shift)
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
                            seed=split_seed(seed, split), shift=shift)
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
                     seed, shift=DEFAULT_SHIFT):
  """Path of the .npz depth cache file (see `load_or_generate_depth`)."""
  name = (f'synthetic_depth_v{DEPTH_VERSION}g{GENERATOR_VERSION}_'
          f'{_domain_key(domain, shift)}_{split}_n{num_images}_'
          f'{height}x{width}_seed{seed}.npz')
  return os.path.join(os.path.expanduser(cache_dir), name)


def load_or_generate_depth(cache_dir, domain, split, *, num_images, height=64,
                           width=128, seed=0, shift=DEFAULT_SHIFT):
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
    shift: as for `load_or_generate`.

  Returns:
    float32 (N, H, W) depth, 0 = invalid.
  """
  path = depth_cache_path(cache_dir, domain, split, num_images=num_images,
                          height=height, width=width, seed=seed, shift=shift)
  if os.path.exists(path):
    try:
      with np.load(path) as data:
        depth = data['depth']
      if depth.shape == (num_images, height, width):
        return depth
    except (OSError, ValueError, KeyError, EOFError):
      pass  # Corrupt or foreign file: regenerate and overwrite it.
  depth = generate_depth(domain, num_images, height=height, width=width,
                         seed=split_seed(seed, split), shift=shift)
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


# ----------------------------------------------------------------------------
# Per-pixel surface normals: the anchor-task paper's main task (§11).
# ----------------------------------------------------------------------------

# Camera coordinates of the normals: x right, y down, z forward (into the
# scene); unit vectors pointing towards the camera side of the surface.
NORMAL_UP = (0.0, -1.0, 0.0)      # the ground plane
NORMAL_FACING = (0.0, 0.0, -1.0)  # upright objects (fronts face the camera)


def generate_normals(domain, num_images, *, height=64, width=128, seed=0,
                     shift=DEFAULT_SHIFT):
  """Per-pixel unit surface normals of the scenes of `generate`.

  From the layouts' geometry (no extra draws, pixel-aligned like
  `generate_depth`): an object pixel (z-buffer hit) lies on an upright
  plane facing the camera, every other pixel with valid depth on the ground
  plane. Pixels without depth (sky, skyline, beyond `MAX_DEPTH`) get the
  zero vector (invalid). This is also what back-projecting the depth map
  with the pinhole camera of `generate_depth` gives: ground points keep a
  constant camera height, object points a constant depth.

  Returns:
    float32 (N, H, W, 3) normals (x right, y down, z forward), unit length
    where valid, 0 where invalid.
  """
  normals = np.zeros((num_images, height, width, 3), np.float32)
  up, facing = np.float32(NORMAL_UP), np.float32(NORMAL_FACING)
  for idx, (_, _, _, geom) in _rendered_layouts(domain, num_images, height,
                                                width, seed, shift):
    valid = _layout_depth(geom, height) > 0
    obj = (geom['zbuf'] > 0)[..., None]
    n = np.where(obj, facing, up)
    normals[idx.start:idx.stop] = np.where(valid[..., None], n, 0.0)
  return normals
