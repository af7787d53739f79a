"""MNIST, USPS and SVHN read from their distributed files.

Files (put them in one directory per data set)::

  MNIST: train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
         t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]
  USPS:  usps.bz2 (train, 7,291) and usps.t.bz2 (test, 2,007), the LIBSVM
         format TFDS's `usps` builder reads: "label idx:value ..." with
         labels 1-10 for digits 0-9 and 256 values in [-1, 1] (16x16)
  SVHN:  train_32x32.mat, test_32x32.mat (format 2: X (32, 32, 3, N),
         y (N, 1) with 10 for digit 0), read with scipy.io.loadmat

USPS is read in the bz2 format (TFDS's choice) since h5py, which the
Kaggle `usps.h5` would need, is not a dependency. Split 'train' reads the
training file, 'val' the test file. The sets are small, so a source decodes
its file once into memory; images are uint8 RGB (grey replicated).
"""

import bz2
import gzip
import os

import numpy as np

from jaxda.data import errors
from jaxda.data.readers import common
from jaxda.data import tables

MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'val': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
USPS_FILES = {'train': 'usps.bz2', 'val': 'usps.t.bz2'}
SVHN_FILES = {'train': 'train_32x32.mat', 'val': 'test_32x32.mat'}
_IDX_MAGIC = {1: 2049, 3: 2051}  # ndim -> magic number of the idx format.


def _split_key(split, dataset):
  if split not in ('train', 'val'):
    raise errors.DataError(f'{dataset}: split {split!r} does not exist; use '
                           "'train' or 'val' (the test file)")
  return split


def _find(data_dir, name, dataset, layout):
  common.require_dir(data_dir, dataset, layout)
  for candidate in (name, name + '.gz'):
    path = os.path.join(data_dir, candidate)
    if os.path.isfile(path):
      return path
  raise errors.DataError(f'{dataset}: file {os.path.join(data_dir, name)}'
                         f'[.gz] does not exist; expected layout: {layout}')


def has_mnist_files(data_dir):
  """True if `data_dir` holds the MNIST training idx files."""
  return bool(data_dir) and any(
      os.path.isfile(os.path.join(data_dir, MNIST_FILES['train'][0] + s))
      for s in ('', '.gz'))


def read_idx(path, ndim):
  """Reads an idx file (optionally gzipped) as a uint8 array.

  Args:
    path: file path.
    ndim: 3 for images (N, 28, 28), 1 for labels (N,).

  Returns:
    uint8 array of that rank.
  """
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise errors.DataError(f'MNIST: cannot read {path} ({e}): the file is '
                           'corrupt or truncated') from None
  header = 4 * (1 + ndim)
  if len(data) < header:
    raise errors.DataError(f'MNIST: {path} is too short for an idx file')
  magic = int.from_bytes(data[:4], 'big')
  if magic != _IDX_MAGIC[ndim]:
    raise errors.DataError(
        f'MNIST: {path} has magic number {magic}, expected '
        f'{_IDX_MAGIC[ndim]} (idx{ndim} uint8): wrong or corrupt file')
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big')
                for i in range(ndim))
  body = np.frombuffer(data, np.uint8, offset=header)
  if body.size != int(np.prod(shape)):
    raise errors.DataError(
        f'MNIST: {path} holds {body.size} bytes of data but its header says '
        f'{shape}: the file is truncated')
  return body.reshape(shape)


class _InMemory:
  """A decoded digit data set: images (N, H, W) or (N, H, W, 3), labels."""

  label_kind = 'per_image'
  in_memory = True
  class_names = tables.DIGIT_CLASSES

  def _set(self, images, labels, path, split):
    if len(images) != len(labels):
      raise errors.DataError(
          f'{self.name}: {path} has {len(images)} images but {len(labels)} '
          'labels')
    bad = np.unique(labels[(labels < 0) | (labels > 9)])
    if bad.size:
      raise errors.DataError(f'{self.name}: {path} has labels '
                             f'{bad[:10].tolist()} outside 0-9')
    if images.ndim == 3:
      images = np.repeat(images[..., None], 3, axis=-1)
    self.images = np.ascontiguousarray(images, np.uint8)
    self.class_labels = labels.astype(np.int64)
    self.summary = common.report(self.name, os.path.dirname(path), split,
                                  len(images))

  def example_id(self, i):
    return str(i)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {'image': self.images[i], 'label': int(self.class_labels[i]),
            'id': str(i)}


class MNIST(_InMemory):
  """MNIST from the idx files (60,000 train / 10,000 test at 28x28)."""

  name = 'MNIST'
  layout = ('DIR/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]')

  def __init__(self, data_dir, split='train'):
    image_name, label_name = MNIST_FILES[_split_key(split, self.name)]
    image_path = _find(data_dir, image_name, self.name, self.layout)
    label_path = _find(data_dir, label_name, self.name, self.layout)
    self._set(read_idx(image_path, 3), read_idx(label_path, 1).astype(
        np.int64), image_path, split)


class USPS(_InMemory):
  """USPS from the LIBSVM bz2 files (16x16 grey, module docstring)."""

  name = 'USPS'
  layout = 'DIR/usps.bz2 (train) and DIR/usps.t.bz2 (test), LIBSVM format'

  def __init__(self, data_dir, split='train'):
    common.require_dir(data_dir, self.name, self.layout)
    path = os.path.join(data_dir, USPS_FILES[_split_key(split, self.name)])
    if not os.path.isfile(path):
      raise errors.DataError(f'USPS: file {path} does not exist; expected '
                             f'layout: {self.layout}')
    images, labels = [], []
    line_no = 0
    try:
      with bz2.open(path, 'rt') as f:
        for line_no, line in enumerate(f, 1):
          parts = line.split()
          if not parts:
            continue
          pixels = np.zeros(256, np.float64)
          for item in parts[1:]:
            index, value = item.split(':')
            pixels[int(index) - 1] = float(value)
          labels.append(int(float(parts[0])) - 1)
          images.append(pixels)
    except (OSError, EOFError, ValueError, IndexError) as e:
      raise errors.DataError(
          f'USPS: cannot parse {path} near line {line_no} '
          f'({type(e).__name__}: {e}): not a LIBSVM usps file') from None
    if not images:
      raise errors.DataError(f'USPS: {path} holds no examples')
    # [-1, 1] -> [0, 255], as TFDS's builder scales them.
    pixels = np.clip(np.rint((np.stack(images) + 1.0) * 127.5), 0, 255)
    self._set(pixels.astype(np.uint8).reshape(-1, 16, 16),
              np.asarray(labels, np.int64), path, split)


class SVHN(_InMemory):
  """SVHN format 2 (32x32 RGB crops) from the .mat files."""

  name = 'SVHN'
  layout = 'DIR/train_32x32.mat and DIR/test_32x32.mat (SVHN format 2)'

  def __init__(self, data_dir, split='train'):
    from scipy import io as scipy_io  # pylint: disable=g-import-not-at-top
    common.require_dir(data_dir, self.name, self.layout)
    path = os.path.join(data_dir, SVHN_FILES[_split_key(split, self.name)])
    if not os.path.isfile(path):
      raise errors.DataError(f'SVHN: file {path} does not exist; expected '
                             f'layout: {self.layout}')
    try:
      mat = scipy_io.loadmat(path)
    except (OSError, ValueError, TypeError,
            scipy_io.matlab.MatReadError) as e:
      raise errors.DataError(f'SVHN: cannot read {path} ({e}): not a MATLAB '
                             'file') from None
    if 'X' not in mat or 'y' not in mat or mat['X'].ndim != 4:
      raise errors.DataError(
          f'SVHN: {path} lacks X (32, 32, 3, N) / y (N, 1): not an SVHN '
          'format-2 file')
    labels = mat['y'].reshape(-1).astype(np.int64)
    labels[labels == 10] = 0  # SVHN stores digit 0 as class 10.
    self._set(np.transpose(mat['X'], (3, 0, 1, 2)), labels, path, split)
