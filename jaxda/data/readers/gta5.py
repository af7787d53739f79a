"""GTA5 (Richter et al. 2016) read from its distributed layout.

Layout::

  ROOT/images/00001.png ... 24966.png   RGB frames (1914x1052)
  ROOT/labels/00001.png ...             label ids (Cityscapes label ids,
                                        palette PNG), same file names

Label ids are mapped to the 19 Cityscapes train ids with
`tables.GTA5_ID_TO_TRAIN_ID` (255 = ignore). GTA5 has no train/val split in
UDA use: every split name returns all images (AdaptSegNet and ADVENT train on
all 24,966; CRST's 19,984-image list is a subset, METHODS.md §3.8).
"""

import os

from jaxda.data.readers import common
from jaxda.data import tables

LAYOUT = ('ROOT/images/*.png (RGB) and ROOT/labels/*.png (Cityscapes label '
          'ids, same file names)')


class GTA5(common.PairedFiles):
  """Random-access GTA5 source: `src[i]` -> image (H, W, 3), label (H, W).

  Args:
    root: the directory holding images/ and labels/.
    split: ignored (every image; see the module docstring).
    resize_mismatched_labels: resize a label whose size differs from its
      image (nearest) instead of raising.
  """

  name = 'GTA5'
  layout = LAYOUT
  class_names = tables.CITYSCAPES_CLASSES
  palette = tables.CITYSCAPES_PALETTE
  table = tables.GTA5_ID_TO_TRAIN_ID
  num_ids = tables.GTA5_NUM_LABEL_IDS

  def __init__(self, root, split='train', resize_mismatched_labels=False):
    super().__init__(root, split, resize_mismatched_labels)
    self._pair_same_names(os.path.join(root, 'images'),
                          os.path.join(root, 'labels'))
