"""Image list files: a split restricted to the images a file names.

`config.source.list_file` / `config.target.list_file` (train splits): one
image per line, as a stem ('aachen_000000_000019', '00001') or as the
originals' list files write it (a path, Cityscapes' '_leftImg8bit.png'
suffix, further columns), so the original lists (CRST's 505-image
Cityscapes ClsConfSet, its 19,984-image GTA5 list) work unchanged. A stem
the split lacks is a one-line `DataError` naming the file, the line and the
stem. `registry.Dataset.load_split(list_file=...)` applies it.
"""

import os

from jaxda.data import errors
from jaxda.data.readers import common


def list_stem(entry, suffixes=()):
  """The image stem a list-file line names.

  The first whitespace-separated token of the line, reduced to its file
  name without an image extension and without any of `suffixes` (e.g.
  Cityscapes' '_leftImg8bit'), so both plain stems and the originals' list
  files ('leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png',
  GTA5 '00001.png') work.
  """
  name = os.path.basename(entry.split()[0].replace('\\', '/'))
  root, ext = os.path.splitext(name)
  if ext.lower() in ('.png', '.jpg', '.jpeg'):
    name = root
  for suffix in suffixes:
    if name.endswith(suffix):
      name = name[:-len(suffix)]
  return name


def read_list_file(path, suffixes=()):
  """[(line number, stem)] of a list file: one image per line; blank lines
  and lines starting with '#' are skipped.

  Raises:
    DataError: the file is missing or names no image.
  """
  if not os.path.isfile(path):
    raise errors.DataError(f'list file {path} does not exist (one image stem '
                           'per line)')
  with open(path, encoding='utf-8') as f:
    lines = [(i + 1, line.strip()) for i, line in enumerate(f)]
  stems = [(i, list_stem(line, suffixes)) for i, line in lines
           if line and not line.startswith('#')]
  if not stems:
    raise errors.DataError(f'list file {path} names no image (one image stem '
                           'per line)')
  return stems


def restrict_to_list(source, list_file):
  """Keeps the images `list_file` names, in its order (a reader's split).

  Args:
    source: an opened `PairedFiles` reader (its `ids` and `pairs`).
    list_file: path of the list (`read_list_file`).

  Returns:
    `source`, restricted in place.

  Raises:
    DataError: one line naming the list file, the line and the stem that is
      not in the split (or is listed twice).
  """
  if not hasattr(source, 'pairs'):
    raise errors.DataError(
        f'{source.name}: a list file ({list_file}) restricts only the '
        'segmentation data sets read from files (gta5, synthia, cityscapes)')
  index = {stem: i for i, stem in enumerate(source.ids)}
  entries = read_list_file(list_file, getattr(source, 'stem_suffixes', ()))
  seen = set()
  for line, stem in entries:
    if stem not in index:
      raise errors.DataError(
          f'list file {list_file} line {line}: image {stem!r} is not in '
          f'{source.name} {source.split} under {source.root}')
    if stem in seen:
      raise errors.DataError(
          f'list file {list_file} line {line}: image {stem!r} is listed '
          'twice')
    seen.add(stem)
  rows = [index[stem] for _, stem in entries]
  source.pairs = [source.pairs[i] for i in rows]
  source.ids = [source.ids[i] for i in rows]
  source.summary = common.report(source.name, source.root, source.split,
                          len(source.pairs),
                          f'images listed in {list_file}')
  return source
