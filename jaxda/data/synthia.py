"""SYNTHIA-RAND-CITYSCAPES (Ros et al. 2016) read from its distributed layout.

Layout::

  ROOT/RGB/0000000.png ...          RGB frames (1280x760), 9,400 of them
  ROOT/GT/LABELS/0000000.png ...    16-bit PNG; class id in the first
                                    channel, instance id in the second

The originals read the label with `imageio.imread(path, format='PNG-FI')
[:, :, 0]` (the first channel at full 16-bit depth); Pillow alone would keep
only the high byte of each 16-bit sample and read every id as 0, so
`sources.read_id_map` recovers all 16 bits. Class ids (0-22, SYNTHIA README)
map to the 16-class protocol with `tables.SYNTHIA_ID_TO_TRAIN_ID16` (SYNTHIA's
terrain, truck, train and the unlabelled classes -> 255). Every split name
returns all images (SYNTHIA is a source domain only).
"""

import os

from jaxda.data import errors
from jaxda.data import sources
from jaxda.data import tables

LAYOUT = ('ROOT/RGB/*.png (RGB) and ROOT/GT/LABELS/*.png (16-bit, class id '
          'in the first channel, same file names)')


class Synthia(sources.PairedFiles):
  """Random-access SYNTHIA source in the 16 classes of `tables`.

  Args:
    root: directory holding RGB/ and GT/LABELS/.
    split: ignored (every image).
    resize_mismatched_labels: resize a label whose size differs from its
      image (nearest) instead of raising.
  """

  name = 'SYNTHIA'
  layout = LAYOUT
  class_names = tables.SYNTHIA16_CLASSES
  palette = tables.SYNTHIA16_PALETTE
  table = tables.SYNTHIA_ID_TO_TRAIN_ID16
  num_ids = tables.SYNTHIA_NUM_LABEL_IDS

  def __init__(self, root, split='train', resize_mismatched_labels=False):
    super().__init__(root, split, resize_mismatched_labels)
    sources.require_dir(root, self.name, LAYOUT)
    image_dir = os.path.join(root, 'RGB')
    label_dir = os.path.join(root, 'GT', 'LABELS')
    sources.require_dir(image_dir, self.name, LAYOUT)
    sources.require_dir(label_dir, self.name, LAYOUT)
    names = sources.list_files(image_dir, '.png', self.name, LAYOUT)
    labels = set(os.listdir(label_dir))
    missing = [n for n in names if n not in labels]
    if missing:
      raise errors.DataError(
          f'SYNTHIA: image {os.path.join(image_dir, missing[0])} has no '
          f'label {os.path.join(label_dir, missing[0])} ({len(missing)} '
          f'images lack labels); expected layout: {LAYOUT}')
    self.pairs = [(os.path.join(image_dir, n), os.path.join(label_dir, n))
                  for n in names]
    self.ids = [os.path.splitext(n)[0] for n in names]
    self._finish()
