"""In-memory input pipeline: domain loading, normalisation and batching.

Data sets are small enough for host memory (uint8 arrays), so batching is
plain NumPy indexing. The real benchmarks (`jaxda.data.sources`) pass lazy
array views instead, which decode only the rows a batch indexes. Training
order is a pure function of (seed, step):

* epoch e visits the images in `np.random.default_rng([seed, e])
  .permutation(N)` order;
* step s takes items [s * B, (s + 1) * B) of the concatenation of all epochs
  (a batch may straddle two epochs; no image is dropped or repeated within
  an epoch);
* the optional horizontal flip of step s is drawn from a generator keyed by
  (seed, step).

Resuming at step k with `start_step=k` therefore yields exactly the batches
an uninterrupted run would have seen, with no data-loader state to save.
"""

import dataclasses
import os

import numpy as np

from jaxda.data.embedded import digits
from jaxda.data import errors
from jaxda.data.readers import folder
from jaxda.data.embedded import synthetic

DataError = errors.DataError  # Re-exported for callers of this module.
DOMAIN_NAMES = ('synthetic', 'folder') + digits.DOMAINS
# Readers of the distributed layouts (jaxda.data.sources); data_dir required.
REAL_DATASET_NAMES = ('gta5', 'cityscapes', 'cityscapes16', 'synthia',
                      'office31:<domain>', 'officehome:<domain>',
                      'mnist (idx files in data_dir)', 'usps', 'svhn')
DEFAULT_CACHE_DIR = os.path.join('~', '.cache', 'jaxda')
# Synthetic defaults when height / width / num_images are not given.
SYNTHETIC_SIZE = (64, 128)
SYNTHETIC_NUM_IMAGES = {'train': 1000, 'val': 200}

NORMALIZE_MODES = ('unit', 'imagenet', 'caffe_bgr')
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, of images scaled to [0, 1].
IMAGENET_STD = (0.229, 0.224, 0.225)
# BGR mean of the Caffe-converted DeepLab weights (AdaptSegNet `IMG_MEAN`).
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)

_RESERVED_KEYS = ('image', 'label', 'index', 'flipped', 'mask')
_FLIP_SALT = 0x666C6970  # Keeps flip draws independent of permutations.


@dataclasses.dataclass(frozen=True)
class Domain:
  """One split of one domain, in memory.

  Attributes:
    images: uint8 (N, H, W, 3) RGB.
    labels: uint8 (N, H, W) class ids (255 = ignore), or None; for the
      classification domains (`digits.DOMAINS`) uint8 (N,) image labels.
    class_names: tuple of C class names.
  """
  images: np.ndarray
  labels: np.ndarray | None
  class_names: tuple[str, ...]


def load_domain(name, *, role=None, data_dir=None, split='train',
                height=None, width=None, num_images=None, seed=0,
                require_labels=True, resize_mismatched_labels=False):
  """Loads one split of a domain by loader name.

  Args:
    name: 'synthetic' (the embedded benchmark of `jaxda.data.synthetic`),
      'folder' (a directory in the `jaxda.data.folder` layout), a digits
      domain (`jaxda.data.digits`), or a real data set in its distributed
      layout at `data_dir` ('gta5', 'cityscapes', 'cityscapes16',
      'synthia', 'office31:<domain>', 'officehome:<domain>', 'usps',
      'svhn', 'mnist' with the idx files; `jaxda.data.sources`), returned
      with lazy `sources.LazyArray` images / labels.
    role: 'source' or 'target'. Required for 'synthetic', where it picks the
      appearance (flat rendered vs. textured camera look); for 'folder' it is
      only named in error messages.
    data_dir: for 'folder', the data set root (required); for 'synthetic',
      the cache directory (default `~/.cache/jaxda`).
    split: 'train' or 'val'.
    height: image height H; synthetic default 64, folder default native.
    width: image width W; synthetic default 128, folder default native.
    num_images: synthetic only: how many images to generate (default 1000
      for train, 200 for val). A folder is always read whole (use
      `folder.read_folder(num_images=...)` directly for a prefix).
    seed: synthetic generator seed (ignored by 'folder').
    require_labels: folder: fail if the split has no labels/ folder. The
      synthetic benchmark always has labels and always returns them; drop
      them yourself for unsupervised target training.
    resize_mismatched_labels: real segmentation data sets: resize a label
      whose size differs from its image instead of failing.

  Returns:
    Domain with images uint8 (N, H, W, 3), labels uint8 (N, H, W) or None
    and class names.

  Raises:
    DataError: unknown name or role, or any data problem.
  """
  if name == 'synthetic':
    if role not in synthetic.DOMAINS:
      raise errors.DataError(
          f'loader "synthetic" needs role= one of {synthetic.DOMAINS}, got '
          f'{role!r}')
    if split not in synthetic.SPLITS:
      raise errors.DataError(f'synthetic split {split!r} does not exist: use '
                             f'one of {synthetic.SPLITS}')
    height = SYNTHETIC_SIZE[0] if height is None else height
    width = SYNTHETIC_SIZE[1] if width is None else width
    if num_images is None:
      num_images = SYNTHETIC_NUM_IMAGES[split]
    cache_dir = DEFAULT_CACHE_DIR if data_dir is None else data_dir
    images, labels = synthetic.load_or_generate(
        cache_dir, role, split, num_images=num_images, height=height,
        width=width, seed=seed)
    return Domain(images, labels, synthetic.CLASS_NAMES)
  if real_dataset(name, data_dir):
    # Real benchmarks in their distributed layouts (jaxda.data.sources),
    # read lazily; num_images and seed do not apply.
    from jaxda.data.readers import common as sources  # pylint: disable=g-import-not-at-top
    return sources.load_domain(
        'mnist_files' if name == 'mnist' else name, data_dir=data_dir,
        split=split, height=height, width=width,
        require_labels=require_labels,
        resize_mismatched_labels=resize_mismatched_labels)
  if name in digits.DOMAINS:
    # Classification: (N,) labels; images at (height, width), 28x28 default.
    cache_dir = DEFAULT_CACHE_DIR if data_dir is None else data_dir
    images, labels = digits.load_or_generate(
        cache_dir, name, split, height=height or digits.CANONICAL_SIZE,
        width=width or digits.CANONICAL_SIZE, seed=seed,
        num_images=num_images)
    return Domain(images, labels, digits.CLASS_NAMES)
  if name == 'folder':
    if data_dir is None:
      who = f'the {role} domain' if role else 'loader "folder"'
      raise errors.DataError(f'{who} needs data_dir= the folder data set '
                             'root (holding classes.txt)')
    data = folder.read_folder(data_dir, split, require_labels=require_labels,
                              height=height, width=width)
    return Domain(data.images, data.labels, data.class_names)
  raise errors.DataError(f'unknown domain loader {name!r}: use one of '
                         f'{DOMAIN_NAMES}, or a real data set: '
                         f'{REAL_DATASET_NAMES}')


def real_dataset(name, data_dir=None):
  """True if `name` picks a reader of `jaxda.data.sources` (real files).

  'mnist' means the MNIST idx files when `data_dir` holds them, else the
  embedded 5,000-image subset.
  """
  from jaxda.data.readers import digit_files  # pylint: disable=g-import-not-at-top
  from jaxda.data.readers import common as sources  # pylint: disable=g-import-not-at-top
  if name == 'mnist':
    return digit_files.has_mnist_files(data_dir)
  return sources.is_source_name(name)


def load_depth(name, *, role=None, data_dir=None, split='train', height=None,
               width=None, num_images=None, seed=0):
  """Per-pixel depth of a domain split, aligned with `load_domain`'s images.

  The second dense task of the embedded benchmark (anchor-task methods):
  same arguments as `load_domain`, and row i is the depth of image i.

  Returns:
    float32 (N, H, W) depth in camera heights, 0 = invalid (sky, beyond
    range).

  Raises:
    DataError: the loader has no depth (only 'synthetic' has).
  """
  if name != 'synthetic':
    raise errors.DataError(
        f'loader {name!r} has no depth maps; the anchor-task methods need a '
        'main dense task: use the embedded "synthetic" benchmark')
  if role not in synthetic.DOMAINS or split not in synthetic.SPLITS:
    raise errors.DataError(
        f'synthetic depth needs role in {synthetic.DOMAINS} and split in '
        f'{synthetic.SPLITS}, got {role!r}, {split!r}')
  height = SYNTHETIC_SIZE[0] if height is None else height
  width = SYNTHETIC_SIZE[1] if width is None else width
  if num_images is None:
    num_images = SYNTHETIC_NUM_IMAGES[split]
  cache_dir = DEFAULT_CACHE_DIR if data_dir is None else data_dir
  return synthetic.load_or_generate_depth(
      cache_dir, role, split, num_images=num_images, height=height,
      width=width, seed=seed)


def normalize(images, mode='unit'):
  """Converts uint8 RGB images to the float input a model expects.

  Args:
    images: uint8 (..., H, W, 3) RGB.
    mode: 'unit': x / 127.5 - 1, in [-1, 1]. 'imagenet': (x / 255 - mean) /
      std with the ImageNet RGB statistics. 'caffe_bgr': channels reversed
      to BGR, minus `CAFFE_BGR_MEAN`, unscaled (what Caffe-converted
      DeepLab weights expect).

  Returns:
    float32 (..., H, W, 3).
  """
  x = np.asarray(images, dtype=np.float32)
  if mode == 'unit':
    return x / np.float32(127.5) - np.float32(1.0)
  if mode == 'imagenet':
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    return (x / np.float32(255.0) - mean) / std
  if mode == 'caffe_bgr':
    return x[..., ::-1] - np.asarray(CAFFE_BGR_MEAN, np.float32)
  raise ValueError(f'unknown normalize mode {mode!r}; use one of '
                   f'{NORMALIZE_MODES}')


def _check_arrays(images, labels, extras):
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be (N, H, W, 3), got {images.shape}')
  if len(images) == 0:
    raise ValueError('no images to batch')
  # (N, H, W) label maps (segmentation) or (N,) image labels
  # (classification).
  if labels is not None and labels.shape not in (images.shape[:3],
                                                 images.shape[:1]):
    raise ValueError(f'labels shape {labels.shape} does not match images '
                     f'{images.shape[:3]} (or {images.shape[:1]})')
  for key, value in (extras or {}).items():
    if key in _RESERVED_KEYS:
      raise ValueError(f'extras key {key!r} is reserved ({_RESERVED_KEYS})')
    if len(value) != len(images):
      raise ValueError(f'extras[{key!r}] has {len(value)} rows for '
                       f'{len(images)} images')


def train_batches(images, labels=None, *, batch_size, seed, start_step=0,
                  flip=False, mode='unit', extras=None):
  """Infinite, seeded, resumable stream of training batches.

  See the module docstring for the order. Batch `s` depends only on (seed,
  s), so `train_batches(..., start_step=k)` yields batch k, k + 1, ... of a
  fresh stream.

  Args:
    images: uint8 (N, H, W, 3).
    labels: uint8 (N, H, W) class ids, (N,) image labels, or None
      (unlabelled target data).
    batch_size: B; may exceed N (a batch then spans several epochs).
    seed: non-negative int.
    start_step: first step to yield.
    flip: randomly mirror each example horizontally with probability 1/2;
      labels and spatial extras are mirrored with it.
    mode: normalisation mode, see `normalize`.
    extras: optional dict of per-example arrays (N, ...) batched alongside,
      e.g. pseudo-labels or weights; an array whose shape[1:3] equals (H, W)
      is treated as spatial and mirrored by `flip`. dtypes are kept.

  Yields:
    dict with 'image' float32 (B, H, W, 3), 'label' int32 (B, H, W) if
    labels were given, 'index' int32 (B,) rows of `images`, 'flipped' bool
    (B,) if `flip`, and one (B, ...) entry per extra.
  """
  images = _as_array(images)
  labels = None if labels is None else _as_array(labels)
  extras = {k: np.asarray(v) for k, v in (extras or {}).items()}
  _check_arrays(images, labels, extras)
  if batch_size < 1 or seed < 0 or start_step < 0:
    raise ValueError('need batch_size >= 1, seed >= 0, start_step >= 0; got '
                     f'{batch_size}, {seed}, {start_step}')
  # Fail on a bad mode now, not at the first next().
  normalize(images[:1], mode)
  n = len(images)
  spatial = {k for k, v in extras.items()
             if v.ndim >= 3 and v.shape[1:3] == images.shape[1:3]}

  def stream():
    perms = {}
    step = start_step
    while True:
      pos = step * batch_size + np.arange(batch_size, dtype=np.int64)
      epochs = pos // n
      idx = np.empty(batch_size, np.int64)
      for e in np.unique(epochs):
        if e not in perms:
          perms = {k: v for k, v in perms.items() if k >= e - 1}
          perms[e] = np.random.default_rng([seed, int(e)]).permutation(n)
        sel = epochs == e
        idx[sel] = perms[e][pos[sel] % n]
      image = images[idx]
      label = None if labels is None else labels[idx]
      extra = {k: v[idx] for k, v in extras.items()}
      batch = {}
      if flip:
        flipped = np.random.default_rng(
            [seed, _FLIP_SALT, step]).random(batch_size) < 0.5
        image[flipped] = image[flipped, :, ::-1]
        if label is not None and label.ndim == 3:
          label[flipped] = label[flipped, :, ::-1]
        for k in spatial:
          extra[k][flipped] = extra[k][flipped, :, ::-1]
        batch['flipped'] = flipped
      batch['image'] = normalize(image, mode)
      if label is not None:
        batch['label'] = label.astype(np.int32)
      batch['index'] = idx.astype(np.int32)
      batch.update(extra)
      yield batch
      step += 1

  return stream()


def eval_batches(images, labels=None, *, batch_size, mode='unit'):
  """Finite, in-order batches covering every image exactly once.

  The last batch is padded to `batch_size` so every batch has one shape (one
  compilation); padded rows have 'mask' False, 'index' -1, a zero image and
  label 255 (ignore), so they drop out of masked or ignore-aware metrics.

  Args:
    images: uint8 (N, H, W, 3).
    labels: uint8 (N, H, W), or None.
    batch_size: B.
    mode: normalisation mode, see `normalize`.

  Yields:
    ceil(N / B) dicts with 'image' float32 (B, H, W, 3), 'label' int32
    (B, H, W) if labels were given, 'index' int32 (B,) and 'mask' bool (B,).
  """
  images = _as_array(images)
  labels = None if labels is None else _as_array(labels)
  _check_arrays(images, labels, None)
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  normalize(images[:1], mode)
  n = len(images)

  def stream():
    for start in range(0, n, batch_size):
      stop = min(start + batch_size, n)
      pad = batch_size - (stop - start)
      image = images[start:stop]
      index = np.arange(start, stop, dtype=np.int32)
      mask = np.ones(stop - start, bool)
      if pad:
        image = np.concatenate(
            [image, np.zeros((pad,) + image.shape[1:], image.dtype)])
        index = np.concatenate([index, np.full(pad, -1, np.int32)])
        mask = np.concatenate([mask, np.zeros(pad, bool)])
      batch = {'image': normalize(image, mode)}
      if labels is not None:
        label = labels[start:stop].astype(np.int32)
        if pad:
          label = np.concatenate([label, np.full(
              (pad,) + label.shape[1:], folder.IGNORE_LABEL, np.int32)])
        batch['label'] = label
      batch['index'] = index
      batch['mask'] = mask
      yield batch

  return stream()


def _as_array(values):
  """`np.asarray`, except for the lazy views of `jaxda.data.sources`.

  A `sources.LazyArray` decodes only the rows a batch indexes, so the data
  set never has to fit in memory.
  """
  if getattr(values, 'is_lazy_source', False):
    return values
  return np.asarray(values)


def shard_for_process(n, process_index, process_count):
  """The contiguous slice of `n` examples owned by one host process.

  Shards differ in size by at most one and together cover range(n) once,
  like `tfds.even_splits`.

  Args:
    n: number of examples.
    process_index: this process, in [0, process_count).
    process_count: number of processes.

  Returns:
    slice(start, stop).
  """
  if process_count < 1 or not 0 <= process_index < process_count or n < 0:
    raise ValueError(f'bad shard request: n={n}, process_index='
                     f'{process_index}, process_count={process_count}')
  return slice(n * process_index // process_count,
               n * (process_index + 1) // process_count)
