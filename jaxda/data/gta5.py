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

from jaxda.data import errors
from jaxda.data import sources
from jaxda.data import tables

LAYOUT = ('ROOT/images/*.png (RGB) and ROOT/labels/*.png (Cityscapes label '
          'ids, same file names)')


class GTA5(sources.PairedFiles):
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
    sources.require_dir(root, self.name, LAYOUT)
    image_dir = os.path.join(root, 'images')
    label_dir = os.path.join(root, 'labels')
    sources.require_dir(image_dir, self.name, LAYOUT)
    sources.require_dir(label_dir, self.name, LAYOUT)
    names = sources.list_files(image_dir, '.png', self.name, LAYOUT)
    labels = set(os.listdir(label_dir))
    missing = [n for n in names if n not in labels]
    if missing:
      raise errors.DataError(
          f'GTA5: image {os.path.join(image_dir, missing[0])} has no label '
          f'{os.path.join(label_dir, missing[0])} ({len(missing)} images '
          f'lack labels); expected layout: {LAYOUT}')
    self.pairs = [(os.path.join(image_dir, n), os.path.join(label_dir, n))
                  for n in names]
    self.ids = [os.path.splitext(n)[0] for n in names]
    self._finish()
