"""The one table from a data set's config name to the code that reads it.

Every data set `config.source.name` / `config.target.name` may name is one
`Dataset` entry below: its name, its label kind ('dense' per-pixel or
'per_image') and how to open one split. Readers of files in a
distributed layout give `open` (a random-access source, see
`readers.common`), which `Dataset.load` wraps as a lazy `Domain`; the
embedded benchmarks and the folder layout give `load` directly. Only the
synthetic benchmark has depth maps (`load_depth`).

The named target shifts of the synthetic benchmark (`embedded.shifts`) are
entries of their own, 'synthetic:<shift>' ('synthetic' is the default
shift); the digits targets ('digits', 'mnist_m', 'mnist_texture') already
are. The configs' ``target.shift`` field picks one of them
(`synthetic_name`, `digits_name`).

`pipeline.load_domain` / `load_depth` and `tfds_builders.builder` look
names up here, so adding a data set is one entry.
"""

import dataclasses
import functools
import os
from typing import Callable

from jaxda.data import errors
from jaxda.data.embedded import digits
from jaxda.data.embedded import synthetic
from jaxda.data.readers import cityscapes
from jaxda.data.readers import common
from jaxda.data.readers import digit_files
from jaxda.data.readers import folder
from jaxda.data.readers import gta5
from jaxda.data.readers import image_lists
from jaxda.data.readers import office
from jaxda.data.readers import synthia

DENSE = 'dense'  # one label per pixel
PER_IMAGE = 'per_image'  # one label per image
LABEL_KINDS = (DENSE, PER_IMAGE)

Domain = common.Domain
DEFAULT_CACHE_DIR = os.path.join('~', '.cache', 'jaxda')
# Synthetic defaults when height / width / num_images are not given.
SYNTHETIC_SIZE = (64, 128)
SYNTHETIC_NUM_IMAGES = {'train': 1000, 'val': 200}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One registry entry.

  Attributes:
    name: config name; for `takes_domain` entries the prefix of
      '<name>:<domain>' (e.g. 'office31:amazon').
    label_kind: 'dense' (a class id per pixel) or 'per_image'.
    open: for data sets read from files in their distributed layout:
      `open(data_dir, split, domain, **options)` -> random-access source
      (`readers.common`); None for the others.
    load: for the others: `load(domain, *, role, data_dir, split, height,
      width, num_images, seed, require_labels)` -> `Domain`.
    load_depth: `load_depth(*, role, data_dir, split, height, width,
      num_images, seed)` -> float32 (N, H, W) depth, or None.
    takes_domain: the config name carries ':<domain>'.
    splits: the splits with different examples ('val' of GTA5, SYNTHIA and
      the Office domains is the whole set again, like 'train').
    help: how the entry is named in error messages.
  """
  name: str
  label_kind: str
  open: Callable | None = None
  load: Callable | None = None
  load_depth: Callable | None = None
  takes_domain: bool = False
  splits: tuple[str, ...] = ('train', 'val')
  help: str = ''

  @property
  def reads_files(self):
    """True for readers of a distributed layout (data_dir required)."""
    return self.open is not None

  def open_split(self, data_dir, split='train', domain='', **options):
    """Opens one split of a file data set as a random-access source.

    Args:
      data_dir: the data set root in its distributed layout.
      split: 'train' or 'val' (what each reader does with it is in its
        docstring; GTA5, SYNTHIA and the Office domains have no official
        split and return every image for both).
      domain: the '<domain>' of a 'name:<domain>' config name.
      **options: reader keyword arguments (`resize_mismatched_labels`).

    Raises:
      DataError: not a file data set, missing directory or layout.
    """
    if self.open is None:
      raise errors.DataError(f'data set {self.name!r} is not read from files '
                             'in a distributed layout')
    if not data_dir:
      raise errors.DataError(
          f'data set {self.name!r} needs its local directory: set '
          'config.source.data_dir / config.target.data_dir (nothing is '
          'downloaded)')
    return self.open(data_dir, split, domain, **options)

  def load_split(self, domain='', *, role=None, data_dir=None, split='train',
                 height=None, width=None, num_images=None, seed=0,
                 require_labels=True, resize_mismatched_labels=False,
                 list_file=None):
    """One split as a `Domain` (see `pipeline.load_domain` for the args).

    `list_file`: a file naming one image stem per line; the split keeps those
    images, in that order (`readers.image_lists.restrict_to_list`: a stem the
    split lacks is a one-line `DataError` naming the file and the stem).
    """
    if self.open is None:
      if list_file:
        raise errors.DataError(
            f'data set {self.name!r} is not read from image files; a list '
            f'file ({list_file}) restricts only: '
            f'{", ".join(n for n in names(reads_files=True))}')
      return self.load(domain, role=role, data_dir=data_dir, split=split,
                       height=height, width=width, num_images=num_images,
                       seed=seed, require_labels=require_labels)
    # num_images and seed do not apply to files; labels of another size
    # only matter for segmentation.
    options = ({'resize_mismatched_labels': resize_mismatched_labels}
               if self.label_kind == DENSE else {})
    source = self.open_split(data_dir, split, domain, **options)
    if list_file:
      image_lists.restrict_to_list(source, list_file)
    return common.source_domain(source, height=height, width=width,
                                require_labels=require_labels)


# --------------------------------------------------------------------------
# How each kind of entry opens a split
# --------------------------------------------------------------------------


def _synthetic_args(role, data_dir, split, height, width, num_images, what):
  if role not in synthetic.DOMAINS:
    raise errors.DataError(
        f'loader "synthetic" needs role= one of {synthetic.DOMAINS}, got '
        f'{role!r}')
  if split not in synthetic.SPLITS:
    raise errors.DataError(f'synthetic {what}split {split!r} does not exist: '
                           f'use one of {synthetic.SPLITS}')
  return dict(
      cache_dir=DEFAULT_CACHE_DIR if data_dir is None else data_dir,
      height=SYNTHETIC_SIZE[0] if height is None else height,
      width=SYNTHETIC_SIZE[1] if width is None else width,
      num_images=(SYNTHETIC_NUM_IMAGES[split] if num_images is None
                  else num_images))


def _check_shift_role(shift, role):
  if shift != synthetic.DEFAULT_SHIFT and role != 'target':
    raise errors.DataError(
        f'{synthetic_name(shift)!r} is a target shift of the synthetic '
        f'benchmark; the {role} domain takes \'synthetic\'')


def _load_synthetic(domain, *, role, data_dir, split, height, width,
                    num_images, seed, require_labels,
                    shift=synthetic.DEFAULT_SHIFT):
  del domain, require_labels  # The benchmark always has labels.
  args = _synthetic_args(role, data_dir, split, height, width, num_images, '')
  _check_shift_role(shift, role)
  images, labels = synthetic.load_or_generate(
      args.pop('cache_dir'), role, split, seed=seed, shift=shift, **args)
  return Domain(images, labels, synthetic.CLASS_NAMES)


def _load_synthetic_depth(*, role, data_dir, split, height, width,
                          num_images, seed, shift=synthetic.DEFAULT_SHIFT):
  args = _synthetic_args(role, data_dir, split, height, width, num_images,
                         'depth ')
  _check_shift_role(shift, role)
  return synthetic.load_or_generate_depth(
      args.pop('cache_dir'), role, split, seed=seed, shift=shift, **args)


def synthetic_name(shift):
  """The data set name of a synthetic target shift ('synthetic' for the
  default, else 'synthetic:<shift>').

  Raises:
    DataError: unknown shift (the message lists `synthetic.SHIFTS`).
  """
  if shift not in synthetic.SHIFTS:
    raise errors.DataError(
        f'unknown target shift {shift!r} of the synthetic benchmark; known '
        f'shifts: {", ".join(synthetic.SHIFTS)}')
  return ('synthetic' if shift == synthetic.DEFAULT_SHIFT
          else f'synthetic:{shift}')


def digits_name(shift):
  """The digits target data set of a shift (`digits.TARGET_SHIFTS`).

  Raises:
    DataError: unknown shift (the message lists the shifts).
  """
  if shift not in digits.TARGET_SHIFTS:
    raise errors.DataError(
        f'unknown digits target shift {shift!r}; known shifts: '
        f'{", ".join(digits.TARGET_SHIFTS)}')
  return digits.TARGET_SHIFTS[shift]


def _load_folder(domain, *, role, data_dir, split, height, width,
                 num_images, seed, require_labels):
  # A folder is always read whole (`folder.read_folder(num_images=...)`
  # reads a prefix); nothing is random.
  del domain, num_images, seed
  if data_dir is None:
    who = f'the {role} domain' if role else 'loader "folder"'
    raise errors.DataError(f'{who} needs data_dir= the folder data set '
                           'root (holding classes.txt)')
  data = folder.read_folder(data_dir, split, require_labels=require_labels,
                            height=height, width=width)
  return Domain(data.images, data.labels, data.class_names)


def _load_digits(name, domain, *, role, data_dir, split, height, width,
                 num_images, seed, require_labels):
  del domain, role, require_labels
  # (N,) labels; images at (height, width), 28x28 by default.
  cache_dir = DEFAULT_CACHE_DIR if data_dir is None else data_dir
  images, labels = digits.load_or_generate(
      cache_dir, name, split, height=height or digits.CANONICAL_SIZE,
      width=width or digits.CANONICAL_SIZE, seed=seed, num_images=num_images)
  return Domain(images, labels, digits.CLASS_NAMES)


def _reader(make, **fixed):
  """`open` of a reader class taking (root, split, **options), no domain."""
  def open_(data_dir, split, domain, **options):
    del domain
    return make(data_dir, split, **fixed, **options)
  return open_


def _office(kind):
  def open_(data_dir, split, domain, **options):
    return office.Office(data_dir, kind, domain, split, **options)
  return open_


_ENTRIES = (
    Dataset('synthetic', DENSE, load=_load_synthetic,
            load_depth=_load_synthetic_depth),
    Dataset('folder', DENSE, load=_load_folder),
    *(Dataset(synthetic_name(shift), DENSE,
              load=functools.partial(_load_synthetic, shift=shift),
              load_depth=functools.partial(_load_synthetic_depth,
                                           shift=shift))
      for shift in synthetic.SHIFTS if shift != synthetic.DEFAULT_SHIFT),
    *(Dataset(name, PER_IMAGE,
              load=functools.partial(_load_digits, name))
      for name in digits.DOMAINS),
    Dataset('gta5', DENSE, open=_reader(gta5.GTA5), splits=('train',)),
    Dataset('cityscapes', DENSE,
            open=_reader(cityscapes.Cityscapes, num_classes=19)),
    Dataset('cityscapes16', DENSE,
            open=_reader(cityscapes.Cityscapes, num_classes=16)),
    Dataset('synthia', DENSE, open=_reader(synthia.Synthia),
            splits=('train',)),
    Dataset('office31', PER_IMAGE, open=_office('office31'),
            takes_domain=True, splits=('train',), help='office31:<domain>'),
    Dataset('officehome', PER_IMAGE, open=_office('officehome'),
            takes_domain=True, splits=('train',),
            help='officehome:<domain>'),
    # The MNIST idx files; a config says 'mnist' (see `lookup`).
    Dataset('mnist_files', PER_IMAGE, open=_reader(digit_files.MNIST),
            help='mnist (idx files in data_dir)'),
    Dataset('usps', PER_IMAGE, open=_reader(digit_files.USPS)),
    Dataset('svhn', PER_IMAGE, open=_reader(digit_files.SVHN)),
)
DATASETS = {entry.name: entry for entry in _ENTRIES}
assert len(DATASETS) == len(_ENTRIES), 'duplicate registry names'
assert all(entry.label_kind in LABEL_KINDS for entry in _ENTRIES)
assert all((entry.open is None) != (entry.load is None) for entry in _ENTRIES)


def names(reads_files=None):
  """Config names in table order, as error messages show them.

  Args:
    reads_files: None for all; True / False for the file readers / the
      others only.
  """
  return tuple(entry.help or entry.name for entry in _ENTRIES
               if reads_files is None or entry.reads_files == reads_files)


def lookup(name, data_dir=None):
  """The entry a config name picks, and the '<domain>' part of it.

  'mnist' means the MNIST idx files when `data_dir` holds them, else the
  embedded 5,000-image subset.

  Args:
    name: config name, e.g. 'gta5', 'office31:amazon', 'synthetic',
      'synthetic:weather'.
    data_dir: the configured directory (only 'mnist' looks at it).

  Returns:
    (Dataset, domain str, '' if the name has none).

  Raises:
    DataError: unknown name.
  """
  if name == 'mnist' and digit_files.has_mnist_files(data_dir):
    name = 'mnist_files'
  if name in DATASETS:  # Including the 'synthetic:<shift>' entries.
    return DATASETS[name], ''
  prefix, colon, domain = name.partition(':')
  entry = DATASETS.get(prefix)
  variants = tuple(n for n in DATASETS if n.startswith(prefix + ':'))
  if colon and variants:
    raise errors.DataError(
        f'unknown data set {name!r}: use one of {(prefix,) + variants}')
  if entry is None or (colon and not entry.takes_domain):
    raise errors.DataError(
        f'unknown data set {name!r}: use one of {names(reads_files=False)}, '
        f'or a real data set: {names(reads_files=True)}')
  return entry, domain
