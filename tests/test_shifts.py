"""Named target shifts of the embedded benchmarks (issue 23, item 1).

Segmentation: `jaxda.data.embedded.shifts` ('default', 'texture',
'weather', 'sensor', 'layout'); digits: `digits.TARGET_SHIFTS`. Each shift
is checked on the property it is meant to change, against 'default' and
against the other shifts, on small paired samples (the appearance shifts
share the default's layouts). Tiny sizes: a few seconds in all.
"""

import hashlib
import os

import numpy as np
import pytest

from experiments.configs import classification_common
from experiments.configs import common
from experiments.configs import dann
from experiments.configs import source_only
from jaxda.data import errors
from jaxda.data import pipeline
from jaxda.data import registry
from jaxda.data.embedded import digits
from jaxda.data.embedded import scenes
from jaxda.data.embedded import shifts
from jaxda.data.embedded import synthetic
from jaxda.train import exceptions

H, W, N, SEED = 32, 64, 8, 0
APPEARANCE = ('texture', 'weather', 'sensor')
LUMA = np.array([0.299, 0.587, 0.114], np.float32)

# sha256 prefixes of (images, labels) of `synthetic.generate` computed
# before the shifts existed: 'default' must stay bit-identical (test_anchor
# holds the GENERATOR_VERSION 2 hashes of larger samples).
_BEFORE = {
    ('target', 4, 24, 48, 0): ('0b478b89b549f7ab', '7dee936b2522ff99'),
    ('target', 3, 16, 32, 5): ('8999cf263aed2bed', '4e6a122f63ee8b72'),
    ('source', 3, 16, 32, 5): ('f4992b342bec1c8f', 'c6ce0095167f7282'),
}
# The first 50 val images (seed 0, 28x28) of MNIST-M before the shifts ('digits'
# is untouched and covered by test_classification; it costs scikit-learn's
# import here).
_MNIST_M_BEFORE = '7a7e4f3c86077751'


def _sha(a):
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


@pytest.fixture(scope='module')
def gen():
  return {s: synthetic.generate('target', N, height=H, width=W, seed=SEED,
                                shift=s) for s in synthetic.SHIFTS}


# ---------------------------------------------------------------------------
# The table, shapes, determinism, bit-identity of 'default'
# ---------------------------------------------------------------------------


def test_shift_table():
  assert len(synthetic.SHIFTS) >= 5 and len(set(synthetic.SHIFTS)) == len(
      synthetic.SHIFTS)
  assert synthetic.SHIFTS[0] == synthetic.DEFAULT_SHIFT == 'default'
  assert synthetic.DEVELOPMENT_SHIFT in synthetic.SHIFTS
  assert synthetic.DEVELOPMENT_SHIFT != synthetic.DEFAULT_SHIFT
  assert common.TARGET_SHIFTS == synthetic.SHIFTS
  assert common.DEVELOPMENT_SHIFT == synthetic.DEVELOPMENT_SHIFT
  assert set(shifts.DESCRIPTIONS) == set(synthetic.SHIFTS)
  for shift in synthetic.SHIFTS:
    name = registry.synthetic_name(shift)
    assert registry.lookup(name)[0].name == name
  assert classification_common.TARGET_SHIFTS[0] == 'default'
  assert 'mnist_m' in classification_common.TARGET_SHIFTS


@pytest.mark.parametrize('key', sorted(_BEFORE))
def test_default_shift_is_bit_identical_to_before(key):
  domain, n, h, w, seed = key
  images, labels = synthetic.generate(domain, n, height=h, width=w, seed=seed)
  assert (_sha(images), _sha(labels)) == _BEFORE[key]
  if domain == 'target':
    again = synthetic.generate(domain, n, height=h, width=w, seed=seed,
                               shift='default')
    assert (_sha(again[0]), _sha(again[1])) == _BEFORE[key]


@pytest.mark.parametrize('shift', synthetic.SHIFTS)
def test_each_shift_shapes_range_and_determinism(gen, shift):
  images, labels = gen[shift]
  assert images.shape == (N, H, W, 3) and images.dtype == np.uint8
  assert labels.shape == (N, H, W) and labels.dtype == np.uint8
  assert labels.max() < synthetic.NUM_CLASSES
  assert images.std() > 10  # Not blank or saturated.
  again = synthetic.generate('target', 3, height=H, width=W, seed=SEED,
                             shift=shift)
  np.testing.assert_array_equal(again[0], images[:3])  # Seeded, prefix.
  np.testing.assert_array_equal(again[1], labels[:3])
  other = synthetic.generate('target', 3, height=H, width=W, seed=SEED + 1,
                             shift=shift)
  assert not np.array_equal(other[0], images[:3])
  if shift != 'default':
    assert not np.array_equal(images, gen['default'][0])


def test_appearance_shifts_keep_the_layouts_layout_does_not(gen):
  for shift in APPEARANCE:
    np.testing.assert_array_equal(gen[shift][1], gen['default'][1])
  assert (gen['layout'][1] != gen['default'][1]).mean() > 0.3


# ---------------------------------------------------------------------------
# Each shift changes what it is meant to change, more than the others do
# ---------------------------------------------------------------------------


def _luma(images):
  return images.astype(np.float32) @ LUMA


def _class_means(images, labels):
  return {c: images[labels == c].astype(np.float32).mean(0)
          for c in range(scenes.NUM_CLASSES) if (labels == c).sum() >= 50}


def _chroma_distance(a, b):
  """Mean over classes of the distance of the class's mean chroma (mean
  colour minus its grey level) between two paired samples."""
  ma, mb = _class_means(*a), _class_means(*b)
  return float(np.mean([np.linalg.norm((ma[c] - ma[c].mean()) -
                                       (mb[c] - mb[c].mean()))
                        for c in ma if c in mb]))


def _saturation(images):
  f = images.astype(np.float32)
  return float((f.max(-1) - f.min(-1)).mean())


def _far_contrast(images, labels):
  """Luminance std over the far pixels (sky and skyline), per image."""
  luma = _luma(images)
  far = np.isin(labels, [scenes.SKY, scenes.BUILDING])
  return float(np.mean([luma[i][far[i]].std() for i in range(len(images))]))


def _gradient(images):
  return float(np.abs(np.diff(_luma(images), axis=2)).mean())


def _blockiness(images):
  """Mean |horizontal step| across 8-pixel block borders over elsewhere."""
  d = np.abs(np.diff(_luma(images), axis=2))
  border = (np.arange(d.shape[2]) % 8) == 7
  return float(d[:, :, border].mean() / d[:, :, ~border].mean())


def _histogram(labels):
  return np.bincount(labels.ravel(), minlength=scenes.NUM_CLASSES) / labels.size


def test_texture_changes_the_class_colours(gen):
  dist = {s: _chroma_distance(gen[s], gen['default'])
          for s in synthetic.SHIFTS if s != 'default'}
  assert dist['texture'] > 20, dist  # ~30 at seed 0
  assert all(dist['texture'] > 1.5 * v for s, v in dist.items()
             if s != 'texture'), dist
  veg = {s: _class_means(*gen[s])[scenes.VEGETATION] for s in
         ('default', 'texture')}
  assert veg['default'][1] > veg['default'][0]  # green foliage
  assert veg['texture'][0] > 1.2 * veg['texture'][1]  # autumn foliage


def test_weather_lowers_far_contrast_and_saturation(gen):
  base = gen['default']
  far = {s: _far_contrast(*gen[s]) / _far_contrast(*base) for s in gen}
  sat = {s: _saturation(gen[s][0]) / _saturation(base[0]) for s in gen}
  assert far['weather'] < 0.7, far  # ~0.6: fog by depth
  assert sat['weather'] < 0.8, sat  # ~0.6
  assert min(far, key=far.get) == 'weather', far
  assert min(sat, key=sat.get) == 'weather', sat


def test_sensor_blurs_and_compresses(gen):
  grad = {s: _gradient(gen[s][0]) / _gradient(gen['default'][0])
          for s in gen}
  block = {s: _blockiness(gen[s][0]) for s in gen}
  assert grad['sensor'] < 0.75, grad  # ~0.68: blur + DCT quantisation
  assert min(grad, key=grad.get) == 'sensor', grad
  assert block['sensor'] > 1.8, block  # ~2.5: 8x8 block borders
  assert all(v < 1.2 for s, v in block.items() if s != 'sensor'), block


def test_layout_changes_class_frequencies(gen):
  base = _histogram(gen['default'][1])
  hist = _histogram(gen['layout'][1])
  assert np.abs(hist - base).sum() > 0.35  # ~0.6 (L1 of the histograms)
  assert hist[scenes.SKY] < 0.5 * base[scenes.SKY]  # pitched-down camera
  traffic = [scenes.CAR, scenes.PERSON]
  assert hist[traffic].sum() > 1.3 * base[traffic].sum()  # busier street
  depth = synthetic.generate_depth('target', 2, height=H, width=W, seed=SEED,
                                   shift='layout')
  assert depth.shape == (2, H, W) and (depth > 0).mean() > 0.5


# ---------------------------------------------------------------------------
# Splits, caches and the registry
# ---------------------------------------------------------------------------


def test_splits_and_cache_keys_per_shift(tmp_path):
  kwargs = dict(num_images=3, height=16, width=32, seed=7)
  paths = {s: synthetic.cache_path(tmp_path, 'target', 'train', shift=s,
                                   **kwargs) for s in synthetic.SHIFTS}
  assert len(set(paths.values())) == len(paths)
  assert os.path.basename(paths['default']) == (
      'synthetic_v2_target_train_n3_16x32_seed7.npz')  # As before shifts.
  for shift in APPEARANCE + ('layout',):
    assert f'-{shift}-' in os.path.basename(paths[shift])
    assert synthetic.depth_cache_path(
        tmp_path, 'target', 'val', shift=shift, **kwargs) != (
            synthetic.depth_cache_path(tmp_path, 'target', 'val', **kwargs))
  for shift in ('default', 'weather'):
    name = registry.synthetic_name(shift)
    train, val = (pipeline.load_domain(
        name, role='target', data_dir=str(tmp_path), split=split, height=16,
        width=32, num_images=3, seed=7) for split in ('train', 'val'))
    expected = synthetic.generate('target', 3, height=16, width=32,
                                  seed=synthetic.split_seed(7, 'val'),
                                  shift=shift)
    np.testing.assert_array_equal(val.images, expected[0])
    assert not np.array_equal(train.images, val.images)
    assert os.path.exists(synthetic.cache_path(tmp_path, 'target', 'val',
                                               shift=shift, **kwargs))
  with pytest.raises(errors.DataError, match='target shift'):
    pipeline.load_domain('synthetic:weather', role='source',
                         data_dir=str(tmp_path), num_images=1)
  with pytest.raises(errors.DataError, match="'synthetic:layout'"):
    registry.lookup('synthetic:fog')
  with pytest.raises(ValueError, match='known shifts: default, texture'):
    synthetic.generate('target', 1, shift='fog')
  with pytest.raises(ValueError, match='target domain'):
    synthetic.generate('source', 1, shift='weather')


# ---------------------------------------------------------------------------
# Config: --config.target.shift
# ---------------------------------------------------------------------------


def test_config_target_shift_picks_the_data_set():
  c = source_only.get_config('tiny')
  assert (c.target.shift, c.target.name) == ('default', 'synthetic')
  c.target.shift = 'weather'
  assert c.target.name == 'synthetic:weather'
  assert c.to_dict()['target']['name'] == 'synthetic:weather'
  c.target.shift = 'fog'
  with pytest.raises(exceptions.ConfigError,
                     match='known shifts: default, texture, weather'):
    _ = c.target.name
  c.target.name = 'cityscapes'  # A real data set replaces the link.
  assert c.target.name == 'cityscapes'

  d = dann.get_config('tiny')
  assert (d.target.shift, d.target.name) == ('default', 'digits')
  assert dann.get_config('tiny,mnist_m').target.name == 'mnist_m'
  d.target.shift = 'mnist_texture'
  assert d.target.name == 'mnist_texture'
  d.target.shift = 'usps'
  with pytest.raises(exceptions.ConfigError, match='mnist_m, mnist_texture'):
    _ = d.target.name


# ---------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------


def test_digits_shifts():
  assert digits.TARGET_SHIFTS['default'] == 'digits'  # MNIST -> digits
  out = {}
  for shift in ('mnist_m', 'mnist_texture'):
    images, labels = digits.generate(digits.TARGET_SHIFTS[shift], 'val',
                                     seed=0)
    assert images.dtype == np.uint8 and images.shape == (1000, 28, 28, 3)
    assert labels.dtype == np.uint8 and labels.max() <= 9
    assert len(np.unique(labels)) == 10
    out[shift] = images
  assert _sha(out['mnist_m'][:50]) == _MNIST_M_BEFORE
  # Colour: mean max-min over RGB per pixel (0 for grey digits).
  spread = {s: float(np.ptp(im.astype(np.float32), axis=-1).mean())
            for s, im in out.items()}
  assert spread['mnist_m'] > 15, spread  # ~53: photo patches
  assert spread['mnist_texture'] > 1.5 * spread['mnist_m'], spread  # ~131
  again = digits.generate('mnist_texture', 'val', seed=0)[0]
  np.testing.assert_array_equal(again, out['mnist_texture'])  # Seeded.
  other = digits.generate('mnist_texture', 'val', seed=1)[0]
  assert not np.array_equal(other[:10], again[:10])
