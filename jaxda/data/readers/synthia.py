"""SYNTHIA-RAND-CITYSCAPES (Ros et al. 2016) read from its distributed layout.

Layout::

  ROOT/RGB/0000000.png ...          RGB frames (1280x760), 9,400 of them
  ROOT/GT/LABELS/0000000.png ...    16-bit PNG; class id in the first
                                    channel, instance id in the second

The originals read the label with `imageio.imread(path, format='PNG-FI')
[:, :, 0]` (the first channel at full 16-bit depth); Pillow alone would keep
only the high byte of each 16-bit sample and read every id as 0, so
`common.read_id_map` recovers all 16 bits. Class ids (0-22, SYNTHIA README)
map to the 16-class protocol with `tables.SYNTHIA_ID_TO_TRAIN_ID16` (SYNTHIA's
terrain, truck, train and the unlabelled classes -> 255). Every split name
returns all images (SYNTHIA is a source domain only).
"""

import os

from jaxda.data.readers import common
from jaxda.data import tables

LAYOUT = ('ROOT/RGB/*.png (RGB) and ROOT/GT/LABELS/*.png (16-bit, class id '
          'in the first channel, same file names)')


class Synthia(common.PairedFiles):
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
    self._pair_same_names(os.path.join(root, 'RGB'),
                          os.path.join(root, 'GT', 'LABELS'))
