"""Tests of jaxda.data: synthetic benchmark, folder layout and batching."""

import os

import chex
import numpy as np
from PIL import Image
import pytest

from jaxda import parallel
from jaxda import visualize
from jaxda.data import errors
from jaxda.data.readers import folder
from jaxda.data import pipeline
from jaxda.data import registry
from jaxda.data.embedded import digits
from jaxda.data.embedded import synthetic

H, W = 32, 64  # Small scenes keep the whole file fast.


@pytest.fixture(scope='module')
def scenes():
  """48 labelled scenes per domain, generated once for the module."""
  return {d: synthetic.generate(d, 48, height=H, width=W, seed=3)
          for d in synthetic.DOMAINS}


# ----------------------------------------------------------------------------
# Synthetic benchmark.
# ----------------------------------------------------------------------------


def test_generate_shapes_dtypes_and_range(scenes):
  for images, labels in scenes.values():
    chex.assert_shape(images, (48, H, W, 3))
    chex.assert_shape(labels, (48, H, W))
    assert images.dtype == np.uint8 and labels.dtype == np.uint8
    assert labels.max() < synthetic.NUM_CLASSES
  assert synthetic.PALETTE.shape == (synthetic.NUM_CLASSES, 3)
  assert synthetic.PALETTE.dtype == np.uint8
  assert synthetic.CLASS_NAMES[:8] == ('road', 'sidewalk', 'building', 'sky',
                                       'vegetation', 'pole', 'car', 'person')


def test_generate_is_deterministic_and_seeded(scenes):
  for domain in synthetic.DOMAINS:
    images, labels = synthetic.generate(domain, 6, height=H, width=W, seed=3)
    # Same seed: identical bytes, and a prefix of a longer run.
    assert images.tobytes() == scenes[domain][0][:6].tobytes()
    assert labels.tobytes() == scenes[domain][1][:6].tobytes()
    other_images, other_labels = synthetic.generate(
        domain, 6, height=H, width=W, seed=4)
    assert not np.array_equal(other_images, images)
    assert not np.array_equal(other_labels, labels)


def test_layout_is_a_driving_scene(scenes):
  _, labels = scenes['source']
  sky = synthetic.CLASS_NAMES.index('sky')
  road = synthetic.CLASS_NAMES.index('road')
  # Sky lives in the top rows, road in the bottom rows.
  top, bottom = labels[:, :H // 4], labels[:, -H // 4:]
  assert (top == sky).mean() > 0.3 and (bottom == sky).mean() == 0.0
  assert (bottom == road).mean() > 0.3 and (top == road).mean() == 0.0


def test_domains_share_layout_but_not_appearance(scenes):
  (src_img, src_lab), (tgt_img, tgt_lab) = scenes['source'], scenes['target']
  c = synthetic.NUM_CLASSES
  # Different scenes (independent streams), same layout statistics.
  assert not np.array_equal(src_lab, tgt_lab)
  src_freq = np.array([(src_lab == k).mean() for k in range(c)])
  tgt_freq = np.array([(tgt_lab == k).mean() for k in range(c)])
  assert (src_freq > 0).all() and (tgt_freq > 0).all()  # All classes occur.
  np.testing.assert_allclose(src_freq, tgt_freq, atol=0.04)
  # Larger samples agree more closely: the generator is the same.
  big_src = synthetic.generate('source', 200, height=16, width=32, seed=0)[1]
  big_tgt = synthetic.generate('target', 200, height=16, width=32, seed=0)[1]
  np.testing.assert_allclose(
      np.bincount(big_src.ravel(), minlength=c) / big_src.size,
      np.bincount(big_tgt.ravel(), minlength=c) / big_tgt.size, atol=0.02)
  # Per-class mean colours differ strongly between the domains.
  distances = []
  for k in range(c):
    src_mean = src_img[src_lab == k].astype(np.float64).mean(axis=0)
    tgt_mean = tgt_img[tgt_lab == k].astype(np.float64).mean(axis=0)
    distances.append(np.linalg.norm(src_mean - tgt_mean))
  distances = np.array(distances)
  assert np.median(distances) > 50, distances
  assert (distances > 25).sum() >= c - 1, distances
  # Target has texture and noise: a much larger spread of road colours
  # within an image (the source road is one flat colour plus faint noise).
  road = synthetic.CLASS_NAMES.index('road')

  def within_image_std(images, labels):
    return np.mean([images[i][labels[i] == road].astype(np.float64).std(0)
                    .mean() for i in range(len(images))
                    if (labels[i] == road).sum() > 20])

  src_std = within_image_std(src_img, src_lab)
  tgt_std = within_image_std(tgt_img, tgt_lab)
  assert tgt_std > 3 * src_std, (tgt_std, src_std)


def test_generate_rejects_bad_arguments():
  with pytest.raises(ValueError, match='domain'):
    synthetic.generate('real', 1, height=H, width=W, seed=0)
  with pytest.raises(ValueError, match='non-negative'):
    synthetic.generate('source', 1, height=H, width=W, seed=-1)


def test_colorize_uses_palette_and_blackens_ignore():
  labels = np.array([[0, 3], [255, 9]], np.uint8)
  rgb = visualize.colorize(labels, synthetic.PALETTE)
  np.testing.assert_array_equal(rgb[0, 0], [128, 64, 128])
  np.testing.assert_array_equal(rgb[0, 1], [70, 130, 180])
  np.testing.assert_array_equal(rgb[1, 0], [0, 0, 0])
  np.testing.assert_array_equal(rgb[1, 1], synthetic.PALETTE[9])


def test_cache_round_trip(tmp_path, monkeypatch):
  kwargs = dict(num_images=5, height=16, width=32, seed=7)
  images, labels = synthetic.load_or_generate(tmp_path, 'target', 'train',
                                              **kwargs)
  path = synthetic.cache_path(tmp_path, 'target', 'train', **kwargs)
  assert os.path.exists(path)
  assert f'v{synthetic.GENERATOR_VERSION}' in os.path.basename(path)
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # No temp files.
  # The train split is generated from a derived seed.
  expected = synthetic.generate('target', 5, height=16, width=32,
                                seed=synthetic.split_seed(7, 'train'))
  np.testing.assert_array_equal(images, expected[0])
  np.testing.assert_array_equal(labels, expected[1])

  def fail(*args, **kwargs):
    raise AssertionError('cache miss')

  monkeypatch.setattr(synthetic, 'generate', fail)
  cached = synthetic.load_or_generate(tmp_path, 'target', 'train', **kwargs)
  np.testing.assert_array_equal(cached[0], images)
  np.testing.assert_array_equal(cached[1], labels)
  # Val is a different split, and therefore not cached yet.
  with pytest.raises(AssertionError, match='cache miss'):
    synthetic.load_or_generate(tmp_path, 'target', 'val', **kwargs)
  monkeypatch.undo()
  val = synthetic.load_or_generate(tmp_path, 'target', 'val', **kwargs)
  assert not np.array_equal(val[0], images)
  # A corrupt cache file is regenerated.
  with open(path, 'wb') as f:
    f.write(b'not an npz')
  again = synthetic.load_or_generate(tmp_path, 'target', 'train', **kwargs)
  np.testing.assert_array_equal(again[0], images)


# ----------------------------------------------------------------------------
# Folder layout.
# ----------------------------------------------------------------------------

CLASSES = ('road', 'car', 'sky')


def _random_data(n=3, h=6, w=10, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
  labels = rng.integers(0, len(CLASSES), (n, h, w)).astype(np.uint8)
  labels[:, 0, 0] = 255  # Ignore pixels survive the round trip.
  return images, labels


def test_folder_round_trip(tmp_path):
  images, labels = _random_data()
  folder.export_folder(tmp_path, 'train', images, labels, CLASSES)
  folder.export_folder(tmp_path, 'val', images[:2], None, CLASSES)
  with open(tmp_path / 'classes.txt') as f:
    assert f.read().splitlines() == list(CLASSES)
  data = folder.read_folder(tmp_path, 'train', require_labels=True)
  np.testing.assert_array_equal(data.images, images)
  np.testing.assert_array_equal(data.labels, labels)
  assert data.class_names == CLASSES
  assert data.stems == ('00000', '00001', '00002')
  unlabelled = folder.read_folder(tmp_path, 'val', require_labels=False)
  assert unlabelled.labels is None
  np.testing.assert_array_equal(unlabelled.images, images[:2])
  with pytest.raises(errors.DataError, match='labels'):
    folder.read_folder(tmp_path, 'val', require_labels=True)


def test_folder_resize_and_subset(tmp_path):
  images, labels = _random_data(n=4, h=8, w=12)
  folder.export_folder(tmp_path, 'train', images, labels, CLASSES)
  data = folder.read_folder(tmp_path, 'train', require_labels=True,
                            height=4, width=6, num_images=2)
  chex.assert_shape(data.images, (2, 4, 6, 3))
  chex.assert_shape(data.labels, (2, 4, 6))
  # Nearest-neighbour halving picks one source pixel per 2x2 cell, so label
  # values are never blended.
  for i in range(2):
    for y in range(4):
      for x in range(6):
        cell = labels[i, 2 * y:2 * y + 2, 2 * x:2 * x + 2]
        assert data.labels[i, y, x] in cell


def test_folder_converts_gray_and_rgba(tmp_path):
  folder.export_folder(tmp_path, 'train', *_random_data(n=1), CLASSES)
  gray = np.arange(60, dtype=np.uint8).reshape(6, 10)
  Image.fromarray(gray).save(tmp_path / 'train' / 'images' / '00000.png')
  data = folder.read_folder(tmp_path, 'train', require_labels=True)
  np.testing.assert_array_equal(data.images[0], np.stack([gray] * 3, -1))
  rgba = np.random.default_rng(1).integers(0, 256, (6, 10, 4), np.uint8)
  Image.fromarray(rgba).save(tmp_path / 'train' / 'images' / '00000.png')
  data = folder.read_folder(tmp_path, 'train', require_labels=True)
  np.testing.assert_array_equal(data.images[0], rgba[..., :3])


@pytest.fixture
def dataset(tmp_path):
  """A valid 3-image train split; tests break one thing each."""
  images, labels = _random_data()
  folder.export_folder(tmp_path, 'train', images, labels, CLASSES)
  return tmp_path


def _read(path):
  return folder.read_folder(path, 'train', require_labels=True)


def test_error_missing_dir(tmp_path):
  missing = tmp_path / 'nope'
  with pytest.raises(errors.DataError, match='does not exist') as e:
    _read(missing)
  assert str(missing) in str(e.value)


def test_error_missing_classes_txt(dataset):
  os.remove(dataset / 'classes.txt')
  with pytest.raises(errors.DataError, match='classes.txt') as e:
    _read(dataset)
  assert str(dataset / 'classes.txt') in str(e.value)


def test_error_label_out_of_range(dataset):
  path = dataset / 'train' / 'labels' / '00001.png'
  label = np.zeros((6, 10), np.uint8)
  label[2, 3], label[4, 4] = 7, 3  # 3 classes: 3 and 7 are invalid.
  label[0, 0] = 255  # Ignore is fine.
  Image.fromarray(label).save(path)
  with pytest.raises(errors.DataError, match='outside') as e:
    _read(dataset)
  msg = str(e.value)
  # 255 (ignore) is not among the bad values. (Only the text after the path:
  # pytest's tmp path can hold '255', e.g. /tmp/pytest-of-root/pytest-255.)
  assert str(path) in msg and 'values 3, 7 ' in msg and '255' not in msg[
      msg.index(str(path)) + len(str(path)):msg.index('outside')]


def test_error_label_size_mismatch(dataset):
  path = dataset / 'train' / 'labels' / '00002.png'
  Image.fromarray(np.zeros((5, 10), np.uint8)).save(path)
  with pytest.raises(errors.DataError, match='10x5') as e:
    _read(dataset)
  assert str(path) in str(e.value)


def test_error_corrupt_png(dataset):
  path = dataset / 'train' / 'images' / '00000.png'
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])  # Truncated.
  with pytest.raises(errors.DataError, match='corrupt') as e:
    _read(dataset)
  assert str(path) in str(e.value)
  path.write_bytes(b'\x89PNG garbage')
  with pytest.raises(errors.DataError, match='corrupt'):
    _read(dataset)


def test_error_missing_label(dataset):
  os.remove(dataset / 'train' / 'labels' / '00001.png')
  with pytest.raises(errors.DataError, match='has no label') as e:
    _read(dataset)
  assert str(dataset / 'train' / 'images' / '00001.png') in str(e.value)


def test_error_colour_label(dataset):
  path = dataset / 'train' / 'labels' / '00000.png'
  Image.fromarray(np.zeros((6, 10, 3), np.uint8)).save(path)
  with pytest.raises(errors.DataError, match='single-channel') as e:
    _read(dataset)
  assert str(path) in str(e.value)


def test_error_empty_split_and_missing_split(dataset):
  os.makedirs(dataset / 'val' / 'images')
  with pytest.raises(errors.DataError, match='no images found') as e:
    folder.read_folder(dataset, 'val', require_labels=False)
  assert str(dataset / 'val' / 'images') in str(e.value)
  with pytest.raises(errors.DataError, match='missing image folder'):
    folder.read_folder(dataset, 'test', require_labels=False)


def test_error_mixed_sizes_without_resize(dataset):
  Image.fromarray(np.zeros((7, 10, 3), np.uint8)).save(
      dataset / 'train' / 'images' / '00002.png')
  Image.fromarray(np.zeros((7, 10), np.uint8)).save(
      dataset / 'train' / 'labels' / '00002.png')
  with pytest.raises(errors.DataError, match='height and width'):
    _read(dataset)
  data = folder.read_folder(dataset, 'train', require_labels=True,
                            height=6, width=10)
  chex.assert_shape(data.images, (3, 6, 10, 3))


def test_export_synthetic_benchmark(tmp_path, scenes):
  images, labels = scenes['target']
  folder.export_folder(tmp_path, 'val', images[:4], labels[:4],
                       synthetic.CLASS_NAMES)
  # num_images applies to the synthetic loader only: a folder is read whole.
  domain = pipeline.load_domain('folder', role='target', data_dir=tmp_path,
                                split='val', num_images=2)
  np.testing.assert_array_equal(domain.images, images[:4])
  np.testing.assert_array_equal(domain.labels, labels[:4])
  assert domain.class_names == synthetic.CLASS_NAMES


# ----------------------------------------------------------------------------
# Pipeline.
# ----------------------------------------------------------------------------


def test_registry_is_the_one_name_table(tmp_path):
  assert registry.names()[:2] == ('synthetic', 'folder')
  assert set(registry.DATASETS) >= {'gta5', 'cityscapes', 'usps',
                                    *digits.DOMAINS}
  for entry in registry.DATASETS.values():
    assert entry.label_kind in registry.LABEL_KINDS
    assert (entry.open is None) != (entry.load is None)
  assert registry.DATASETS['gta5'].label_kind == 'dense'
  assert registry.DATASETS['office31'].label_kind == 'per_image'
  assert registry.lookup('office31:amazon') == (registry.DATASETS['office31'],
                                                'amazon')
  # 'mnist' without idx files in data_dir is the embedded subset.
  assert registry.lookup('mnist', str(tmp_path))[0].name == 'mnist'
  assert not pipeline.real_dataset('mnist', str(tmp_path))
  assert pipeline.real_dataset('cityscapes16')
  with pytest.raises(errors.DataError, match='unknown data set'):
    registry.lookup('gta5:extra')
  # Every file reader names its directory when it is missing.
  missing = str(tmp_path / 'missing')
  for name, entry in registry.DATASETS.items():
    if entry.reads_files:
      with pytest.raises(errors.DataError, match='missing|needs'):
        entry.open_split(missing, 'train', 'amazon')
      with pytest.raises(errors.DataError, match='local directory'):
        pipeline.load_domain(name + (':amazon' if entry.takes_domain else ''))


def test_load_domain_dispatch(tmp_path):
  with pytest.raises(errors.DataError, match="'synthetic', 'folder'"):
    pipeline.load_domain('gta6', data_dir=tmp_path)
  # 'gta5' is a real data set now: a wrong directory names the layout.
  with pytest.raises(errors.DataError, match='images/.*labels/'):
    pipeline.load_domain('gta5', data_dir=tmp_path)
  with pytest.raises(errors.DataError, match='role'):
    pipeline.load_domain('synthetic', data_dir=tmp_path)
  with pytest.raises(errors.DataError, match='target domain needs data_dir'):
    pipeline.load_domain('folder', role='target')
  domain = pipeline.load_domain('synthetic', data_dir=tmp_path, split='val',
                                height=16, width=32, num_images=3, seed=1,
                                role='source')
  expected = synthetic.generate('source', 3, height=16, width=32,
                                seed=synthetic.split_seed(1, 'val'))
  np.testing.assert_array_equal(domain.images, expected[0])
  np.testing.assert_array_equal(domain.labels, expected[1])
  assert domain.class_names == synthetic.CLASS_NAMES


def test_normalize_modes_match_hand_values():
  px = np.array([[[[10, 20, 30]]]], np.uint8)
  np.testing.assert_allclose(
      pipeline.normalize(px, 'unit')[0, 0, 0],
      [-0.9215686, -0.8431373, -0.7647059], rtol=1e-6)
  # (10/255 - 0.485) / 0.229, (20/255 - 0.456) / 0.224, ...
  np.testing.assert_allclose(
      pipeline.normalize(px, 'imagenet')[0, 0, 0],
      [-1.9466564, -1.6855742, -1.2815686], rtol=1e-6)
  # BGR order: (30, 20, 10) minus the Caffe mean.
  np.testing.assert_allclose(
      pipeline.normalize(px, 'caffe_bgr')[0, 0, 0],
      [-74.00698793, -96.66876762, -112.67891434], rtol=1e-6)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
  for mode in pipeline.NORMALIZE_MODES:
    out = pipeline.normalize(images, mode)
    assert out.dtype == np.float32 and out.shape == images.shape
  np.testing.assert_allclose(pipeline.normalize(np.full((1, 3), 255,
                                                        np.uint8)), 1.0)
  with pytest.raises(ValueError, match='unknown normalize mode'):
    pipeline.normalize(images, 'bgr')


def _take(iterator, k):
  return [next(iterator) for _ in range(k)]


def test_train_batches_epochs_are_seeded_permutations():
  n, b, seed = 10, 4, 5
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (n, 3, 4, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, (n, 3, 4)).astype(np.uint8)
  batches = _take(pipeline.train_batches(images, labels, batch_size=b,
                                         seed=seed), 5)  # 20 = 2 epochs.
  order = np.concatenate([x['index'] for x in batches])
  for e in range(2):
    epoch = order[e * n:(e + 1) * n]
    assert sorted(epoch.tolist()) == list(range(n))  # Each image once.
    expected = np.random.default_rng([seed, e]).permutation(n)
    np.testing.assert_array_equal(epoch, expected)
  assert not np.array_equal(order[:n], order[n:])
  for x in batches:
    chex.assert_shape(x['image'], (b, 3, 4, 3))
    assert x['image'].dtype == np.float32 and x['label'].dtype == np.int32
    assert x['index'].dtype == np.int32
    np.testing.assert_allclose(x['image'], images[x['index']] / 127.5 - 1,
                               atol=1e-6)
    np.testing.assert_array_equal(x['label'], labels[x['index']])


def test_train_batches_resume_equivalence():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, (7, 4, 5)).astype(np.uint8)
  weights = rng.random(7).astype(np.float32)
  kwargs = dict(batch_size=3, seed=11, flip=True,
                extras={'weight': weights, 'pseudo': labels + 1})
  fresh = _take(pipeline.train_batches(images, labels, **kwargs), 9)
  resumed = _take(pipeline.train_batches(images, labels, start_step=4,
                                         **kwargs), 5)
  for a, b in zip(fresh[4:], resumed):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  other = _take(pipeline.train_batches(images, labels, **{**kwargs,
                                                          'seed': 12}), 9)
  assert any(not np.array_equal(a['index'], b['index'])
             for a, b in zip(fresh, other))


def test_train_batches_flip_and_extras():
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (6, 4, 5, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, (6, 4, 5)).astype(np.uint8)
  pseudo = rng.integers(0, 3, (6, 4, 5)).astype(np.uint8)
  weights = rng.random((6, 4)).astype(np.float32)  # Not spatial.
  batches = _take(pipeline.train_batches(
      images, labels, batch_size=4, seed=0, flip=True, mode='caffe_bgr',
      extras={'pseudo': pseudo, 'weight': weights}), 6)
  flips = np.concatenate([x['flipped'] for x in batches])
  assert 0 < flips.sum() < len(flips)
  for x in batches:
    for j, (i, f) in enumerate(zip(x['index'], x['flipped'])):
      img = images[i][:, ::-1] if f else images[i]
      expected = img[..., ::-1].astype(np.float32) - np.array(
          [104.00698793, 116.66876762, 122.67891434], np.float32)
      np.testing.assert_allclose(x['image'][j], expected, atol=1e-4)
      np.testing.assert_array_equal(
          x['label'][j], labels[i][:, ::-1] if f else labels[i])
      np.testing.assert_array_equal(
          x['pseudo'][j], pseudo[i][:, ::-1] if f else pseudo[i])
      np.testing.assert_array_equal(x['weight'][j], weights[i])
    assert x['pseudo'].dtype == np.uint8 and x['weight'].dtype == np.float32


def test_train_batches_without_labels_and_bad_extras():
  images = np.zeros((3, 2, 2, 3), np.uint8)
  batch = next(pipeline.train_batches(images, batch_size=5, seed=0))
  assert 'label' not in batch and 'flipped' not in batch
  # A batch larger than the data set spans epochs but still holds each
  # image at most once per epoch.
  assert sorted(batch['index'][:3].tolist()) == [0, 1, 2]
  with pytest.raises(ValueError, match='reserved'):
    pipeline.train_batches(images, batch_size=2, seed=0,
                           extras={'index': np.zeros(3)})
  with pytest.raises(ValueError, match='rows'):
    pipeline.train_batches(images, batch_size=2, seed=0,
                           extras={'w': np.zeros(2)})


def test_eval_batches_pad_and_mask():
  n, b = 10, 4
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, (n, 3, 2, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, (n, 3, 2)).astype(np.uint8)
  batches = list(pipeline.eval_batches(images, labels, batch_size=b,
                                       mode='imagenet'))
  assert len(batches) == 3
  for x in batches:
    chex.assert_shape(x['image'], (b, 3, 2, 3))
    chex.assert_shape(x['label'], (b, 3, 2))
    assert x['mask'].dtype == bool and x['index'].dtype == np.int32
  mask = np.concatenate([x['mask'] for x in batches])
  index = np.concatenate([x['index'] for x in batches])
  assert mask.sum() == n
  np.testing.assert_array_equal(index[mask], np.arange(n))
  np.testing.assert_array_equal(mask, np.arange(12) < n)
  last = batches[-1]
  assert (last['label'][~last['mask']] == 255).all()
  np.testing.assert_array_equal(last['label'][last['mask']],
                                labels[8:].astype(np.int32))
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  np.testing.assert_allclose(batches[0]['image'],
                             (images[:4] / 255.0 - mean) / std, atol=1e-5)


def test_shard_for_process_covers_once():
  for n, count in ((10, 3), (7, 8), (0, 2), (16, 4)):
    slices = [parallel.shard_for_process(n, i, count) for i in range(count)]
    covered = np.concatenate([np.arange(n)[s] for s in slices])
    np.testing.assert_array_equal(covered, np.arange(n))
    sizes = [len(range(n)[s]) for s in slices]
    assert max(sizes) - min(sizes) <= 1
  with pytest.raises(ValueError):
    parallel.shard_for_process(10, 3, 3)
