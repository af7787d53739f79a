"""Cityscapes (Cordts et al. 2016) read from its distributed layout.

Layout (the leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip
archives extracted into one ROOT)::

  ROOT/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  ROOT/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Label ids map to the 19 train ids with `tables.LABEL_ID_TO_TRAIN_ID` (the
originals' `info.json`; every other id -> 255), or to the 16 SYNTHIA classes
with `num_classes=16` (terrain, truck and train -> 255) for SYNTHIA ->
Cityscapes. gtFine may be absent for an unlabelled target train split.
Train has 2,975 images and val 500; evaluation is at the labels' 2048x1024.
"""

import os

from jaxda.data import errors
from jaxda.data.readers import common
from jaxda.data import tables

LAYOUT = ('ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png and '
          'ROOT/gtFine/<split>/<city>/*_gtFine_labelIds.png')
IMAGE_SUFFIX = '_leftImg8bit.png'
LABEL_SUFFIX = '_gtFine_labelIds.png'


class Cityscapes(common.PairedFiles):
  """Random-access Cityscapes source: image (H, W, 3), train ids (H, W).

  Args:
    root: directory holding leftImg8bit/ (and gtFine/).
    split: 'train', 'val' or 'test' (a sub-folder of leftImg8bit/).
    num_classes: 19 (Cityscapes train ids) or 16 (SYNTHIA protocol).
    resize_mismatched_labels: resize a label whose size differs from its
      image (nearest) instead of raising.
  """

  layout = LAYOUT
  num_ids = tables.CITYSCAPES_NUM_LABEL_IDS
  # List files may name '<stem>_leftImg8bit.png' (`image_lists.list_stem`).
  stem_suffixes = (IMAGE_SUFFIX[:-len('.png')],)

  def __init__(self, root, split='train', num_classes=19,
               resize_mismatched_labels=False):
    super().__init__(root, split, resize_mismatched_labels)
    if num_classes == 19:
      self.name = 'Cityscapes'
      self.class_names = tables.CITYSCAPES_CLASSES
      self.palette = tables.CITYSCAPES_PALETTE
      self.table = tables.LABEL_ID_TO_TRAIN_ID
    elif num_classes == 16:
      self.name = 'Cityscapes (16 SYNTHIA classes)'
      self.class_names = tables.SYNTHIA16_CLASSES
      self.palette = tables.SYNTHIA16_PALETTE
      self.table = tables.CITYSCAPES19_TO_SYNTHIA16[
          tables.LABEL_ID_TO_TRAIN_ID]
    else:
      raise ValueError(f'num_classes must be 19 or 16, got {num_classes}')
    common.require_dir(root, 'Cityscapes', LAYOUT)
    image_root = os.path.join(root, 'leftImg8bit', split)
    label_root = os.path.join(root, 'gtFine', split)
    common.require_dir(image_root, 'Cityscapes', LAYOUT)
    has_labels = os.path.isdir(label_root)
    cities = sorted(c for c in os.listdir(image_root)
                    if os.path.isdir(os.path.join(image_root, c)))
    if not cities:
      raise errors.DataError(
          f'Cityscapes: no city folders in {image_root}; expected layout: '
          f'{LAYOUT}')
    for city in cities:
      for name in sorted(os.listdir(os.path.join(image_root, city))):
        if not name.endswith(IMAGE_SUFFIX):
          continue
        stem = name[:-len(IMAGE_SUFFIX)]
        label = None
        if has_labels:
          label = os.path.join(label_root, city, stem + LABEL_SUFFIX)
          if not os.path.isfile(label):
            raise errors.DataError(
                f'Cityscapes: image {os.path.join(image_root, city, name)} '
                f'has no label {label}; expected layout: {LAYOUT}')
        self.pairs.append((os.path.join(image_root, city, name), label))
        self.ids.append(stem)
    if not self.pairs:
      raise errors.DataError(
          f'Cityscapes: no *{IMAGE_SUFFIX} files under {image_root}; '
          f'expected layout: {LAYOUT}')
    self._finish()
