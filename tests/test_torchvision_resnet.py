"""torchvision ResNet-50 import for the classifiers (issue 22 item 1).

A hand-written torch copy of torchvision's ResNet (same state-dict names and
shapes; torchvision itself is not imported) with random weights is
converted and compared with torch's eval-mode forward.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
from torch import nn as tnn  # pylint: disable=g-import-not-at-top

from jaxda import models  # pylint: disable=g-import-not-at-top
from jaxda.models import torchvision_resnet
from jaxda.weights import torch_import
from jaxda.weights import torchvision_import


class _Bottleneck(tnn.Module):
  """torchvision.models.resnet.Bottleneck (v1.5: stride on conv2)."""

  def __init__(self, inplanes, width, stride, downsample):
    super().__init__()
    self.conv1 = tnn.Conv2d(inplanes, width, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(width)
    self.conv2 = tnn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(width)
    self.conv3 = tnn.Conv2d(width, width * 4, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(width * 4)
    self.relu = tnn.ReLU()
    self.downsample = tnn.Sequential(
        tnn.Conv2d(inplanes, width * 4, 1, stride, bias=False),
        tnn.BatchNorm2d(width * 4)) if downsample else None

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = self.downsample(x) if self.downsample is not None else x
    return self.relu(out + identity)


class _ResNet(tnn.Module):
  """torchvision.models.resnet.ResNet with Bottleneck blocks."""

  def __init__(self, layers=(3, 4, 6, 3), width=64, num_classes=1000):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = tnn.BatchNorm2d(width)
    self.relu = tnn.ReLU()
    self.maxpool = tnn.MaxPool2d(3, 2, 1)
    inplanes = width
    for k, n in enumerate(layers):
      blocks = []
      for i in range(n):
        blocks.append(_Bottleneck(inplanes, width * 2**k,
                                  2 if (k and not i) else 1, i == 0))
        inplanes = width * 2**k * 4
      setattr(self, f'layer{k + 1}', tnn.Sequential(*blocks))
    self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
    self.fc = tnn.Linear(inplanes, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return x, self.fc(torch.flatten(self.avgpool(x), 1))


def _random_net(layers=(3, 4, 6, 3), width=64, seed=0):
  torch.manual_seed(seed)
  net = _ResNet(layers, width)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, tnn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  return net.eval()


def _state_dict(net):
  return {k: v.numpy() for k, v in net.state_dict().items()}


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def test_resnet50_matches_torch_eval_forward():
  net = _random_net()
  sd = _state_dict(net)
  assert len([k for k in sd if k.endswith('num_batches_tracked')]) == 53
  x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    want_map, want_logits = (t.numpy() for t in net(torch.from_numpy(x)))
  full = torchvision_import.convert_torchvision(sd, 'torchvision_resnet50')
  model = torchvision_resnet.TorchvisionResNet(num_classes=1000)
  got_map, got_logits = jax.jit(model.apply)(full, x.transpose(0, 2, 3, 1))
  assert got_map.shape == (2, 2, 2, 2048)
  assert _rel(got_map, want_map.transpose(0, 2, 3, 1)) <= 1e-4
  assert _rel(got_logits, want_logits) <= 1e-4
  # --drop=fc: the same leaves under the classifier's feature extractor.
  backbone = torchvision_import.convert_torchvision(
      sd, 'torchvision_resnet50', drop_prefixes=('fc',))
  for what in ('params', 'batch_stats'):
    tree = dict(full[what])
    tree.pop('fc', None)
    jax.tree.map(np.testing.assert_array_equal,
                 backbone[what][torchvision_import.FEATURE_EXTRACTOR], tree)
  # ... whose shapes are those of ImageClassifier('torchvision_resnet50').
  clf = models.create_classifier('torchvision_resnet50', 31)
  shapes = jax.eval_shape(clf.init, jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)))
  for what in ('params', 'batch_stats'):
    jax.tree.map(lambda s, a: np.testing.assert_equal(s.shape, a.shape),
                 shapes[what]['feature_extractor'],
                 backbone[what]['feature_extractor'])


def test_tiny_classifier_features_match_torch():
  net = _random_net((1, 1, 1, 1), 8, seed=1)
  x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    want_map, _ = (t.numpy() for t in net(torch.from_numpy(x)))
  w = torchvision_import.convert_torchvision(
      _state_dict(net), 'torchvision_resnet_tiny', drop_prefixes=('fc',))
  clf = models.create_classifier('torchvision_resnet_tiny', 5, 16)
  # `features` reads only the feature extractor's leaves.
  got = jax.jit(lambda v, x: clf.apply(v, x, method=clf.features))(
      w, x.transpose(0, 2, 3, 1))
  assert _rel(got, want_map.transpose(0, 2, 3, 1)) <= 1e-4


def _one_line_error(fn, *patterns):
  with pytest.raises(torch_import.WeightImportError) as e:
    fn()
  message = str(e.value)
  assert '\n' not in message
  for p in patterns:
    assert p in message, message
  return message


def test_bad_files_are_one_line_errors_naming_the_file(tmp_path):
  net = _random_net((1, 1, 1, 1), 8, seed=2)
  path = str(tmp_path / 'tv_tiny.pth')
  torch.save(net.state_dict(), path)
  # A torchvision file given a DeepLab/Caffe ResNet arch.
  _one_line_error(lambda: torchvision_import.convert_file(
      path, 'resnet_tiny', ('fc',)), path, 'torchvision_resnet50')
  # Weights of another width (and depth) than the arch.
  _one_line_error(lambda: torchvision_import.convert_file(
      path, 'torchvision_resnet50', ('fc',)), path, 'shape mismatches',
      'conv1.weight')
  # A DeepLab file given the torchvision arch.
  sd = {('Scale.' + k): v for k, v in _state_dict(net).items()
        if not k.startswith('fc.')}
  np.savez(str(tmp_path / 'deeplab.npz'), **sd)
  _one_line_error(lambda: torchvision_import.convert_file(
      str(tmp_path / 'deeplab.npz'), 'torchvision_resnet_tiny'),
                  'deeplab.npz', 'DeepLab')
  # The right arch works and reports the file's tensor count.
  weights, n = torchvision_import.convert_file(
      path, 'torchvision_resnet_tiny', ('fc',))
  assert n == len(net.state_dict())
  assert set(weights['params']) == {'feature_extractor'}
  assert os.path.isfile(path)


def _fake_office(root, rng):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for domain in ('amazon', 'webcam'):
    for cls in ('mug', 'back_pack', 'trash_can'):
      for j in range(3):
        path = os.path.join(root, domain, 'images', cls, f'frame_{j:04d}.jpg')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(path)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['dann', 'tada'])
def test_paper_preset_trains_from_imported_weights(tmp_path, name):
  import importlib  # pylint: disable=g-import-not-at-top
  from jaxda import methods  # pylint: disable=g-import-not-at-top
  from jaxda.weights import torch_import as ti  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / 'office31')
  _fake_office(root, np.random.default_rng(0))
  weights, _ = torchvision_import.convert_file(
      _save(tmp_path, _random_net((1, 1, 1, 1), 8)),
      'torchvision_resnet_tiny', ('fc',))
  init = str(tmp_path / 'imported')
  ti.save_converted(weights, init, {'arch': 'torchvision_resnet_tiny'})
  config = importlib.import_module(
      f'experiments.configs.{name}').get_config('paper,tiny')
  assert config.model.name == 'torchvision_resnet50'
  assert config.model.bn_joint and config.data.crop_height == 224
  config.model.name = 'torchvision_resnet_tiny'
  config.data.height = config.data.width = 40
  config.data.crop_height = config.data.crop_width = 32
  config.num_steps = 2
  config.source.name, config.target.name = 'office31:amazon', 'office31:webcam'
  config.source.data_dir = config.target.data_dir = root
  config.model.init_weights = init
  summary = methods.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['steps'] == 2
  assert 0.0 <= summary['target']['accuracy'] <= 1.0


def _save(tmp_path, net):
  path = str(tmp_path / 'tv.pth')
  torch.save(net.state_dict(), path)
  return path
