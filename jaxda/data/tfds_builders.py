"""TFDS builders over the local-file readers (`manual_dir`), TensorFlow-free.

`builder(name, ...)` makes a TFDS builder for any data set of
`jaxda.data.registry` read from files in its distributed layout ('gta5',
'cityscapes', 'cityscapes16', 'synthia', 'office31:<domain>',
'officehome:<domain>', 'mnist_files', 'usps', 'svhn'):
`download_and_prepare` reads the files from `manual_dir` (nothing is
downloaded) and writes ArrayRecord shards, which `as_data_source()` serves
as a random-access `tfds.data_source` (grain-compatible), without
TensorFlow:

  b = tfds_builders.builder('gta5', data_dir='~/tensorflow_datasets')
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir='/data/GTA5'))
  source = b.as_data_source()['train']   # source[i]['image'] ...

Examples are the readers' own: 'image' uint8 (H, W, 3), 'label' uint8
(H, W) train ids (segmentation) or an int64 class index (classification),
'id' the file id. TFDS splits are 'train' and, where the reader's 'val'
differs (`registry.Dataset.splits`), 'validation'.

Without TensorFlow, `file_format='array_record'` builds and reads back only
with `tfds.features.Tensor(..., encoding='zlib')` features:
`tfds.features.Image` needs TensorFlow's PNG encoder and the default
tfrecord format needs TensorFlow to write. So images and labels are
zlib-compressed uint8 arrays (about 1.5x the PNG size), and the builders
skip the global TFDS registry (TFDS has its own `cityscapes`).

A builder is optional: the readers are random-access sources already and the
training loop reads them directly (`config.source.name = 'gta5'`); a TFDS
copy gives one file per shard instead of 25,000 PNGs.
"""

import re
import types

import numpy as np
import tensorflow_datasets as tfds

from jaxda.data import errors
from jaxda.data import registry

VERSION = tfds.core.Version('1.0.0')
_TFDS_SPLITS = {'train': 'train', 'val': 'validation'}


def _image():
  return tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
                              encoding='zlib')


def _features(label_kind):
  if label_kind == registry.DENSE:
    label = tfds.features.Tensor(shape=(None, None), dtype=np.uint8,
                                 encoding='zlib')
  else:
    label = tfds.features.Tensor(shape=(), dtype=np.int64)
  return tfds.features.FeaturesDict(
      {'image': _image(), 'label': label, 'id': tfds.features.Text()})


class _ReaderBuilder(tfds.core.GeneratorBasedBuilder,
                     skip_registration=True):
  """Shared body: one TFDS split per reader split, examples keyed by id."""

  VERSION = VERSION
  ENTRY = None  # registry.Dataset
  DOMAIN = ''  # '<domain>' of a 'name:<domain>' config name.

  @property
  def MANUAL_DOWNLOAD_INSTRUCTIONS(self):  # pylint: disable=invalid-name
    return f'Extract the {self.ENTRY.name} archives into manual_dir.'

  def _info(self):
    return tfds.core.DatasetInfo(builder=self,
                                 features=_features(self.ENTRY.label_kind),
                                 description=self.__doc__)

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    return {_TFDS_SPLITS[split]: self._generate_examples(root, split)
            for split in self.ENTRY.splits}

  def _generate_examples(self, root, split):
    source = self.ENTRY.open_split(root, split, self.DOMAIN)
    for i in range(len(source)):
      example = source[i]
      yield example['id'], {'image': example['image'],
                            'label': example['label'], 'id': example['id']}


def builder_class(name):
  """The TFDS builder class of a registry data set read from files.

  Args:
    name: config name, e.g. 'gta5' or 'office31:amazon'; the builder's TFDS
      name (its directory under data_dir) is 'jaxda_' + the name in
      snake_case ('jaxda_office31_amazon').

  Raises:
    DataError: unknown name, or a data set not read from files (the
      embedded benchmarks and the folder layout).
  """
  entry, domain = registry.lookup(name)
  if not entry.reads_files:
    raise errors.DataError(
        f'data set {name!r} has no TFDS builder: only the readers of '
        'distributed layouts have: '
        f'{[n for n, e in registry.DATASETS.items() if e.reads_files]}')
  tfds_name = 'jaxda_' + re.sub(r'\W+', '_', name.lower()).strip('_')
  body = {'name': tfds_name, 'ENTRY': entry, 'DOMAIN': domain,
          '__doc__': f'{name} from its distributed files ({entry.label_kind}).',
          '__module__': __name__}
  return types.new_class(f'Builder_{tfds_name}', (_ReaderBuilder,),
                         {'skip_registration': True},
                         lambda namespace: namespace.update(body))


def builder(name, **kwargs):
  """`builder_class(name)(**kwargs)`, e.g. `data_dir=`, `file_format=`.

  The file format defaults to 'array_record' (what works without
  TensorFlow).
  """
  kwargs.setdefault('file_format', 'array_record')
  return builder_class(name)(**kwargs)
