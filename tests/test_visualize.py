"""Tests for jaxda.visualize: colour maths; each picture is a real PNG."""

import numpy as np
import pytest
from PIL import Image

from jaxda import types
from jaxda import visualize

IGNORE = types.IGNORE_LABEL
NAMES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'light',
         'sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car',
         'truck', 'bus', 'train', 'motorcycle', 'bicycle')


def _colorize_loops(labels, palette):
  """Independent reference: pixel-by-pixel lookup."""
  h, w = labels.shape
  out = np.zeros((h, w, 3), np.uint8)
  for i in range(h):
    for j in range(w):
      if labels[i, j] != IGNORE:
        out[i, j] = palette[labels[i, j]]
  return out


def _overlay_loops(image, labels, palette, alpha):
  h, w = labels.shape
  out = image.copy()
  for i in range(h):
    for j in range(w):
      if labels[i, j] != IGNORE:
        for c in range(3):
          value = (1 - alpha) * int(image[i, j, c]) + alpha * int(
              palette[labels[i, j], c])
          out[i, j, c] = int(np.floor(value + 0.5))
  return out


def _random_labels(rng, shape, num_classes, ignore_fraction=0.2):
  labels = rng.integers(0, num_classes, shape)
  labels[rng.random(shape) < ignore_fraction] = IGNORE
  return labels


def _batch(rng, n=3, h=24, w=40, c=19):
  images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
  return images, _random_labels(rng, (n, h, w), c), _random_labels(
      rng, (n, h, w), c)


def _assert_real_png(path, min_width=300, min_height=200):
  with Image.open(path) as image:
    assert image.format == 'PNG'
    width, height = image.size
    pixels = np.asarray(image.convert('RGB'))
  assert width >= min_width and height >= min_height, (width, height)
  # A blank or nearly blank canvas has only a handful of colours.
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
  return pixels


def test_default_palette_starts_with_cityscapes_and_is_distinct():
  palette = visualize.default_palette(60)
  assert palette.shape == (60, 3) and palette.dtype == np.uint8
  # Hand-copied Cityscapes trainId colours: road, sidewalk, ..., bicycle.
  np.testing.assert_array_equal(palette[0], [128, 64, 128])
  np.testing.assert_array_equal(palette[1], [244, 35, 232])
  np.testing.assert_array_equal(palette[10], [70, 130, 180])
  np.testing.assert_array_equal(palette[13], [0, 0, 142])
  np.testing.assert_array_equal(palette[18], [119, 11, 32])
  assert len(np.unique(palette, axis=0)) == 60
  assert not np.any(np.all(palette == 0, axis=1))  # Black is for ignore.
  np.testing.assert_array_equal(visualize.default_palette(60), palette)
  np.testing.assert_array_equal(visualize.default_palette(5), palette[:5])
  assert visualize.default_palette(0).shape == (0, 3)
  with pytest.raises(ValueError):
    visualize.default_palette(-1)


def test_colorize_hand_computed():
  palette = np.array([[10, 20, 30], [200, 100, 0]], np.uint8)
  labels = np.array([[0, 1], [255, 1]])
  expected = np.array([[[10, 20, 30], [200, 100, 0]],
                       [[0, 0, 0], [200, 100, 0]]], np.uint8)
  out = visualize.colorize(labels, palette)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected)


def test_colorize_random_matches_loops():
  rng = np.random.default_rng(1)
  palette = visualize.default_palette(25)
  labels = _random_labels(rng, (13, 17), 25)
  np.testing.assert_array_equal(
      visualize.colorize(labels, palette), _colorize_loops(labels, palette))


def test_colorize_rejects_out_of_range_labels():
  palette = visualize.default_palette(3)
  with pytest.raises(ValueError, match='outside'):
    visualize.colorize(np.array([[0, 3]]), palette)
  with pytest.raises(ValueError, match='outside'):
    visualize.colorize(np.array([[-1, 0]]), palette)
  with pytest.raises(ValueError, match='integers'):
    visualize.colorize(np.array([[0.0, 1.0]]), palette)


def test_overlay_hand_computed():
  palette = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
  image = np.array([[[100, 253, 101], [0, 50, 200]],
                    [[30, 60, 90], [253, 255, 255]]], np.uint8)
  labels = np.array([[0, 1], [IGNORE, 0]])
  # alpha=0.5: (img + colour) / 2 rounded half up (126.5 -> 127, 50.5 -> 51);
  # ignore keeps the image.
  expected = np.array([[[178, 127, 51], [0, 25, 228]],
                       [[30, 60, 90], [254, 128, 128]]], np.uint8)
  out = visualize.overlay(image, labels, palette, alpha=0.5)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected)
  # alpha=0 shows the image, alpha=1 the pure label colours (ignore: image).
  np.testing.assert_array_equal(
      visualize.overlay(image, labels, palette, alpha=0.0), image)
  full = visualize.overlay(image, labels, palette, alpha=1.0)
  np.testing.assert_array_equal(full[0, 0], [255, 0, 0])
  np.testing.assert_array_equal(full[1, 0], image[1, 0])


def test_overlay_random_matches_loops():
  rng = np.random.default_rng(2)
  palette = visualize.default_palette(19)
  image = rng.integers(0, 256, (11, 9, 3), dtype=np.uint8)
  labels = _random_labels(rng, (11, 9), 19, ignore_fraction=0.3)
  out = visualize.overlay(image, labels, palette, alpha=0.3)
  # Rounding of exact .5 ties may differ by one level (float vs int maths).
  np.testing.assert_allclose(
      out.astype(int), _overlay_loops(image, labels, palette, 0.3).astype(int),
      atol=1)
  ignore = labels == IGNORE
  np.testing.assert_array_equal(out[ignore], image[ignore])


def test_overlay_accepts_float_images_and_checks_shapes():
  palette = np.array([[0, 0, 0], [255, 255, 255]], np.uint8)
  image = np.full((2, 2, 3), 0.5, np.float32)
  labels = np.array([[1, IGNORE], [1, 1]])
  out = visualize.overlay(image, labels, palette, alpha=0.5)
  np.testing.assert_array_equal(out[0, 1], [128, 128, 128])
  np.testing.assert_array_equal(out[0, 0], [192, 192, 192])
  with pytest.raises(ValueError, match='differ'):
    visualize.overlay(image, np.zeros((3, 2), int), palette)
  with pytest.raises(ValueError, match='alpha'):
    visualize.overlay(image, labels, palette, alpha=1.5)


def test_save_segmentation_grid(tmp_path):
  rng = np.random.default_rng(3)
  images, predictions, labels = _batch(rng, n=6)
  path = tmp_path / 'nested' / 'dir' / 'seg.png'
  out = visualize.save_segmentation_grid(
      path, images, predictions, labels, visualize.default_palette(19), NAMES,
      title='step 10', max_rows=2)
  assert out == str(path)
  pixels = _assert_real_png(path)
  # Two rows only: the figure is wider than tall.
  assert pixels.shape[1] > pixels.shape[0]
  with pytest.raises(ValueError, match='predictions'):
    visualize.save_segmentation_grid(
        path, images, predictions[:, :-1], labels,
        visualize.default_palette(19), NAMES)


def test_save_pseudo_label_grid(tmp_path):
  rng = np.random.default_rng(4)
  images, _, ground_truth = _batch(rng)
  before = _random_labels(rng, ground_truth.shape, 19, ignore_fraction=0.7)
  after = np.where(before == IGNORE,
                   _random_labels(rng, ground_truth.shape, 19, 0.4), before)
  palette = visualize.default_palette(19)
  path = visualize.save_pseudo_label_grid(
      tmp_path / 'pseudo.png', images, before, after, ground_truth, palette,
      NAMES, title='voting')
  _assert_real_png(path)
  no_gt = visualize.save_pseudo_label_grid(
      tmp_path / 'pseudo_no_gt.png', images, before, after, None, palette,
      NAMES)
  _assert_real_png(no_gt)
  # One column fewer without ground truth.
  with Image.open(path) as a, Image.open(no_gt) as b:
    assert b.size[0] < a.size[0]


def test_save_training_curves(tmp_path):
  rng = np.random.default_rng(5)
  history = {
      'train/loss': [(s, float(v)) for s, v in
                     zip(range(0, 200, 2), np.exp(-np.arange(100) / 30)
                         + 0.1 * rng.random(100))],
      'train/lr': [(s, 1e-3 * (1 - s / 200)) for s in range(0, 200, 2)],
      'eval/miou': [(0, 0.2), (100, 0.35), (199, 0.4)],
      'other': [(0, 1.0)],
  }
  path = visualize.save_training_curves(
      tmp_path / 'curves.png', history, names=['train/loss', 'train/lr',
                                               'eval/miou'])
  _assert_real_png(path)
  _assert_real_png(visualize.save_training_curves(tmp_path / 'all.png',
                                                  history))
  with pytest.raises(ValueError, match='missing'):
    visualize.save_training_curves(tmp_path / 'x.png', history,
                                   names=['missing'])


def test_save_heatmap_grid_low_resolution_maps(tmp_path):
  rng = np.random.default_rng(6)
  images = rng.integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
  maps = rng.random((2, 4, 6)).astype(np.float32)
  maps[0, 0, 0] = np.nan
  path = visualize.save_heatmap_grid(
      tmp_path / 'heat.png', images, maps, title='entropy')
  _assert_real_png(path)
  with pytest.raises(ValueError, match='maps'):
    visualize.save_heatmap_grid(tmp_path / 'bad.png', images, maps[:1])


def test_save_confusion_matrix(tmp_path):
  rng = np.random.default_rng(7)
  confusion = rng.integers(0, 100, (19, 19)) + np.diag(
      rng.integers(200, 1000, 19))
  confusion[16] = 0  # A class absent from the ground truth.
  path = visualize.save_confusion_matrix(
      tmp_path / 'confusion.png', confusion, NAMES, title='val')
  _assert_real_png(path, min_width=400, min_height=400)
  with pytest.raises(ValueError, match='class names'):
    visualize.save_confusion_matrix(tmp_path / 'x.png', confusion, NAMES[:3])
