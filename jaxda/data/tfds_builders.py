"""TFDS builders over the local-file readers (`manual_dir`), TensorFlow-free.

Each builder wraps one reader of `jaxda.data.sources`: `download_and_prepare`
reads the files from `manual_dir` (nothing is downloaded) and writes
ArrayRecord shards, which `builder.as_data_source()` serves as a
random-access `tfds.data_source` (grain-compatible), without TensorFlow:

  builder = tfds_builders.Gta5(data_dir='~/tensorflow_datasets',
                               file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir='/data/GTA5'))
  source = builder.as_data_source()['train']   # source[i]['image'] ...

Checked with tensorflow-datasets 4.9.10 and no TensorFlow installed: a
`GeneratorBasedBuilder` with `file_format='array_record'` builds and reads
back, but only with `tfds.features.Tensor(..., encoding='zlib')` features.
`tfds.features.Image` fails while encoding the first example with
"ModuleNotFoundError: In <Image> with name "image": No module named
'tensorflow'" (its PNG encoder is TensorFlow's); the default tfrecord format
needs TensorFlow to write. So images and labels are stored as zlib-compressed
uint8 arrays (about 1.5x the PNG size), and the builders skip the global TFDS
registry (`skip_registration`: TFDS already has a `cityscapes` builder).

A builder is optional: the readers are random-access sources already and the
training loop reads them directly (`config.source.name = 'gta5'`); build a
TFDS copy to get one file per shard instead of 25,000 PNGs.
"""

import numpy as np
import tensorflow_datasets as tfds

from jaxda.data.readers import cityscapes
from jaxda.data.readers import digit_files
from jaxda.data.readers import gta5
from jaxda.data.readers import office
from jaxda.data.readers import synthia
from jaxda.data import tables

_VERSION = tfds.core.Version('1.0.0')


def _segmentation_features():
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
                                    encoding='zlib'),
      'label': tfds.features.Tensor(shape=(None, None), dtype=np.uint8,
                                    encoding='zlib'),
      'id': tfds.features.Text(),
  })


def _classification_features(class_names):
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
                                    encoding='zlib'),
      'label': tfds.features.ClassLabel(names=list(class_names)),
      'id': tfds.features.Text(),
  })


class _ReaderBuilder(tfds.core.GeneratorBasedBuilder,
                     skip_registration=True):
  """Shared body: one split per reader split, examples keyed by file id."""

  VERSION = _VERSION
  SPLITS = {'train': 'train'}  # TFDS split name -> reader split name.
  LAYOUT = ''

  @property
  def MANUAL_DOWNLOAD_INSTRUCTIONS(self):  # pylint: disable=invalid-name
    return f'Extract the archives into manual_dir: {self.LAYOUT}'

  def _features(self):
    return _segmentation_features()

  def _open(self, root, split):
    raise NotImplementedError

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=self._features(),
                                 description=self.__doc__)

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    return {name: self._generate_examples(root, split)
            for name, split in self.SPLITS.items()}

  def _generate_examples(self, root, split):
    source = self._open(root, split)
    for i in range(len(source)):
      example = source[i]
      yield example['id'], {'image': example['image'],
                            'label': example['label'], 'id': example['id']}


class Gta5(_ReaderBuilder, skip_registration=True):
  """GTA5 in the 19 Cityscapes train ids (`jaxda.data.gta5`)."""

  LAYOUT = gta5.LAYOUT

  def _open(self, root, split):
    return gta5.GTA5(root, split)


class Synthia(_ReaderBuilder, skip_registration=True):
  """SYNTHIA-RAND-CITYSCAPES in 16 classes (`jaxda.data.synthia`)."""

  LAYOUT = synthia.LAYOUT

  def _open(self, root, split):
    return synthia.Synthia(root, split)


class JaxdaCityscapes(_ReaderBuilder, skip_registration=True):
  """Cityscapes train/val in 19 train ids, or the 16 SYNTHIA classes."""

  LAYOUT = cityscapes.LAYOUT
  SPLITS = {'train': 'train', 'validation': 'val'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='classes19',
                              description='19 Cityscapes train ids'),
      tfds.core.BuilderConfig(name='classes16',
                              description='16 SYNTHIA-protocol classes'),
  ]

  def _open(self, root, split):
    num_classes = 16 if self.builder_config.name == 'classes16' else 19
    return cityscapes.Cityscapes(root, split, num_classes=num_classes)


class Office31(_ReaderBuilder, skip_registration=True):
  """One Office-31 domain (`jaxda.data.office`)."""

  LAYOUT = office.LAYOUTS['office31']
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=d)
                     for d in tables.OFFICE31_DOMAINS]

  def _features(self):
    return _classification_features(tables.OFFICE31_CLASSES)

  def _open(self, root, split):
    return office.Office(root, 'office31', self.builder_config.name, split)


class OfficeHome(_ReaderBuilder, skip_registration=True):
  """One Office-Home domain (`jaxda.data.office`)."""

  LAYOUT = office.LAYOUTS['officehome']
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in
                     ('art', 'clipart', 'product', 'real_world')]

  def _features(self):
    return _classification_features(tables.OFFICEHOME_CLASSES)

  def _open(self, root, split):
    return office.Office(root, 'officehome', self.builder_config.name, split)


class _DigitBuilder(_ReaderBuilder, skip_registration=True):
  SPLITS = {'train': 'train', 'test': 'val'}
  READER = None

  def _features(self):
    return _classification_features(tables.DIGIT_CLASSES)

  def _open(self, root, split):
    return self.READER(root, split)  # pylint: disable=not-callable


class MnistFiles(_DigitBuilder, skip_registration=True):
  """MNIST from the idx files (`jaxda.data.digit_files`)."""

  LAYOUT = digit_files.MNIST.layout
  READER = digit_files.MNIST


class UspsFiles(_DigitBuilder, skip_registration=True):
  """USPS from the LIBSVM bz2 files (`jaxda.data.digit_files`)."""

  LAYOUT = digit_files.USPS.layout
  READER = digit_files.USPS


class SvhnFiles(_DigitBuilder, skip_registration=True):
  """SVHN format 2 from the .mat files (`jaxda.data.digit_files`)."""

  LAYOUT = digit_files.SVHN.layout
  READER = digit_files.SVHN


class Folder(_ReaderBuilder, skip_registration=True):
  """A data set in the custom folder layout of `jaxda.data.folder`."""

  LAYOUT = ('ROOT/classes.txt, ROOT/<split>/images/*.png, '
            'ROOT/<split>/labels/*.png')
  SPLITS = {'train': 'train', 'validation': 'val'}

  def _generate_examples(self, root, split):
    from jaxda.data.readers import folder  # pylint: disable=g-import-not-at-top
    data = folder.read_folder(root, split, require_labels=True)
    for stem, image, label in zip(data.stems, data.images, data.labels):
      yield stem, {'image': image, 'label': label, 'id': stem}
