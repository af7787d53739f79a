"""Real-benchmark readers on tiny files written in the distributed layouts.

Every reader is checked on files this test writes exactly as the archives lay
them out (PNG via PIL, 16-bit PNG written byte by byte, idx.gz, LIBSVM bz2,
MATLAB .mat), against the official id tables typed in here independently of
`jaxda.data.tables`; the full-resolution evaluation against a NumPy
reference; and one tiny training run GTA5-layout -> Cityscapes-layout.
"""

import bz2
import collections
import gzip
import json
import os
import struct
import zlib

import chex
import flax.linen as nn
import jax
import numpy as np
from PIL import Image
import pytest

from experiments.configs import source_only
from jaxda import parallel
from jaxda.tasks import full_resolution
from jaxda import methods
from jaxda.data import augment
from jaxda.data.readers import cityscapes
from jaxda.data.readers import digit_files
from jaxda.data import errors
from jaxda.data.readers import gta5
from jaxda.data.readers import office
from jaxda.data import pipeline
from jaxda.data.readers import common
from jaxda.data.readers import synthia
from jaxda.data import tables
from jaxda.methods import base

# cityscapesscripts/helpers/labels.py, typed row by row:
# (name, id, trainId, category, catId, hasInstances, ignoreInEval, color).
OFFICIAL_CITYSCAPES = [
    ('unlabeled', 0, 255, 'void', 0, False, True, (0, 0, 0)),
    ('ego vehicle', 1, 255, 'void', 0, False, True, (0, 0, 0)),
    ('rectification border', 2, 255, 'void', 0, False, True, (0, 0, 0)),
    ('out of roi', 3, 255, 'void', 0, False, True, (0, 0, 0)),
    ('static', 4, 255, 'void', 0, False, True, (0, 0, 0)),
    ('dynamic', 5, 255, 'void', 0, False, True, (111, 74, 0)),
    ('ground', 6, 255, 'void', 0, False, True, (81, 0, 81)),
    ('road', 7, 0, 'flat', 1, False, False, (128, 64, 128)),
    ('sidewalk', 8, 1, 'flat', 1, False, False, (244, 35, 232)),
    ('parking', 9, 255, 'flat', 1, False, True, (250, 170, 160)),
    ('rail track', 10, 255, 'flat', 1, False, True, (230, 150, 140)),
    ('building', 11, 2, 'construction', 2, False, False, (70, 70, 70)),
    ('wall', 12, 3, 'construction', 2, False, False, (102, 102, 156)),
    ('fence', 13, 4, 'construction', 2, False, False, (190, 153, 153)),
    ('guard rail', 14, 255, 'construction', 2, False, True,
     (180, 165, 180)),
    ('bridge', 15, 255, 'construction', 2, False, True, (150, 100, 100)),
    ('tunnel', 16, 255, 'construction', 2, False, True, (150, 120, 90)),
    ('pole', 17, 5, 'object', 3, False, False, (153, 153, 153)),
    ('polegroup', 18, 255, 'object', 3, False, True, (153, 153, 153)),
    ('traffic light', 19, 6, 'object', 3, False, False, (250, 170, 30)),
    ('traffic sign', 20, 7, 'object', 3, False, False, (220, 220, 0)),
    ('vegetation', 21, 8, 'nature', 4, False, False, (107, 142, 35)),
    ('terrain', 22, 9, 'nature', 4, False, False, (152, 251, 152)),
    ('sky', 23, 10, 'sky', 5, False, False, (70, 130, 180)),
    ('person', 24, 11, 'human', 6, True, False, (220, 20, 60)),
    ('rider', 25, 12, 'human', 6, True, False, (255, 0, 0)),
    ('car', 26, 13, 'vehicle', 7, True, False, (0, 0, 142)),
    ('truck', 27, 14, 'vehicle', 7, True, False, (0, 0, 70)),
    ('bus', 28, 15, 'vehicle', 7, True, False, (0, 60, 100)),
    ('caravan', 29, 255, 'vehicle', 7, True, True, (0, 0, 90)),
    ('trailer', 30, 255, 'vehicle', 7, True, True, (0, 0, 110)),
    ('train', 31, 16, 'vehicle', 7, True, False, (0, 80, 100)),
    ('motorcycle', 32, 17, 'vehicle', 7, True, False, (0, 0, 230)),
    ('bicycle', 33, 18, 'vehicle', 7, True, False, (119, 11, 32)),
    ('license plate', -1, -1, 'vehicle', 7, False, True, (0, 0, 142)),
]
# AdaptSegNet dataset/cityscapes_list/info.json "label2train" (METHODS §3.7).
INFO_JSON_LABEL2TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6,
                         20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
                         27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# SYNTHIA README class table (id: name) and the ADVENT/CRST 16-class map.
OFFICIAL_SYNTHIA = {
    0: 'void', 1: 'sky', 2: 'building', 3: 'road', 4: 'sidewalk',
    5: 'fence', 6: 'vegetation', 7: 'pole', 8: 'car', 9: 'traffic sign',
    10: 'pedestrian', 11: 'bicycle', 12: 'motorcycle', 13: 'parking-slot',
    14: 'road-work', 15: 'traffic light', 16: 'terrain', 17: 'rider',
    18: 'truck', 19: 'bus', 20: 'train', 21: 'wall', 22: 'lanemarking'}
SYNTHIA_ID_TO_16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8,
                    1: 9, 10: 10, 17: 11, 8: 12, 19: 13, 12: 14, 11: 15}
OFFICIAL_16 = ['road', 'sidewalk', 'building', 'wall', 'fence', 'pole',
               'traffic light', 'traffic sign', 'vegetation', 'sky', 'person',
               'rider', 'car', 'bus', 'motorcycle', 'bicycle']


def _official_train_id(label_ids):
  """labelId -> trainId from the typed labels.py rows (255 otherwise)."""
  lut = {row[1]: (row[2] if 0 <= row[2] < 255 else 255)
         for row in OFFICIAL_CITYSCAPES}
  return np.vectorize(lambda v: lut.get(int(v), 255))(label_ids).astype(
      np.uint8)


# --------------------------------------------------------------------------
# Writers of the real layouts
# --------------------------------------------------------------------------


def _png16(path, arr, filters=True):
  """Writes uint16 (H, W, C) as a 16-bit PNG, byte by byte (PIL cannot).

  Rows alternate filter type 0 (None) and 2 (Up) when `filters`, so the
  reader's unfiltering is exercised.
  """
  h, w, c = arr.shape
  colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
  rows = [arr[r].astype('>u2').tobytes() for r in range(h)]
  raw = b''
  for r, row in enumerate(rows):
    if filters and r % 2 == 1:
      prev = np.frombuffer(rows[r - 1], np.uint8).astype(np.int32)
      cur = np.frombuffer(row, np.uint8).astype(np.int32)
      raw += b'\x02' + ((cur - prev) % 256).astype(np.uint8).tobytes()
    else:
      raw += b'\x00' + row

  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data +
            struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF))

  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n'
            + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, colour_type,
                                         0, 0, 0))
            + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def _palette_png(path, ids):
  """GTA5-style label: palette PNG whose indices are the label ids."""
  img = Image.fromarray(ids.astype(np.uint8), mode='P')
  img.putpalette([v for row in OFFICIAL_CITYSCAPES if row[1] >= 0
                  for v in row[7]] + [0] * 3 * (256 - 34))
  img.save(path)


def _make_gta5(root, rng, n=3, size=(12, 20)):
  os.makedirs(os.path.join(root, 'images'))
  os.makedirs(os.path.join(root, 'labels'))
  images, ids = [], []
  for i in range(n):
    image = rng.integers(0, 256, size + (3,), dtype=np.uint8)
    label = rng.integers(0, 34, size)
    Image.fromarray(image).save(os.path.join(root, 'images', f'{i:05d}.png'))
    _palette_png(os.path.join(root, 'labels', f'{i:05d}.png'), label)
    images.append(image)
    ids.append(label)
  return np.stack(images), np.stack(ids)


def _make_cityscapes(root, split, rng, cities=('aachen', 'bochum'),
                     per_city=2, size=(16, 32), labels=True):
  images, ids = [], []
  for city in cities:
    os.makedirs(os.path.join(root, 'leftImg8bit', split, city))
    if labels:
      os.makedirs(os.path.join(root, 'gtFine', split, city), exist_ok=True)
    for j in range(per_city):
      stem = f'{city}_{j:06d}_000019'
      image = rng.integers(0, 256, size + (3,), dtype=np.uint8)
      label = rng.integers(0, 34, size).astype(np.uint8)
      Image.fromarray(image).save(os.path.join(
          root, 'leftImg8bit', split, city, stem + '_leftImg8bit.png'))
      if labels:
        Image.fromarray(label, mode='L').save(os.path.join(
            root, 'gtFine', split, city, stem + '_gtFine_labelIds.png'))
        # The archives hold colour/instance files beside the label ids.
        Image.fromarray(image).save(os.path.join(
            root, 'gtFine', split, city, stem + '_gtFine_color.png'))
      images.append(image)
      ids.append(label)
  return np.stack(images), np.stack(ids)


# --------------------------------------------------------------------------
# Tables vs the official lists
# --------------------------------------------------------------------------


def test_cityscapes_tables_match_labels_py():
  train_rows = sorted((r for r in OFFICIAL_CITYSCAPES if 0 <= r[2] < 255),
                      key=lambda r: r[2])
  assert tables.CITYSCAPES_CLASSES == tuple(r[0] for r in train_rows)
  np.testing.assert_array_equal(tables.CITYSCAPES_PALETTE,
                                [r[7] for r in train_rows])
  all_ids = np.arange(256)
  np.testing.assert_array_equal(tables.LABEL_ID_TO_TRAIN_ID,
                                _official_train_id(all_ids))
  # Same as AdaptSegNet's info.json; every other id is ignored.
  expected = np.full(256, 255)
  for k, v in INFO_JSON_LABEL2TRAIN.items():
    expected[k] = v
  np.testing.assert_array_equal(tables.LABEL_ID_TO_TRAIN_ID, expected)
  np.testing.assert_array_equal(tables.GTA5_ID_TO_TRAIN_ID, expected)
  # trainId -> labelId in trainId order (CRST's Python 3 table is reversed).
  np.testing.assert_array_equal(tables.TRAIN_ID_TO_LABEL_ID,
                                sorted(INFO_JSON_LABEL2TRAIN))
  assert tables.TRAIN_ID_TO_LABEL_ID[0] == 7
  assert tables.TRAIN_ID_TO_LABEL_ID[-1] == 33
  # Round trip trainId -> labelId -> trainId.
  np.testing.assert_array_equal(
      tables.LABEL_ID_TO_TRAIN_ID[tables.TRAIN_ID_TO_LABEL_ID], np.arange(19))
  full = [(r[0], r[1], r[2], r[7]) for r in OFFICIAL_CITYSCAPES]
  assert list(tables.CITYSCAPES_LABELS) == full


def test_synthia_tables_match_official():
  assert dict(enumerate(tables.SYNTHIA_LABELS)) == OFFICIAL_SYNTHIA
  expected = np.full(256, 255)
  for k, v in SYNTHIA_ID_TO_16.items():
    expected[k] = v
  np.testing.assert_array_equal(tables.SYNTHIA_ID_TO_TRAIN_ID16, expected)
  assert list(tables.SYNTHIA16_CLASSES) == OFFICIAL_16
  # 13-class mIoU* drops wall, fence, pole.
  assert list(tables.SYNTHIA13_CLASSES) == [
      c for c in OFFICIAL_16 if c not in ('wall', 'fence', 'pole')]
  # The 16 classes are the 19 minus terrain, truck, train, in trainId order.
  names19 = [r[0] for r in sorted((r for r in OFFICIAL_CITYSCAPES
                                   if 0 <= r[2] < 255), key=lambda r: r[2])]
  assert OFFICIAL_16 == [c for c in names19
                         if c not in ('terrain', 'truck', 'train')]
  for i19, name in enumerate(names19):
    want = OFFICIAL_16.index(name) if name in OFFICIAL_16 else 255
    assert tables.CITYSCAPES19_TO_SYNTHIA16[i19] == want
  # A SYNTHIA id and the Cityscapes label id of the same class agree.
  for sid, i16 in SYNTHIA_ID_TO_16.items():
    name = OFFICIAL_SYNTHIA[sid].replace('pedestrian', 'person')
    assert OFFICIAL_16[i16] == name


def test_office_tables():
  assert len(tables.OFFICE31_CLASSES) == 31
  assert len(tables.OFFICEHOME_CLASSES) == 65
  assert list(tables.OFFICE31_CLASSES) == sorted(tables.OFFICE31_CLASSES)
  assert list(tables.OFFICEHOME_CLASSES) == sorted(tables.OFFICEHOME_CLASSES)
  # tllib's OfficeHome.CLASSES (its own order) holds the same 65 names.
  tllib = ('Drill Exit_Sign Bottle Glasses Computer File_Cabinet Shelf Toys '
           'Sink Laptop Kettle Folder Keyboard Flipflops Pencil Bed Hammer '
           'ToothBrush Couch Bike Postit_Notes Mug Webcam Desk_Lamp '
           'Telephone Helmet Mouse Pen Monitor Mop Sneakers Notebook '
           'Backpack Alarm_Clock Push_Pin Paper_Clip Batteries Radio Fan '
           'Ruler Pan Screwdriver Trash_Can Printer Speaker Eraser Bucket '
           'Chair Calendar Calculator Flowers Lamp_Shade Spoon Candles '
           'Clipboards Scissors TV Curtains Fork Soda Table Knives Oven '
           'Refrigerator Marker').split()
  assert set(tllib) == set(tables.OFFICEHOME_CLASSES)
  assert tables.OFFICE31_DOMAINS == ('amazon', 'dslr', 'webcam')
  assert 'Real World' in tables.OFFICEHOME_DOMAINS


# --------------------------------------------------------------------------
# Segmentation readers
# --------------------------------------------------------------------------


def test_read_id_map_keeps_16_bits(tmp_path):
  rng = np.random.default_rng(1)
  for channels in (1, 2, 3, 4):
    arr = rng.integers(0, 65536, (7, 9, channels)).astype(np.uint16)
    # First column < 256, the rest any 16-bit value.
    arr[:, 0, 0] = rng.integers(0, 256, 7)
    path = str(tmp_path / f'{channels}.png')
    _png16(path, arr)
    np.testing.assert_array_equal(common.read_id_map(path),
                                  arr[..., 0].astype(np.int32))
  # 8-bit labels: the first channel (palette index for mode P).
  Image.fromarray(arr[..., 0].astype(np.uint8), mode='L').save(
      str(tmp_path / 'l.png'))
  np.testing.assert_array_equal(common.read_id_map(str(tmp_path / 'l.png')),
                                arr[..., 0].astype(np.uint8))


def test_gta5_reader(tmp_path):
  rng = np.random.default_rng(0)
  images, ids = _make_gta5(str(tmp_path), rng)
  src = gta5.GTA5(str(tmp_path))
  assert len(src) == 3
  assert '3 images' in src.summary
  for i in range(3):
    ex = src[i]
    chex.assert_type(ex['image'], np.uint8)
    np.testing.assert_array_equal(ex['image'], images[i])
    np.testing.assert_array_equal(ex['label'], _official_train_id(ids[i]))
  assert src.class_names == tables.CITYSCAPES_CLASSES


def test_gta5_errors(tmp_path):
  rng = np.random.default_rng(0)
  root = str(tmp_path / 'gta')
  missing = str(tmp_path / 'nope')
  with pytest.raises(errors.DataError, match='nope.*images/'):
    gta5.GTA5(missing)
  _make_gta5(root, rng)
  # Label id 40 is not a GTA5 / Cityscapes label id.
  bad = rng.integers(0, 34, (12, 20))
  bad[3, 4] = 40
  _palette_png(os.path.join(root, 'labels', '00001.png'), bad)
  with pytest.raises(errors.DataError, match=r'00001\.png.*\[40\]'):
    gta5.GTA5(root)[1]
  # Label of another size than its image.
  _palette_png(os.path.join(root, 'labels', '00001.png'),
               rng.integers(0, 34, (10, 20)))
  with pytest.raises(errors.DataError, match=r'labels/00001\.png is 20x10'):
    gta5.GTA5(root)[1]
  resized = gta5.GTA5(root, resize_mismatched_labels=True)[1]['label']
  assert resized.shape == (12, 20)
  # Corrupt (truncated) image.
  path = os.path.join(root, 'images', '00002.png')
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(errors.DataError, match=r'images/00002\.png'):
    gta5.GTA5(root)[2]
  # An image without its label.
  os.remove(os.path.join(root, 'labels', '00000.png'))
  with pytest.raises(errors.DataError, match=r'00000\.png has no label'):
    gta5.GTA5(root)


def test_cityscapes_reader(tmp_path):
  rng = np.random.default_rng(2)
  root = str(tmp_path)
  images, ids = _make_cityscapes(root, 'val', rng)
  _make_cityscapes(root, 'train', rng, labels=False)
  src = cityscapes.Cityscapes(root, 'val')
  assert len(src) == 4 and '4 images' in src.summary
  assert src.ids[0] == 'aachen_000000_000019'
  for i in range(4):
    np.testing.assert_array_equal(src[i]['image'], images[i])
    np.testing.assert_array_equal(src[i]['label'],
                                  _official_train_id(ids[i]))
  # 16-class protocol: terrain, truck, train -> ignore; the rest renumbered.
  src16 = cityscapes.Cityscapes(root, 'val', num_classes=16)
  names19 = tables.CITYSCAPES_CLASSES
  for i in range(4):
    t19 = _official_train_id(ids[i])
    want = np.vectorize(
        lambda v: OFFICIAL_16.index(names19[v])
        if v < 19 and names19[v] in OFFICIAL_16 else 255)(t19)
    np.testing.assert_array_equal(src16[i]['label'], want)
  # Unlabelled train split: images only.
  train = cityscapes.Cityscapes(root, 'train')
  assert not train.has_labels and 'label' not in train[0]
  with pytest.raises(errors.DataError, match='labels are required'):
    pipeline.load_domain('cityscapes', data_dir=root, split='train')
  with pytest.raises(errors.DataError,
                     match=r'leftImg8bit/test.*leftImg8bit/<split>/<city>'):
    cityscapes.Cityscapes(root, 'test')


def test_synthia_reader(tmp_path):
  rng = np.random.default_rng(3)
  root = str(tmp_path)
  os.makedirs(os.path.join(root, 'RGB'))
  os.makedirs(os.path.join(root, 'GT', 'LABELS'))
  images, ids = [], []
  for i in range(2):
    image = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    gt = np.zeros((10, 14, 3), np.uint16)
    gt[..., 0] = rng.integers(0, 23, (10, 14))
    gt[..., 1] = rng.integers(0, 60000, (10, 14))  # Instance ids.
    Image.fromarray(image).save(os.path.join(root, 'RGB', f'{i:07d}.png'))
    _png16(os.path.join(root, 'GT', 'LABELS', f'{i:07d}.png'), gt)
    images.append(image)
    ids.append(gt[..., 0])
  src = synthia.Synthia(root)
  assert len(src) == 2 and src.class_names == tuple(OFFICIAL_16)
  for i in range(2):
    np.testing.assert_array_equal(src[i]['image'], images[i])
    want = np.vectorize(lambda v: SYNTHIA_ID_TO_16.get(int(v), 255))(ids[i])
    np.testing.assert_array_equal(src[i]['label'], want)
  # An id >= 256 is caught, not aliased to its low byte by an 8-bit read.
  gt = np.full((10, 14, 3), 3, np.uint16)
  gt[0, 0, 0] = 256 + 3
  _png16(os.path.join(root, 'GT', 'LABELS', '0000001.png'), gt)
  with pytest.raises(errors.DataError, match=r'0000001\.png.*\[259\]'):
    src[1]
  with pytest.raises(errors.DataError, match=r'GT/LABELS'):
    synthia.Synthia(str(tmp_path / 'RGB'))


# --------------------------------------------------------------------------
# Classification readers
# --------------------------------------------------------------------------


def _write_jpg(path, rng, size=(9, 11)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(
      path, quality=95)


def test_office_readers(tmp_path):
  rng = np.random.default_rng(4)
  root31 = str(tmp_path / 'office31')
  for cls, k in (('mug', 2), ('back_pack', 1), ('trash_can', 1)):
    for j in range(k):
      _write_jpg(os.path.join(root31, 'amazon', 'images', cls,
                              f'frame_{j:04d}.jpg'), rng)
  src = office.Office(root31, 'office31', 'A')
  assert len(src) == 4 and src.name == 'Office-31 amazon'
  # Class index = position in the sorted official list, not among present.
  mug = tables.OFFICE31_CLASSES.index('mug')
  np.testing.assert_array_equal(src.class_labels, [0, mug, mug, 30])
  assert src[0]['image'].shape == (9, 11, 3)
  domain = pipeline.load_domain('office31:amazon', data_dir=root31,
                                height=8, width=8)
  assert domain.images.shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(domain.labels, src.class_labels)
  with pytest.raises(errors.DataError, match=r'office31/webcam.*images/'):
    office.Office(root31, 'office31', 'webcam')
  os.makedirs(os.path.join(root31, 'amazon', 'images', 'cat'))
  with pytest.raises(errors.DataError, match=r'images/cat is not one'):
    office.Office(root31, 'office31', 'amazon')
  # Office-Home: 'Real World' with its space, aliases, no images/ level.
  root_oh = str(tmp_path / 'officehome')
  _write_jpg(os.path.join(root_oh, 'Real World', 'TV', '00001.jpg'), rng)
  _write_jpg(os.path.join(root_oh, 'Real World', 'Alarm_Clock', '00001.jpg'),
             rng)
  src = office.Office(root_oh, 'officehome', 'rw')
  np.testing.assert_array_equal(
      src.class_labels, [0, tables.OFFICEHOME_CLASSES.index('TV')])


def _idx(path, arr, magic):
  header = struct.pack('>I', magic) + b''.join(
      struct.pack('>I', d) for d in arr.shape)
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + arr.astype(np.uint8).tobytes())


def test_digit_files(tmp_path):
  rng = np.random.default_rng(5)
  mnist_dir = str(tmp_path / 'mnist')
  os.makedirs(mnist_dir)
  x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
  y = rng.integers(0, 10, 5).astype(np.uint8)
  _idx(os.path.join(mnist_dir, 'train-images-idx3-ubyte.gz'), x, 2051)
  _idx(os.path.join(mnist_dir, 'train-labels-idx1-ubyte.gz'), y, 2049)
  _idx(os.path.join(mnist_dir, 't10k-images-idx3-ubyte'), x[:2], 2051)
  _idx(os.path.join(mnist_dir, 't10k-labels-idx1-ubyte'), y[:2], 2049)
  src = digit_files.MNIST(mnist_dir, 'train')
  np.testing.assert_array_equal(src.images[..., 1], x)
  np.testing.assert_array_equal(src.class_labels, y)
  assert len(digit_files.MNIST(mnist_dir, 'val')) == 2
  # 'mnist' with the idx files in data_dir reads them (not the embedded set).
  domain = pipeline.load_domain('mnist', data_dir=mnist_dir, height=28,
                                width=28)
  np.testing.assert_array_equal(domain.images[..., 0], x)
  _idx(os.path.join(mnist_dir, 't10k-labels-idx1-ubyte'), y[:2], 2051)
  with pytest.raises(errors.DataError, match='t10k-labels.*magic'):
    digit_files.MNIST(mnist_dir, 'val')

  usps_dir = str(tmp_path / 'usps')
  os.makedirs(usps_dir)
  pix = rng.uniform(-1, 1, (3, 256))
  lab = [1, 10, 4]  # LIBSVM labels 1..10 = digits 0..9.
  with bz2.open(os.path.join(usps_dir, 'usps.bz2'), 'wt') as f:
    for k in range(3):
      f.write(f'{lab[k]} ' + ' '.join(
          f'{j + 1}:{pix[k, j]:.6f}' for j in range(256)) + '\n')
  src = digit_files.USPS(usps_dir, 'train')
  np.testing.assert_array_equal(src.class_labels, [0, 9, 3])
  np.testing.assert_allclose(src.images[..., 0].reshape(3, 256),
                             (pix + 1) * 127.5, atol=0.51)
  with pytest.raises(errors.DataError, match=r'usps\.t\.bz2'):
    digit_files.USPS(usps_dir, 'val')

  scipy_io = pytest.importorskip('scipy.io')
  svhn_dir = str(tmp_path / 'svhn')
  os.makedirs(svhn_dir)
  xs = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
  scipy_io.savemat(os.path.join(svhn_dir, 'train_32x32.mat'),
                   {'X': xs, 'y': np.array([[10], [1], [9], [10]])})
  src = digit_files.SVHN(svhn_dir, 'train')
  np.testing.assert_array_equal(src.class_labels, [0, 1, 9, 0])
  np.testing.assert_array_equal(src[2]['image'], xs[..., 2])
  with open(os.path.join(svhn_dir, 'test_32x32.mat'), 'wb') as f:
    f.write(b'not a mat file')
  with pytest.raises(errors.DataError, match=r'test_32x32\.mat'):
    digit_files.SVHN(svhn_dir, 'val')


# --------------------------------------------------------------------------
# Lazy views, batching, augmentation
# --------------------------------------------------------------------------


def test_lazy_domain_batches_equal_in_memory(tmp_path):
  rng = np.random.default_rng(6)
  images, ids = _make_gta5(str(tmp_path), rng, n=5)
  domain = pipeline.load_domain('gta5', data_dir=str(tmp_path))
  assert getattr(domain.images, 'is_lazy_source', False)
  assert domain.images.shape == (5, 12, 20, 3)
  labels = _official_train_id(ids)
  np.testing.assert_array_equal(np.asarray(domain.images), images)
  np.testing.assert_array_equal(domain.labels[[4, 0]], labels[[4, 0]])
  np.testing.assert_array_equal(domain.images[1:4][1], images[2])
  # Per-process sharding slices the file list without decoding anything.
  share = domain.images[parallel.shard_for_process(5, 1, 2)]
  assert getattr(share, 'is_lazy_source', False) and len(share) == 3
  np.testing.assert_array_equal(np.asarray(share), images[2:5])
  lazy = pipeline.train_batches(domain.images, domain.labels, batch_size=3,
                                seed=7, flip=True)
  eager = pipeline.train_batches(images, labels, batch_size=3, seed=7,
                                 flip=True)
  for _ in range(4):
    a, b = next(lazy), next(eager)
    for k in b:
      np.testing.assert_array_equal(a[k], b[k])
  # Resizing to the training size: bicubic images, nearest labels.
  small = pipeline.load_domain('gta5', data_dir=str(tmp_path), height=6,
                               width=10)
  want = np.asarray(Image.fromarray(labels[2]).resize((10, 6),
                                                      Image.NEAREST))
  np.testing.assert_array_equal(small.labels[2], want)
  np.testing.assert_array_equal(small.labels.native[2], labels[2])


def test_scale_crop_is_seeded_and_consistent():
  rng = np.random.default_rng(8)
  image = rng.normal(size=(2, 8, 12, 3)).astype(np.float32)
  label = rng.integers(0, 19, (2, 8, 12)).astype(np.int32)
  batch = {'image': image, 'label': label, 'index': np.arange(2)}

  def run(seed, step, **kw):
    return next(augment.scale_crop_batches(iter([batch]), seed=seed,
                                           start_step=step, **kw))

  # Scale 1 + crop: exactly a window of the input, the same for both arrays.
  out = run(0, 3, crop_size=(5, 7))
  chex.assert_shape(out['image'], (2, 5, 7, 3))
  for i in range(2):
    hits = [(t, l) for t in range(4) for l in range(6)
            if np.array_equal(out['image'][i], image[i, t:t + 5, l:l + 7])]
    assert len(hits) == 1
    t, l = hits[0]
    np.testing.assert_array_equal(out['label'][i], label[i, t:t + 5, l:l + 7])
  np.testing.assert_array_equal(out['index'], [0, 1])
  again = run(0, 3, crop_size=(5, 7))
  np.testing.assert_array_equal(out['image'], again['image'])
  other = run(0, 4, crop_size=(5, 7))
  assert not np.array_equal(out['image'], other['image'])
  # Downscale 0.5 into a larger crop: padded with 0 (image) / 255 (label).
  out = run(1, 0, scale_min=0.5, scale_max=0.5, crop_size=(8, 12))
  assert (out['label'] == 255).sum() == 2 * (8 * 12 - 4 * 6)
  assert set(np.unique(out['label'])) <= set(np.unique(label)) | {255}
  assert (out['image'][out['label'] == 255] == 0).all()
  # Scale grid of CRST: 0.5 .. 1.5 step 0.1.
  s = augment.draw_scales(np.random.default_rng(0), 1000, 0.5, 1.5, 0.1)
  np.testing.assert_allclose(np.unique(np.round(s, 6)),
                             np.round(np.arange(0.5, 1.55, 0.1), 6))
  assert augment.normalization_for('caffe_deeplab') == 'caffe_bgr'
  assert augment.normalization_for('torchvision') == 'imagenet'


# --------------------------------------------------------------------------
# Full-resolution evaluation
# --------------------------------------------------------------------------


def _upsample_align_corners_np(x, out_h, out_w):
  """NumPy reference: bilinear with align_corners=True, pixel by pixel."""
  b, h, w, c = x.shape
  out = np.zeros((b, out_h, out_w, c), np.float64)
  for i in range(out_h):
    y = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
    y0 = int(np.floor(y))
    y1 = min(y0 + 1, h - 1)
    fy = y - y0
    for j in range(out_w):
      xx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
      x0 = int(np.floor(xx))
      x1 = min(x0 + 1, w - 1)
      fx = xx - x0
      out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0]
                      + (1 - fy) * fx * x[:, y0, x1]
                      + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
  return out


class _StridedConv(nn.Module):
  """A stand-in segmenter: logits at 1/4 resolution, 19 classes."""

  @nn.compact
  def __call__(self, x, train_bn=False):
    del train_bn
    return {'main': nn.Conv(19, (4, 4), strides=(4, 4))(x)}


_State = collections.namedtuple('_State', ['params', 'batch_stats'])


def test_full_resolution_eval_counts_every_pixel_once(tmp_path):
  rng = np.random.default_rng(9)
  root = str(tmp_path)
  # 5 val images (not a multiple of the batch 2) with 24x40 labels; the
  # network sees them at 12x20.
  _, ids = _make_cityscapes(root, 'val', rng, cities=('a', 'b', 'c', 'd',
                                                      'e'),
                            per_city=1, size=(24, 40))
  labels = _official_train_id(ids)
  domain = pipeline.load_domain('cityscapes', data_dir=root, split='val',
                                height=12, width=20)
  batches = list(full_resolution.eval_batches(
      domain.images, domain.labels.native, batch_size=2, mode='unit'))
  assert len(batches) == 3
  np.testing.assert_array_equal(batches[-1]['mask'], [True, False])
  np.testing.assert_array_equal(batches[-1]['index'], [4, -1])
  assert (batches[-1]['label'][1] == 255).all()
  chex.assert_shape(batches[0]['image'], (2, 12, 20, 3))
  chex.assert_shape(batches[0]['label'], (2, 24, 40))

  segmenter = _StridedConv()
  variables = segmenter.init(jax.random.key(0),
                             np.zeros((1, 12, 20, 3), np.float32))
  state = _State(variables['params'], {})
  models = base.Models(segmenter, None)
  fn = jax.jit(full_resolution.make_confusion_fn(
      models, 19, bn_mode='frozen', align_corners=True))
  total = sum(np.asarray(fn(state, b), np.int64) for b in batches)
  # Reference: the same logits, upsampled by the NumPy loop, argmax.
  ref = np.zeros((19, 19), np.int64)
  main_logits = jax.jit(lambda s, x: base.forward(
      models, s.params, s.batch_stats, x, bn_mode='frozen', labelled=False,
      training=False)[0]['main'])
  for b in batches:
    logits = np.asarray(main_logits(state, b['image']), np.float64)
    up = _upsample_align_corners_np(logits, 24, 40)
    pred = up.argmax(-1)
    for k in np.flatnonzero(b['mask']):
      valid = b['label'][k] != 255
      np.add.at(ref, (b['label'][k][valid], pred[k][valid]), 1)
  np.testing.assert_array_equal(total, ref)
  assert total.sum() == (labels != 255).sum()  # Every pixel once.
  result = {}
  full_resolution.add_synthia13(result, total, tables.CITYSCAPES_CLASSES)
  assert 'miou13' not in result


def test_synthia13_miou():
  rng = np.random.default_rng(10)
  confusion = rng.integers(0, 50, (16, 16))
  confusion[7] = 0
  confusion[:, 7] = 0  # Class 7 absent: NaN IoU, left out of the mean.
  result = full_resolution.add_synthia13({}, confusion,
                                         tables.SYNTHIA16_CLASSES)
  ious = []
  for k in range(16):
    if OFFICIAL_16[k] in ('wall', 'fence', 'pole'):
      continue
    union = confusion[k].sum() + confusion[:, k].sum() - confusion[k, k]
    if union:
      ious.append(confusion[k, k] / union)
  assert len(ious) == 12
  np.testing.assert_allclose(result['miou13'], np.mean(ious))


# --------------------------------------------------------------------------
# TFDS builder without TensorFlow, and a training run
# --------------------------------------------------------------------------


def test_tfds_builder_without_tensorflow(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  from jaxda.data import tfds_builders  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(11)
  images, ids = _make_gta5(str(tmp_path / 'gta'), rng, n=2)
  builder = tfds_builders.builder('gta5', data_dir=str(tmp_path / 'tfds'),
                                  file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(tmp_path / 'gta')))
  source = builder.as_data_source()['train']
  assert len(source) == 2
  got = sorted((source[i] for i in range(2)), key=lambda e: e['id'])
  for i in range(2):
    np.testing.assert_array_equal(got[i]['image'], images[i])
    np.testing.assert_array_equal(got[i]['label'], _official_train_id(ids[i]))
  # A classification reader through the same registry-made builder: both
  # splits, integer labels.
  mnist_dir = str(tmp_path / 'mnist')
  os.makedirs(mnist_dir)
  x = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
  y = np.array([4, 0, 9], np.uint8)
  _idx(os.path.join(mnist_dir, 'train-images-idx3-ubyte'), x, 2051)
  _idx(os.path.join(mnist_dir, 'train-labels-idx1-ubyte'), y, 2049)
  _idx(os.path.join(mnist_dir, 't10k-images-idx3-ubyte'), x[:1], 2051)
  _idx(os.path.join(mnist_dir, 't10k-labels-idx1-ubyte'), y[:1], 2049)
  builder = tfds_builders.builder('mnist_files',
                                  data_dir=str(tmp_path / 'tfds'))
  assert builder.name == 'jaxda_mnist_files'
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=mnist_dir))
  splits = builder.as_data_source()
  assert sorted(splits) == ['train', 'validation']
  assert len(splits['validation']) == 1
  got = sorted((splits['train'][i] for i in range(3)),
               key=lambda e: int(e['id']))
  np.testing.assert_array_equal([e['label'] for e in got], y)
  np.testing.assert_array_equal(got[2]['image'][..., 0], x[2])
  with pytest.raises(errors.DataError, match='no TFDS builder'):
    tfds_builders.builder('synthetic')


# Slow (40 s of CI's 12 minutes): training through the GTA5/Cityscapes
# readers. In CI the readers themselves are tested above on the same fake
# trees; the R101 `paper` smoke (slow too) trains through them as well.
@pytest.mark.slow
def test_train_gta5_to_cityscapes_layout(tmp_path, monkeypatch):
  results = []
  evaluate = full_resolution.evaluate_target

  def spy(*args, **kwargs):
    results.append(evaluate(*args, **kwargs))
    return results[-1]

  monkeypatch.setattr(full_resolution, 'evaluate_target', spy)
  rng = np.random.default_rng(12)
  _make_gta5(str(tmp_path / 'gta5'), rng, n=4, size=(36, 64))
  city = str(tmp_path / 'cityscapes')
  _make_cityscapes(city, 'train', rng, per_city=2, size=(64, 128),
                   labels=False)
  _, ids = _make_cityscapes(city, 'val', rng, cities=('x', 'y', 'z'),
                            per_city=1, size=(64, 128))
  config = source_only.get_config('tiny')
  config.method = 'minent'  # Reads unlabelled target images; no D.
  config.num_steps = 2
  config.num_devices = 2  # Sharded batches, at a fraction of 8's compile.
  config.batch_size = 2
  config.eval.batch_size = 2
  config.eval.num_pictures = 1
  config.source.name = 'gta5'
  config.source.data_dir = str(tmp_path / 'gta5')
  config.target.name = 'cityscapes'
  config.target.data_dir = city
  config.data.height, config.data.width = 32, 64
  config.data.crop_height, config.data.crop_width = 32, 48
  config.data.scale_min, config.data.scale_max = 0.8, 1.2
  config.data.flip = True
  summary = methods.train_and_evaluate(config, str(tmp_path / 'run'))
  target = summary['target']
  assert target['num_images'] == 3
  with open(tmp_path / 'run' / 'summary.json') as f:
    written = json.load(f)
  assert written['target']['miou'] == target['miou']
  assert written['target']['num_pixels'] == (_official_train_id(ids)
                                             != 255).sum()
  assert len(results) == 1
  confusion = np.asarray(results[0]['confusion'])
  # Scored at the labels' 64x128 (input 32x64), every valid pixel once.
  assert confusion.sum() == (_official_train_id(ids) != 255).sum()
