"""Class names, colour palettes and id maps of the real benchmarks (one place).

Every lookup table is a NumPy array indexed by the id it maps *from*
(`LABEL_ID_TO_TRAIN_ID[label_id]`, `TRAIN_ID_TO_LABEL_ID[train_id]`), built
from explicit (from, to) rows and never from dict iteration order: CRST built
its trainId -> labelId table by iterating a dict made from `reversed(labels)`,
which under Python >= 3.7 reverses the table and permutes every class
(METHODS.md §3.7, CRST #31).

Sources:

* Cityscapes: `cityscapesscripts/helpers/labels.py` (name, id, trainId,
  colour of the 35 rows); the 19 evaluated classes are the rows with a
  trainId in [0, 19). GTA5 label PNGs use the same label ids (AdaptSegNet
  `dataset/cityscapes_list/info.json`, `label2train`).
* SYNTHIA-RAND-CITYSCAPES: the class table of the SYNTHIA README (ids 0-22);
  the 16-class protocol (the 19 Cityscapes classes minus terrain, truck and
  train) and its 13-class subset mIoU* (minus wall, fence, pole) follow
  CBST #7 and the ADVENT / CRST SYNTHIA loaders.
* Office-31 (Saenko et al. 2010) and Office-Home (Venkateswara et al. 2017):
  the class folder names of the distributed archives; class index = position
  in the sorted folder names (torchvision `ImageFolder` order).
"""

import numpy as np

from jaxda import types

# cityscapesscripts labels.py: (name, id, trainId, colour). trainId 255 and
# -1 are not evaluated. 'license plate' has id -1: it never occurs in the
# *_labelIds.png files (uint8), only in the instance annotations.
CITYSCAPES_LABELS = (
    ('unlabeled', 0, 255, (0, 0, 0)),
    ('ego vehicle', 1, 255, (0, 0, 0)),
    ('rectification border', 2, 255, (0, 0, 0)),
    ('out of roi', 3, 255, (0, 0, 0)),
    ('static', 4, 255, (0, 0, 0)),
    ('dynamic', 5, 255, (111, 74, 0)),
    ('ground', 6, 255, (81, 0, 81)),
    ('road', 7, 0, (128, 64, 128)),
    ('sidewalk', 8, 1, (244, 35, 232)),
    ('parking', 9, 255, (250, 170, 160)),
    ('rail track', 10, 255, (230, 150, 140)),
    ('building', 11, 2, (70, 70, 70)),
    ('wall', 12, 3, (102, 102, 156)),
    ('fence', 13, 4, (190, 153, 153)),
    ('guard rail', 14, 255, (180, 165, 180)),
    ('bridge', 15, 255, (150, 100, 100)),
    ('tunnel', 16, 255, (150, 120, 90)),
    ('pole', 17, 5, (153, 153, 153)),
    ('polegroup', 18, 255, (153, 153, 153)),
    ('traffic light', 19, 6, (250, 170, 30)),
    ('traffic sign', 20, 7, (220, 220, 0)),
    ('vegetation', 21, 8, (107, 142, 35)),
    ('terrain', 22, 9, (152, 251, 152)),
    ('sky', 23, 10, (70, 130, 180)),
    ('person', 24, 11, (220, 20, 60)),
    ('rider', 25, 12, (255, 0, 0)),
    ('car', 26, 13, (0, 0, 142)),
    ('truck', 27, 14, (0, 0, 70)),
    ('bus', 28, 15, (0, 60, 100)),
    ('caravan', 29, 255, (0, 0, 90)),
    ('trailer', 30, 255, (0, 0, 110)),
    ('train', 31, 16, (0, 80, 100)),
    ('motorcycle', 32, 17, (0, 0, 230)),
    ('bicycle', 33, 18, (119, 11, 32)),
    ('license plate', -1, -1, (0, 0, 142)),
)
# Label ids that may appear in *_labelIds.png (Cityscapes) or GTA5 labels.
CITYSCAPES_NUM_LABEL_IDS = 34


def _train_rows(rows):
  return sorted((r for r in rows if 0 <= r[2] < types.IGNORE_LABEL),
                key=lambda r: r[2])


CITYSCAPES_CLASSES = tuple(r[0] for r in _train_rows(CITYSCAPES_LABELS))
CITYSCAPES_PALETTE = np.asarray([r[3] for r in _train_rows(CITYSCAPES_LABELS)],
                                np.uint8)  # (19, 3) RGB, row = trainId.


def _lookup(pairs, size=256, fill=types.IGNORE_LABEL):
  """A uint8 (size,) table: table[a] = b for every (a, b), else `fill`."""
  table = np.full(size, fill, np.uint8)
  for a, b in pairs:
    table[a] = b
  return table


# (256,) uint8: labelId -> trainId (255 for every unevaluated or unknown id).
LABEL_ID_TO_TRAIN_ID = _lookup(
    (r[1], r[2]) for r in CITYSCAPES_LABELS if r[1] >= 0)
# (19,) uint8: trainId -> labelId ([7, 8, 11, ..., 33], not the reverse).
TRAIN_ID_TO_LABEL_ID = np.asarray(
    [r[1] for r in _train_rows(CITYSCAPES_LABELS)], np.uint8)
# GTA5 label PNGs use the Cityscapes label ids.
GTA5_ID_TO_TRAIN_ID = LABEL_ID_TO_TRAIN_ID
GTA5_NUM_LABEL_IDS = CITYSCAPES_NUM_LABEL_IDS

# SYNTHIA README: class id -> name (ids 0..22 in GT/LABELS, first channel).
SYNTHIA_LABELS = (
    'void', 'sky', 'building', 'road', 'sidewalk', 'fence', 'vegetation',
    'pole', 'car', 'traffic sign', 'pedestrian', 'bicycle', 'motorcycle',
    'parking-slot', 'road-work', 'traffic light', 'terrain', 'rider', 'truck',
    'bus', 'train', 'wall', 'lanemarking')
SYNTHIA_NUM_LABEL_IDS = len(SYNTHIA_LABELS)
# The 16 classes trained on SYNTHIA: Cityscapes' 19 minus terrain (9), truck
# (14) and train (16), in Cityscapes trainId order.
SYNTHIA16_TO_CITYSCAPES19 = np.asarray(
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18], np.uint8)
SYNTHIA16_CLASSES = tuple(CITYSCAPES_CLASSES[i]
                          for i in SYNTHIA16_TO_CITYSCAPES19)
SYNTHIA16_PALETTE = CITYSCAPES_PALETTE[SYNTHIA16_TO_CITYSCAPES19]
# (256,) uint8: SYNTHIA class id -> 16-class index (255 = ignore; SYNTHIA's
# own terrain, truck and train pixels are ignored in this protocol).
SYNTHIA_ID_TO_TRAIN_ID16 = _lookup((
    (3, 0), (4, 1), (2, 2), (21, 3), (5, 4), (7, 5), (15, 6), (9, 7),
    (6, 8), (1, 9), (10, 10), (17, 11), (8, 12), (19, 13), (12, 14),
    (11, 15)))
# (256,) uint8: Cityscapes trainId (19) -> 16-class index, to evaluate a
# SYNTHIA-trained model on Cityscapes.
CITYSCAPES19_TO_SYNTHIA16 = _lookup(
    (int(c), i) for i, c in enumerate(SYNTHIA16_TO_CITYSCAPES19))
# mIoU* (13 classes): indices of the 16-class order without wall, fence,
# pole (3, 4, 5).
SYNTHIA13_INDICES = tuple(i for i in range(16) if i not in (3, 4, 5))
SYNTHIA13_CLASSES = tuple(SYNTHIA16_CLASSES[i] for i in SYNTHIA13_INDICES)

# Office-31: three domains, 31 classes (folder names, sorted).
OFFICE31_DOMAINS = ('amazon', 'dslr', 'webcam')
OFFICE31_CLASSES = (
    'back_pack', 'bike', 'bike_helmet', 'bookcase', 'bottle', 'calculator',
    'desk_chair', 'desk_lamp', 'desktop_computer', 'file_cabinet',
    'headphones', 'keyboard', 'laptop_computer', 'letter_tray',
    'mobile_phone', 'monitor', 'mouse', 'mug', 'paper_notebook', 'pen',
    'phone', 'printer', 'projector', 'punchers', 'ring_binder', 'ruler',
    'scissors', 'speaker', 'stapler', 'tape_dispenser', 'trash_can')
# Office-Home: four domains ('Real World' has a space in the distributed
# archive; tllib renames it 'Real_World'), 65 classes (folder names, sorted).
OFFICEHOME_DOMAINS = ('Art', 'Clipart', 'Product', 'Real World')
OFFICEHOME_CLASSES = (
    'Alarm_Clock', 'Backpack', 'Batteries', 'Bed', 'Bike', 'Bottle',
    'Bucket', 'Calculator', 'Calendar', 'Candles', 'Chair', 'Clipboards',
    'Computer', 'Couch', 'Curtains', 'Desk_Lamp', 'Drill', 'Eraser',
    'Exit_Sign', 'Fan', 'File_Cabinet', 'Flipflops', 'Flowers', 'Folder',
    'Fork', 'Glasses', 'Hammer', 'Helmet', 'Kettle', 'Keyboard', 'Knives',
    'Lamp_Shade', 'Laptop', 'Marker', 'Monitor', 'Mop', 'Mouse', 'Mug',
    'Notebook', 'Oven', 'Pan', 'Paper_Clip', 'Pen', 'Pencil', 'Postit_Notes',
    'Printer', 'Push_Pin', 'Radio', 'Refrigerator', 'Ruler', 'Scissors',
    'Screwdriver', 'Shelf', 'Sink', 'Sneakers', 'Soda', 'Speaker', 'Spoon',
    'TV', 'Table', 'Telephone', 'ToothBrush', 'Toys', 'Trash_Can', 'Webcam')

DIGIT_CLASSES = tuple(str(i) for i in range(10))

