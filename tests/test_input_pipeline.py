"""The input-pipeline benchmark end to end, `prefetch`, `train_batches(workers)`
and the readers' field-wise decoding."""

import json
import os

import numpy as np
import pytest

from benchmarks import input_pipeline
from jaxda.data import pipeline
from jaxda.data.readers import gta5


def test_benchmark_smoke_writes_json(tmp_path):
  input_pipeline.main(['--out', str(tmp_path), '--smoke', '--threads', '1,2'])
  with open(os.path.join(tmp_path, 'input_pipeline.json')) as f:
    result = json.load(f)
  for key in ('machine', 'target', 'rows', 'summary', 'paired_wait',
              'extrapolation', 'sizes', 'file_mb_per_example'):
    assert key in result
  assert result['machine']['cores'] >= 1
  assert result['target']['images_per_s'] == pytest.approx(161.4, abs=0.5)
  assert {(r['domain'], r['augmented'], r['threads'])
          for r in result['rows']} == {
              (d, a, t) for d in ('gta5', 'cityscapes') for a in (False, True)
              for t in (1, 2)}
  assert all(r['images_per_s'] > 0 for r in result['rows'])
  for s in result['summary'].values():
    assert s['per_core'] > 0 and s['cores_for_target'] > 0
  assert set(result['paired_wait']) == {'step_s', 'serial',
                                        'prefetch_workers2'}


def test_prefetch_same_items_in_order():
  assert list(pipeline.prefetch(iter(range(50)), size=2)) == list(range(50))
  assert list(pipeline.prefetch(iter([]), size=1)) == []
  with pytest.raises(ValueError):
    next(pipeline.prefetch(iter(range(3)), size=0))


def test_prefetch_propagates_exceptions_in_place():
  def items():
    yield 1
    yield 2
    raise KeyError('broken file')

  it = pipeline.prefetch(items(), size=4)
  assert next(it) == 1
  assert next(it) == 2
  with pytest.raises(KeyError, match='broken file'):
    next(it)


def test_prefetch_close_stops_thread():
  produced = []

  def items():
    for i in range(1000):
      produced.append(i)
      yield i

  it = pipeline.prefetch(items(), size=2)
  assert next(it) == 0
  it.close()
  count = len(produced)
  import time  # pylint: disable=g-import-not-at-top
  time.sleep(0.3)
  assert len(produced) <= count + 1 and count < 10


def _batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize('workers', [2, 3])
def test_train_batches_workers_same_batches(workers):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
  labels = rng.integers(0, 19, (5, 4, 6), dtype=np.uint8)
  kwargs = dict(batch_size=3, seed=7, start_step=2, flip=True)
  serial = pipeline.train_batches(images, labels, **kwargs)
  parallel = pipeline.train_batches(images, labels, workers=workers,
                                    **kwargs)
  for _ in range(12):  # Crosses several epochs (3 per 5 images).
    _batches_equal(next(serial), next(parallel))
  parallel.close()
  with pytest.raises(ValueError):
    pipeline.train_batches(images, labels, batch_size=1, seed=0, workers=0)


def _write_gta5(root, n=3, size=(12, 20)):
  rng = np.random.default_rng(1)
  input_pipeline.write_gta5(str(root), n, size, rng)


def test_lazy_rows_decode_only_their_field(tmp_path, monkeypatch):
  _write_gta5(tmp_path)
  source = gta5.GTA5(str(tmp_path))
  domain = pipeline.load_domain('gta5', data_dir=str(tmp_path), height=6,
                                width=10)
  whole = [source[i] for i in range(3)]
  # Field-wise reads equal the whole-example reads.
  for i in range(3):
    np.testing.assert_array_equal(source.read_field(i, 'image'),
                                  whole[i]['image'])
    np.testing.assert_array_equal(source.read_field(i, 'label'),
                                  whole[i]['label'])
  calls = []
  read_rgb = gta5.common.read_rgb
  monkeypatch.setattr(gta5.common, 'read_rgb',
                      lambda p: calls.append(p) or read_rgb(p))
  labels = domain.labels[np.array([0, 2])]
  assert labels.shape == (2, 6, 10) and not calls
  domain.images[np.array([1])]
  assert len(calls) == 1


def test_label_ids_out_of_table_still_fail(tmp_path):
  _write_gta5(tmp_path, n=1)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = os.path.join(tmp_path, 'labels', '00001.png')
  Image.fromarray(np.full((12, 20), 200, np.uint8), mode='L').save(path)
  with pytest.raises(pipeline.DataError, match=r'ids \[200\]'):
    gta5.GTA5(str(tmp_path)).read_field(0, 'label')
