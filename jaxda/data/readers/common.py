"""Shared helpers of the file readers: listing, decoding, lazy array views.

A *source* is the `grain` / `tfds.data_source` contract: `len(source)` and
`source[i]` -> dict(image uint8 (H, W, 3), label uint8 (H, W) or int, id
str), reading one example from disk per call, so nothing holds the whole data
set in memory. The readers (`cityscapes`, `gta5`, `synthia`, `office`,
`digit_files`) list and pair the files when they are opened (a missing
folder fails there, naming the path and the expected layout) and validate
each example when it is read (undecodable image, label size or label values
outside the id table -> `DataError` naming the file); `jaxda.data.registry`
maps config names to them.

`source_domain` wraps a source as a `Domain` whose `images` / `labels` are
`LazyArray` views: they have `shape`, `len`, slicing (lazy) and
integer-array indexing (decodes those rows, resized to the training size, on
a thread pool), so `pipeline.train_batches` / `eval_batches` iterate them
without loading the data set. Digit files are small and are returned as
in-memory arrays, like the embedded benchmarks.

`labels.native` is the same rows at the label files' own resolution: the
full-resolution evaluation (`jaxda.tasks.full_resolution`) batches those.

This module imports no reader and no pipeline: the readers build on it.
"""

import concurrent.futures
import dataclasses
import logging
import os

import numpy as np
from PIL import Image

from jaxda.data import errors

_DECODE_THREADS = min(8, os.cpu_count() or 1)
_POOL = None


@dataclasses.dataclass(frozen=True)
class Domain:
  """One split of one domain (what `pipeline.load_domain` returns).

  Attributes:
    images: uint8 (N, H, W, 3) RGB (an array or a `LazyArray`).
    labels: uint8 (N, H, W) class ids (`jaxda.types.IGNORE_LABEL` =
      ignore), or None; for classification data sets uint8 (N,) image
      labels.
    class_names: tuple of C class names.
  """
  images: np.ndarray
  labels: np.ndarray | None
  class_names: tuple[str, ...]


# --------------------------------------------------------------------------
# Shared reading and validation helpers
# --------------------------------------------------------------------------


def require_dir(path, dataset, layout):
  """Raises DataError naming `path` and the expected layout if it is absent.

  Args:
    path: directory that must exist.
    dataset: data set name for the message.
    layout: one-line description of the expected layout.
  """
  if not os.path.isdir(path):
    raise errors.DataError(
        f'{dataset}: directory {path} does not exist; expected layout: '
        f'{layout}')


def list_files(directory, suffix, dataset, layout):
  """Sorted file names in `directory` ending in `suffix` (non-empty)."""
  names = sorted(n for n in os.listdir(directory)
                 if n.endswith(suffix)
                 and os.path.isfile(os.path.join(directory, n)))
  if not names:
    raise errors.DataError(
        f'{dataset}: no *{suffix} files in {directory}; expected layout: '
        f'{layout}')
  return names


def open_image(path, what, fix='re-extract it from the archive'):
  """Opens and fully decodes an image file, mapping failures to DataError.

  Args:
    path: the file.
    what: 'image' or 'label', for the message.
    fix: what the user should do, for the message.
  """
  try:
    img = Image.open(path)
    img.load()  # Decode now so truncated files fail here.
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise errors.DataError(
        f'cannot decode {what} {path} ({type(e).__name__}: {e}): the file is '
        f'corrupt or truncated; {fix}') from None
  return img


def image_size(path):
  """(height, width) of an image file from its header (no pixel decoding)."""
  try:
    with Image.open(path) as img:
      width, height = img.size
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise errors.DataError(
        f'cannot decode image {path} ({type(e).__name__}: {e}): the file is '
        'corrupt or truncated; re-extract it from the archive') from None
  return height, width


def read_rgb(path):
  """Decodes an image file as uint8 (H, W, 3) RGB (grey/RGBA/P converted)."""
  img = open_image(path, 'image')
  if img.mode != 'RGB':
    img = img.convert('RGB')
  return np.asarray(img, dtype=np.uint8)


def read_id_map(path):
  """Decodes the first channel of a label PNG as integer ids (H, W).

  8-bit PNGs (mode L / P / RGB / RGBA) give the first channel (palette
  indices for P). 16-bit PNGs keep all 16 bits: Pillow decodes 16-bit RGB(A)
  to 8-bit by keeping the *high* byte, which turns SYNTHIA's class ids
  (< 256) into 0. This function re-decodes such files with the tile's raw
  mode switched to the little-endian unpacker (which then picks the low
  byte) and combines both bytes; a workaround written by hand, as no
  installed library reads 16-bit colour PNGs (imageio's FreeImage plugin
  needs a download).

  Args:
    path: PNG file.

  Returns:
    int32 (H, W).
  """
  try:  # The raw mode is only known before decoding (load clears tile).
    raw = Image.open(path).tile[0].args
  except (OSError, SyntaxError, ValueError, IndexError):
    raw = None  # open_image below reports the problem.
  raw = raw[0] if isinstance(raw, tuple) else raw
  img = open_image(path, 'label')
  if img.mode.startswith('I'):
    arr = np.asarray(img)
    return (arr if arr.ndim == 2 else arr[..., 0]).astype(np.int32)
  if raw in ('RGB;16B', 'RGBA;16B'):
    high = np.asarray(img)[..., 0].astype(np.int32)
    low_img = Image.open(path)
    low_img.tile = [t._replace(args=raw[:-1] + 'L') for t in low_img.tile]
    low = np.asarray(_load(low_img, path))[..., 0].astype(np.int32)
    return high * 256 + low
  if raw == 'LA;16B':
    # 4 bytes per pixel: read them as 8-bit RGBA (same filter stride);
    # R, G = high, low byte of the first (grey) channel.
    both = Image.open(path)
    both.tile = [t._replace(args='RGBA') for t in both.tile]
    arr = np.asarray(_load(both, path)).astype(np.int32)
    return arr[..., 0] * 256 + arr[..., 1]
  arr = np.asarray(img)
  return (arr if arr.ndim == 2 else arr[..., 0]).astype(np.int32)


def _load(img, path):
  try:
    img.load()
  except (OSError, ValueError) as e:
    raise errors.DataError(
        f'cannot decode label {path} ({type(e).__name__}: {e}): the file is '
        'corrupt or truncated; re-extract it from the archive') from None
  return img


def map_label(ids, table, num_ids, path, dataset):
  """Checks raw ids against a table and maps them to train ids.

  Args:
    ids: int (H, W) raw label ids.
    table: uint8 (256,) id -> train id lookup.
    num_ids: valid raw ids are [0, num_ids).
    path: label file, for the message.
    dataset: data set name, for the message.

  Returns:
    uint8 (H, W) train ids, `jaxda.types.IGNORE_LABEL` = ignore.
  """
  # min/max is one pass; np.unique (a sort) only on the error path.
  if ids.size and (ids.min() < 0 or ids.max() >= num_ids):
    values = np.unique(ids)
    bad = values[(values < 0) | (values >= num_ids)]
    raise errors.DataError(
        f'{dataset}: label {path} holds ids {bad[:10].tolist()} outside the '
        f'{dataset} id table [0, {num_ids}): is this a {dataset} label file '
        '(colour-coded or train-id labels are not)?')
  return np.asarray(table, np.uint8)[ids]


def check_same_size(image, label, image_path, label_path, resize):
  """Label of an image's size, or DataError naming both files.

  Args:
    image: (H, W, 3).
    label: (h, w).
    image_path: for the message.
    label_path: for the message.
    resize: if True, a label of another size is resized (nearest) instead.

  Returns:
    label with shape (H, W).
  """
  if label.shape == image.shape[:2]:
    return label
  if resize:
    return resize_label(label, image.shape[:2])
  raise errors.DataError(
      f'label {label_path} is {label.shape[1]}x{label.shape[0]} (WxH) but '
      f'image {image_path} is {image.shape[1]}x{image.shape[0]}: labels must '
      'match their image pixel for pixel (or set '
      'config.data.resize_mismatched_labels=True)')


def resize_image(image, size):
  """uint8 (H, W, 3) -> (h, w, 3), bicubic (the originals' resize)."""
  if size is None or image.shape[:2] == tuple(size):
    return image
  return np.asarray(Image.fromarray(image).resize(
      (size[1], size[0]), Image.Resampling.BICUBIC))


def resize_label(label, size):
  """uint8 (H, W) -> (h, w), nearest neighbour."""
  if size is None or label.shape == tuple(size):
    return label
  return np.asarray(Image.fromarray(label).resize(
      (size[1], size[0]), Image.Resampling.NEAREST))


def report(dataset, root, split, count, what='images'):
  """Logs (and returns) how many examples a reader found."""
  message = f'{dataset} {split}: {count} {what} found in {root}'
  logging.info(message)
  return message


# --------------------------------------------------------------------------
# Lazy array views of a source
# --------------------------------------------------------------------------


def _pool():
  global _POOL
  if _POOL is None:
    _POOL = concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS)
  return _POOL


class LazyArray:
  """A read-only uint8 array view of one field of a source.

  Behaves like the (N, H, W, 3) image or (N, H, W) label array the in-memory
  pipeline expects, but decodes rows only when indexed: `view[i]` and
  `view[index_array]` return NumPy arrays, `view[a:b]` another view (no
  decoding), `np.asarray(view)` everything. Rows are resized to `size`
  (bicubic images, nearest labels); `size=None` keeps the native size, which
  must then be the same for every row.

  Attributes:
    is_lazy_source: marker `jaxda.data.pipeline` checks to skip
      `np.asarray`.
  """

  is_lazy_source = True

  def __init__(self, source, field, size, rows=None):
    self.source = source
    self.field = field
    self.size = None if size is None else (int(size[0]), int(size[1]))
    self.rows = (np.arange(len(source)) if rows is None
                 else np.asarray(rows, np.int64))
    self._row_shape = None

  def _read(self, row):
    # Decode only this field (an image row no longer decodes its label).
    read_field = getattr(self.source, 'read_field', None)
    if read_field is not None:
      value = read_field(int(row), self.field)
    else:
      value = self.source[int(row)][self.field]
    if self.field == 'image':
      value = resize_image(value, self.size)
    else:
      value = resize_label(value, self.size)
    if self._row_shape is None:
      self._row_shape = value.shape
    elif value.shape != self._row_shape:
      raise errors.DataError(
          f'{self.source.name}: example {self.source.example_id(int(row))} '
          f'has {self.field} size {value.shape[:2]} but earlier ones have '
          f'{self._row_shape[:2]}: batches need one size (set '
          'config.data.height/width; full-resolution evaluation needs '
          'labels of one size)')
    return value

  def take_rows(self, rows):
    """A view of the given rows (int array), decoding nothing (integer-array
    indexing, `view[rows]`, decodes them)."""
    return LazyArray(self.source, self.field, self.size,
                     self.rows[np.asarray(rows, np.int64)])

  @property
  def native(self):
    """The same rows at the files' own resolution (labels: full-res eval)."""
    return LazyArray(self.source, self.field, None, self.rows)

  @property
  def shape(self):
    if self._row_shape is None:
      if self.size is not None:
        self._row_shape = self.size + ((3,) if self.field == 'image' else ())
      elif len(self.rows):
        self._read(self.rows[0])
      else:
        self._row_shape = (0, 0, 3) if self.field == 'image' else (0, 0)
    return (len(self.rows),) + tuple(self._row_shape)

  ndim = property(lambda self: len(self.shape))
  dtype = np.dtype(np.uint8)

  def __len__(self):
    return len(self.rows)

  def _stack(self, rows):
    rows = list(rows)
    if len(rows) > 1 and _DECODE_THREADS > 1:
      values = list(_pool().map(self._read, rows))
    else:
      values = [self._read(r) for r in rows]
    if not values:
      return np.zeros((0,) + self.shape[1:], np.uint8)
    return np.stack(values)

  def __getitem__(self, key):
    rest = ()
    if isinstance(key, tuple):
      key, rest = key[0], key[1:]
    if isinstance(key, slice):
      if rest:
        return self._stack(self.rows[key])[(slice(None),) + rest]
      return LazyArray(self.source, self.field, self.size, self.rows[key])
    if isinstance(key, (int, np.integer)):
      value = self._read(self.rows[key])
      return value[rest] if rest else value
    key = np.asarray(key)
    if key.dtype == bool:
      key = np.flatnonzero(key)
    out = self._stack(self.rows[key.astype(np.int64)])
    return out[(slice(None),) + rest] if rest else out

  def __array__(self, dtype=None, copy=None):
    del copy  # A new array is always made.
    out = self._stack(self.rows)
    return out if dtype is None else out.astype(dtype)

  def astype(self, dtype):
    return np.asarray(self).astype(dtype)

  def __repr__(self):
    return (f'LazyArray({self.source.name}, {self.field}, rows={len(self)}, '
            f'size={self.size})')


def source_domain(source, *, height=None, width=None, require_labels=True):
  """A real data set split (an opened reader) as a `Domain`, lazy where large.

  Args:
    source: an opened reader (`len`, `[i]`, `label_kind`, `class_names`, ...).
    height: training / evaluation input height (None: native size).
    width: input width (None: native size).
    require_labels: segmentation: fail if the split has no labels.

  Returns:
    `Domain`: segmentation images / labels are `LazyArray` views (labels
    None if the split has none and `require_labels` is False);
    classification labels are uint8 (N,) arrays; digit files are in memory.
  """
  logging.info('%s', source.summary)
  size = None if height is None else (height, width)
  if source.label_kind == 'per_image':
    labels = np.asarray(source.class_labels, np.uint8)
    if getattr(source, 'in_memory', False):
      images = np.stack([resize_image(source[i]['image'], size)
                         for i in range(len(source))])
    else:
      images = LazyArray(source, 'image', size)
    return Domain(images, labels, source.class_names)
  if not source.has_labels and require_labels:
    raise errors.DataError(
        f'{source.name} {source.split}: labels are required but none were '
        f'found under {source.root}; expected layout: {source.layout}')
  labels = LazyArray(source, 'label', size) if source.has_labels else None
  return Domain(LazyArray(source, 'image', size), labels, source.class_names)


class PairedFiles:
  """Base of the segmentation readers: (image file, label file) pairs.

  Subclasses set `name`, `layout`, `class_names`, `palette`, `table` (raw id
  -> train id), `num_ids` and fill `self.pairs` (image path, label path or
  None) and `self.ids` in `__init__`.
  """

  label_kind = 'dense'
  name = ''
  layout = ''
  table = None
  num_ids = 256

  def __init__(self, root, split, resize_mismatched_labels=False):
    self.root = root
    self.split = split
    self.resize_mismatched_labels = resize_mismatched_labels
    self.pairs = []
    self.ids = []

  def _finish(self):
    self.summary = report(self.name, self.root, self.split, len(self.pairs))

  def _pair_same_names(self, image_dir, label_dir):
    """Fills pairs/ids from two directories of same-named PNG files.

    The GTA5 and SYNTHIA layouts: `image_dir/X.png` is labelled by
    `label_dir/X.png`. Raises DataError naming the first unlabelled image.
    """
    require_dir(self.root, self.name, self.layout)
    require_dir(image_dir, self.name, self.layout)
    require_dir(label_dir, self.name, self.layout)
    names = list_files(image_dir, '.png', self.name, self.layout)
    labels = set(os.listdir(label_dir))
    missing = [n for n in names if n not in labels]
    if missing:
      raise errors.DataError(
          f'{self.name}: image {os.path.join(image_dir, missing[0])} has no '
          f'label {os.path.join(label_dir, missing[0])} ({len(missing)} '
          f'images lack labels); expected layout: {self.layout}')
    self.pairs = [(os.path.join(image_dir, n), os.path.join(label_dir, n))
                  for n in names]
    self.ids = [os.path.splitext(n)[0] for n in names]
    self._finish()

  @property
  def has_labels(self):
    return bool(self.pairs) and self.pairs[0][1] is not None

  def example_id(self, i):
    return self.ids[i]

  def __len__(self):
    return len(self.pairs)

  def read_ids(self, path):
    """Raw label ids (H, W) of one label file."""
    return read_id_map(path)

  def _pair(self, i):
    if not -len(self.pairs) <= i < len(self.pairs):
      raise IndexError(f'{self.name}: index {i} out of range '
                       f'[0, {len(self.pairs)})')
    return self.pairs[i]

  def _label(self, label_path, image_path, image_shape):
    label = map_label(self.read_ids(label_path), self.table, self.num_ids,
                      label_path, self.name)
    return check_same_size(np.empty(image_shape + (0,), np.uint8), label,
                           image_path, label_path,
                           self.resize_mismatched_labels)

  def read_field(self, i, field):
    """`self[i][field]`, decoding only that file (`LazyArray` reads fields
    separately, so an image row must not decode its label and vice versa).

    A label is checked against its image's size read from the header.
    """
    image_path, label_path = self._pair(i)
    if field == 'image':
      return read_rgb(image_path)
    if field != 'label' or label_path is None:
      raise KeyError(field)
    return self._label(label_path, image_path, image_size(image_path))

  def __getitem__(self, i):
    image_path, label_path = self._pair(i)
    image = read_rgb(image_path)
    out = {'image': image, 'id': self.ids[i]}
    if label_path is not None:
      out['label'] = self._label(label_path, image_path, image.shape[:2])
    return out


def describe(split_name, domain):
  """One line on where a real-data split came from, or None.

  Args:
    split_name: e.g. 'source_train'.
    domain: a `Domain`.

  Returns:
    e.g. 'source_train: GTA5 train: 24966 images found in /data/GTA5' (plus
    the rows this process reads if fewer), or None for embedded data.
  """
  source = getattr(domain.images, 'source', None)
  if source is None:
    return None
  line = f'{split_name}: {source.summary}'
  if len(domain.images) != len(source):
    line += f' ({len(domain.images)} read by this process)'
  return line
