"""In-memory input pipeline: domain loading, normalisation and batching.

Data sets are small enough for host memory (uint8 arrays), so batching is
plain NumPy indexing. The real benchmarks (`jaxda.data.readers`) pass lazy
array views instead, which decode only the rows a batch indexes. Which code
reads a data set name is looked up in `jaxda.data.registry`. Training
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

import collections
import concurrent.futures
import queue
import threading

import numpy as np

from jaxda import types
from jaxda.data import errors
from jaxda.data import registry

DataError = errors.DataError  # Re-exported for callers of this module.
Domain = registry.Domain  # One split in memory (or lazy); see there.

NORMALIZE_MODES = ('unit', 'imagenet', 'caffe_bgr')
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, of images scaled to [0, 1].
IMAGENET_STD = (0.229, 0.224, 0.225)
# BGR mean of the Caffe-converted DeepLab weights (AdaptSegNet `IMG_MEAN`).
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)

_RESERVED_KEYS = ('image', 'label', 'index', 'flipped', 'mask')
_FLIP_SALT = 0x666C6970  # Keeps flip draws independent of permutations.


def load_domain(name, *, role=None, data_dir=None, split='train',
                height=None, width=None, num_images=None, seed=0,
                require_labels=True, resize_mismatched_labels=False,
                list_file=None):
  """Loads one split of a data set by its config name (`registry`).

  Args:
    name: a `registry` name: 'synthetic' (the embedded benchmark of
      `embedded.synthetic`), 'folder' (a directory in the `readers.folder`
      layout), a digits domain (`embedded.digits`), or a real data set in
      its distributed layout at `data_dir` ('gta5', 'cityscapes',
      'cityscapes16', 'synthia', 'office31:<domain>', 'officehome:<domain>',
      'usps', 'svhn', 'mnist' with the idx files), returned with lazy
      `readers.common.LazyArray` images / labels.
    role: 'source' or 'target'. Required for 'synthetic', where it picks the
      appearance (flat rendered vs. textured camera look); for 'folder' it is
      only named in error messages.
    data_dir: for 'folder' and real data sets, the data set root (required);
      for the embedded benchmarks, the cache directory (default
      `~/.cache/jaxda`).
    split: 'train' or 'val'.
    height: image height H; synthetic default 64, folder default native.
    width: image width W; synthetic default 128, folder default native.
    num_images: embedded benchmarks only: how many images to generate
      (synthetic default 1000 for train, 200 for val). A folder is always
      read whole (use `folder.read_folder(num_images=...)` directly for a
      prefix).
    seed: embedded generators' seed (ignored by files).
    require_labels: folder / real segmentation: fail if the split has no
      labels. The synthetic benchmark always has labels and always returns
      them; drop them yourself for unsupervised target training.
    resize_mismatched_labels: real segmentation data sets: resize a label
      whose size differs from its image instead of failing.
    list_file: real segmentation data sets: keep only the images this file
      names (one stem per line), in its order.

  Returns:
    Domain with images uint8 (N, H, W, 3), labels uint8 (N, H, W) (or (N,)
    for classification) or None, and class names.

  Raises:
    DataError: unknown name or role, or any data problem.
  """
  entry, domain = registry.lookup(name, data_dir)
  return entry.load_split(
      domain, role=role, data_dir=data_dir, split=split, height=height,
      width=width, num_images=num_images, seed=seed,
      require_labels=require_labels,
      resize_mismatched_labels=resize_mismatched_labels, list_file=list_file)


def real_dataset(name, data_dir=None):
  """True if `name` picks a reader of real files (`registry.lookup`)."""
  return registry.lookup(name, data_dir)[0].reads_files


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
  entry, _ = registry.lookup(name, data_dir)
  if entry.load_depth is None:
    raise errors.DataError(
        f'loader {name!r} has no depth maps; the anchor-task methods need a '
        'main dense task: use the embedded "synthetic" benchmark')
  return entry.load_depth(role=role, data_dir=data_dir, split=split,
                          height=height, width=width, num_images=num_images,
                          seed=seed)


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
                  flip=False, mode='unit', extras=None, workers=1):
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
    workers: threads building the batches of the next `workers` steps at
      once (decode, resize, normalise); 1 builds them one by one in the
      caller. The batches and their order do not depend on it. At batch 1
      per domain the decode thread pool of `readers.common` has one row to
      spread, so this is what lets several cores feed one step.

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

  if workers < 1:
    raise ValueError(f'workers must be >= 1, got {workers}')
  perms = {}
  perms_lock = threading.Lock()

  def permutation(e):
    with perms_lock:
      if e not in perms:
        for k in [k for k in perms if k < e - 1]:
          del perms[k]
        perms[e] = np.random.default_rng([seed, int(e)]).permutation(n)
      return perms[e]

  def make_batch(step):
    pos = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs = pos // n
    idx = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      idx[sel] = permutation(int(e))[pos[sel] % n]
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
    return batch

  def stream():
    step = start_step
    if workers == 1:
      while True:
        yield make_batch(step)
        step += 1
    yield from _ordered_map(make_batch, step, workers)

  return stream()


def _ordered_map(fn, start, workers):
  """fn(start), fn(start + 1), ... computed `workers` at a time, in order."""
  pool = concurrent.futures.ThreadPoolExecutor(
      workers, thread_name_prefix='jaxda-batches')
  try:
    pending = collections.deque(
        pool.submit(fn, start + i) for i in range(workers))
    step = start + workers
    while True:
      value = pending.popleft().result()
      pending.append(pool.submit(fn, step))
      step += 1
      yield value
  finally:
    pool.shutdown(wait=False, cancel_futures=True)


def prefetch(iterator, size=2):
  """Yields `iterator`'s items, produced up to `size` ahead by a thread.

  The training loop's step is dispatched asynchronously, so while the
  device runs step s this thread already builds the host batch of step
  s + 1: the device waits on input only if one batch takes longer to build
  than one step takes to run. Items come in the iterator's order; an
  exception raised by the iterator is raised here at the item where it
  occurred. Closing the generator stops the thread (after the item it is
  building).

  Args:
    iterator: any iterator (e.g. `train_batches`, or the loop's paired one).
    size: how many items may wait, built, for the consumer (>= 1).
  """
  if size < 1:
    raise ValueError(f'prefetch size must be >= 1, got {size}')
  items = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def put(item):
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for item in iterator:
        if not put((item, None)):
          return
      put((done, None))
    except BaseException as e:  # pylint: disable=broad-except
      put((done, e))

  thread = threading.Thread(target=produce, name='jaxda-prefetch',
                            daemon=True)
  thread.start()
  try:
    while True:
      item, error = items.get()
      if item is done:
        if error is not None:
          raise error
        return
      yield item
  finally:
    stop.set()


def eval_batches(images, labels=None, *, batch_size, mode='unit'):
  """Finite, in-order batches covering every image exactly once.

  The last batch is padded to `batch_size` so every batch has one shape (one
  compilation); padded rows have 'mask' False, 'index' -1, a zero image and
  label `types.IGNORE_LABEL`, so they drop out of masked or ignore-aware
  metrics.

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
              (pad,) + label.shape[1:], types.IGNORE_LABEL, np.int32)])
        batch['label'] = label
      batch['index'] = index
      batch['mask'] = mask
      yield batch

  return stream()


def _as_array(values):
  """`np.asarray`, except for the lazy views of `readers.common`.

  A `LazyArray` decodes only the rows a batch indexes, so the data
  set never has to fit in memory.
  """
  if getattr(values, 'is_lazy_source', False):
    return values
  return np.asarray(values)

