"""Surface normals as the anchor-task main task (issue 22 item 3)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from experiments.configs import anchor as anchor_configs
from jaxda import methods
from jaxda.data import pipeline
from jaxda.data.embedded import synthetic
from jaxda.tasks import normals


def test_cosine_loss_and_angles():
  gt = np.zeros((1, 2, 2, 3), np.float32)
  gt[0, 0, 0] = (0, 0, -1)
  gt[0, 0, 1] = (0, -1, 0)
  gt[0, 1, 0] = (1, 0, 0)  # pixel (1, 1) stays invalid (zero)
  pred = np.zeros_like(gt)
  pred[0, 0, 0] = (0, 0, -5)  # length does not matter: 0 deg
  pred[0, 0, 1] = (0, -1, -1)  # 45 deg
  pred[0, 1, 0] = (-1, 0, 0)  # 180 deg
  pred[0, 1, 1] = (1, 1, 1)  # invalid: ignored
  loss = normals.cosine_loss(jnp.asarray(pred), jnp.asarray(gt))
  want = (0 + (1 - np.cos(np.pi / 4)) + 2) / 3
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  err = np.asarray(normals.angle_errors(jnp.asarray(pred), jnp.asarray(gt)))
  np.testing.assert_allclose(err[0, 0], [0, 45], atol=1e-3)
  np.testing.assert_allclose(err[0, 1, 0], 180, atol=1e-2)
  m = normals.metrics_from_errors(np.array([5.0, 15.0, 25.0, 40.0]))
  assert m['mean_angle_error'] == 21.25 and m['median_angle_error'] == 20.0
  assert (m['within_11_25'], m['within_22_5'], m['within_30']) == (
      25.0, 50.0, 75.0)
  assert m['num_pixels'] == 4
  # Tables compare runs by a fraction (they print it as %).
  assert normals.headline(m) == ('within_22_5', 0.5)


def test_embedded_normals_follow_the_scene_geometry():
  n = synthetic.generate_normals('target', 3, height=32, width=64, seed=1)
  d = synthetic.generate_depth('target', 3, height=32, width=64, seed=1)
  norm = np.linalg.norm(n, axis=-1)
  np.testing.assert_array_equal(norm > 0, d > 0)
  np.testing.assert_allclose(norm[norm > 0], 1.0)
  kinds = {tuple(v) for v in n[norm > 0].reshape(-1, 3)}
  assert kinds == {synthetic.NORMAL_UP, synthetic.NORMAL_FACING}
  # Ground pixels: depth varies down a column; object fronts: constant.
  ground = n[..., 1] < 0
  assert ground.sum() > 0 and (~ground & (norm > 0)).sum() > 0


def _folder(tmp_path, normals_of):
  root = tmp_path / 'set'
  (root / 'train' / 'images').mkdir(parents=True)
  (root / 'train' / 'normals').mkdir()
  for i in range(2):
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(
        root / 'train' / 'images' / f'{i}.png')
    np.save(root / 'train' / 'normals' / f'{i}.npy', normals_of(i))
  return str(root)


def test_folder_normals_and_bad_files(tmp_path):
  good = np.zeros((6, 8, 3), np.float32)
  good[..., 2] = -1.0
  good[0] = 0.0  # no normal on the first row
  root = _folder(tmp_path / 'a', lambda i: good)
  got = normals.read_folder_normals(root, 'train', 3, 4)
  assert got.shape == (2, 3, 4, 3)
  np.testing.assert_array_equal(got[:, 1:, :, 2], -1.0)
  # Not unit length: a one-line error naming the file.
  root = _folder(tmp_path / 'b', lambda i: good * (2.0 if i else 1.0))
  with pytest.raises(pipeline.DataError) as e:
    normals.read_folder_normals(root, 'train', 3, 4)
  assert os.path.join('normals', '1.npy') in str(e.value)
  assert 'unit length' in str(e.value) and '\n' not in str(e.value)
  # Wrong size.
  root = _folder(tmp_path / 'c', lambda i: good[:5] if i == 0 else good)
  with pytest.raises(pipeline.DataError) as e:
    normals.read_folder_normals(root, 'train', 3, 4)
  assert os.path.join('normals', '0.npy') in str(e.value)
  assert '(5, 8, 3)' in str(e.value) and '\n' not in str(e.value)


def test_normals_preset():
  c = anchor_configs.get_config('normals')
  assert (c.method, c.task) == ('anchor_normals', 'normals')
  assert methods.get_method(c.method).task == 'normals'
  depth = anchor_configs.get_config('')
  assert (depth.method, depth.task) == ('anchor', 'depth')


@pytest.mark.slow
def test_normals_tiny_end_to_end(tmp_path):
  c = anchor_configs.get_config('normals,mtl_a,no_freeze,tiny')
  methods.train_and_evaluate(c, str(tmp_path))
  target = json.loads((tmp_path / 'summary.json').read_text())['target']
  for key in ('mean_angle_error', 'median_angle_error', 'within_11_25',
              'within_22_5', 'within_30'):
    assert np.isfinite(target[key])
  assert 0 <= target['within_11_25'] <= target['within_30'] <= 100
