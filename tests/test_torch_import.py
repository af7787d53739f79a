"""PyTorch -> jaxda weight import: converted models reproduce PyTorch.

The references are the hand-written PyTorch models of
`benchmarks.torch_reference` (the originals' state-dict names), run with
random weights and random BatchNorm statistics in eval mode; the jaxda model
with the converted weights must give the same outputs. Also: errors for
tensors that fit nowhere, missing leaves and wrong shapes; the CLI; and
`config.model.init_weights` through the training loop.
"""

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import child_env

torch = pytest.importorskip('torch')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `benchmarks` is a repository folder, not an installed package.
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.torch_reference import deeplab_v2
from benchmarks.torch_reference import discriminator as torch_disc
from benchmarks.torch_reference import vgg16 as torch_vgg
from jaxda import checkpoint as checkpoint_lib
from jaxda import models
from jaxda import state as state_lib
from jaxda.train import init_weights
from jaxda.models import vgg
from jaxda.weights import torch_import


def _randomize(module, seed=0):
  """Random weights (He-scaled) and random BN affine + running statistics."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
        m.weight.normal_(0, (2.0 / m.weight[0].numel())**0.5, generator=g)
        if m.bias is not None:
          m.bias.normal_(0, 0.1, generator=g)
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.normal_(0, 0.1, generator=g)
        m.running_mean.normal_(0, 0.1, generator=g)
        m.running_var.uniform_(0.5, 2.0, generator=g)
        m.num_batches_tracked.fill_(7)
  return module.eval()


def _state_dict(module, prefix=''):
  return {prefix + k: v.numpy().copy() for k, v in module.state_dict().items()}


def _images(shape, seed=1):
  """(B, C, H, W) torch tensor and its (B, H, W, C) jax twin."""
  x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
  return x, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _assert_same(got, want_nchw):
  """Equal to 1e-4 of the reference's scale (float32 over 100+ layers)."""
  want = want_nchw.detach().numpy()
  if want.ndim == 4:
    want = want.transpose(0, 2, 3, 1)
  got = np.asarray(got)
  assert got.shape == want.shape
  assert np.all(np.isfinite(got))
  scale = np.abs(want).max()
  assert scale > 0
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


# ----------------------------------------------------------------------------
# Converted models reproduce PyTorch.


def test_deeplabv2_r101_multi_level_matches_torch():
  net = _randomize(deeplab_v2.ResNetMulti((3, 4, 23, 3), num_classes=19))
  x, x_jax = _images((1, 3, 65, 65))
  with torch.no_grad():
    aux, main = net(x)
  # DataParallel checkpoints carry 'module.'; num_batches_tracked is ignored.
  weights = torch_import.convert_state_dict(_state_dict(net, 'module.'),
                                            'deeplabv2_r101')
  assert 'num_batches_tracked' not in str(jax.tree_util.tree_structure(
      weights))
  out = models.DeepLabV2(num_classes=19).apply(weights, x_jax)
  assert out['main'].shape == (1, 9, 9, 19)
  _assert_same(out['main'], main)
  _assert_same(out['aux'], aux)


@pytest.mark.parametrize('original', ['adaptsegnet_single', 'advent_single'])
def test_single_level_naming_matches_torch(original):
  """AdaptSegNet's single-level head is `layer5`, ADVENT's `layer6`."""
  if original == 'adaptsegnet_single':
    net = deeplab_v2.ResNetSingle((1, 1, 1, 1), 5, base_width=8,
                                  aspp_branches_used=2)
  else:
    net = deeplab_v2.ResNetMulti((1, 1, 1, 1), 5, base_width=8,
                                 multi_level=False, aspp_branches_used=2)
  net = _randomize(net, seed=3)
  x, x_jax = _images((2, 3, 41, 57))
  with torch.no_grad():
    want = net(x)
  if isinstance(want, tuple):
    assert want[0] is None
    want = want[1]
  weights = torch_import.convert_state_dict(_state_dict(net),
                                            'deeplabv2_tiny')
  assert 'aspp_aux' not in weights['params']
  model = models.DeepLabV2(5, (1, 1, 1, 1), 8, multi_level=False,
                           aspp_branches_used=2)
  _assert_same(model.apply(weights, x_jax)['main'], want)


def test_vgg16_matches_torch():
  # 256x256 gives an 8x8 conv map, so the 7x7 adaptive pool has overlapping
  # windows and fc6's (C, H, W) -> (H, W, C) row order matters.
  net = _randomize(torch_vgg.VGG16(num_classes=10, base_width=16,
                                   hidden_dim=32), seed=4)
  x, x_jax = _images((2, 3, 256, 256), seed=5)
  with torch.no_grad():
    want = net(x)
  weights = torch_import.convert_state_dict(_state_dict(net), 'vgg16')
  assert weights['batch_stats'] == {}
  model = models.VGG16(num_classes=10, base_width=16, hidden_dim=32)
  _assert_same(model.apply(weights, x_jax), want)


def test_deeplabv2_vgg16_matches_torch_and_takes_imagenet_backbone():
  net = _randomize(torch_vgg.DeeplabVGG(num_classes=6, base_width=16,
                                        aspp_branches_used=2), seed=6)
  x, x_jax = _images((2, 3, 67, 75), seed=7)
  with torch.no_grad():
    want = net(x)
  weights = torch_import.convert_state_dict(_state_dict(net),
                                            'deeplabv2_vgg16')
  model = models.DeepLabV2VGG(6, base_width=16, aspp_branches_used=2)
  out = model.apply(weights, x_jax)
  assert out['main'].shape == (2, 8, 9, 6)
  _assert_same(out['main'], want)
  # AdaptSegNet's VGG init: torchvision ImageNet convs, classifier dropped.
  imagenet = torch_import.convert_state_dict(
      _state_dict(torch_vgg.VGG16(base_width=16, hidden_dim=8)), 'vgg16',
      drop_prefixes=('classifier',))
  assert set(imagenet['params']) == {'backbone'}
  assert set(imagenet['params']['backbone']) == set(vgg.CONV_NAMES)
  for name in vgg.CONV_NAMES:
    for leaf in ('kernel', 'bias'):
      assert (imagenet['params']['backbone'][name][leaf].shape
              == weights['params']['backbone'][name][leaf].shape)


def test_fc_discriminator_matches_torch():
  net = _randomize(torch_disc.FCDiscriminator(num_classes=7, ndf=8), seed=8)
  x, x_jax = _images((2, 7, 64, 96), seed=9)
  with torch.no_grad():
    want = net(x)
  weights = torch_import.convert_state_dict(_state_dict(net),
                                            'fc_discriminator')
  _assert_same(models.FCDiscriminator(ndf=8).apply(weights, x_jax), want)


@pytest.mark.parametrize('in_hw,out_hw', [((8, 8), (7, 7)), ((3, 5), (7, 7)),
                                          ((13, 9), (7, 4)), ((7, 7), (7, 7))])
def test_adaptive_avg_pool_matches_torch(in_hw, out_hw):
  x, x_jax = _images((2, 4, *in_hw), seed=10)
  want = torch.nn.functional.adaptive_avg_pool2d(x, out_hw)
  _assert_same(vgg.adaptive_avg_pool(x_jax, out_hw), want)


def test_dense_kernel_flatten_order():
  """fc6 rows follow PyTorch's (C, H, W) flatten, permuted to (H, W, C)."""
  rng = np.random.default_rng(0)
  c, h, w, out = 3, 2, 4, 5
  weight = rng.normal(size=(out, c * h * w))
  feature = rng.normal(size=(h, w, c))
  want = weight @ feature.transpose(2, 0, 1).reshape(-1)  # NCHW flatten
  got = feature.reshape(-1) @ torch_import.dense_kernel(weight, (c, h, w))
  np.testing.assert_allclose(got, want, rtol=1e-12)
  np.testing.assert_array_equal(torch_import.dense_kernel(weight), weight.T)


# ----------------------------------------------------------------------------
# Errors name what does not fit.


def _tiny_multi(seed=11):
  return _randomize(deeplab_v2.ResNetMulti((1, 1, 1, 1), 5, base_width=8),
                    seed=seed)


def test_unmatched_tensors_are_listed():
  sd = _state_dict(_tiny_multi())
  sd['layer7.conv.weight'] = np.zeros((1, 1, 1, 1), np.float32)
  sd['fc.bias'] = np.zeros((3,), np.float32)
  with pytest.raises(torch_import.WeightImportError) as e:
    torch_import.convert_state_dict(sd, 'deeplabv2_tiny')
  assert 'layer7.conv.weight' in str(e.value)
  assert 'fc.bias' in str(e.value)
  assert '2 tensors match no' in str(e.value)


def test_missing_leaves_are_listed():
  sd = _state_dict(_tiny_multi())
  del sd['layer1.0.bn1.running_var']
  del sd['layer6.conv2d_list.3.bias']
  with pytest.raises(torch_import.WeightImportError) as e:
    torch_import.convert_state_dict(sd, 'deeplabv2_tiny')
  msg = str(e.value)
  assert 'batch_stats/backbone/layer1/0/bn1/var' in msg
  assert 'params/aspp_main/branch_3/bias' in msg
  assert '2 jaxda deeplabv2_tiny leaves have no tensor' in msg


def test_shape_mismatch_names_the_tensor():
  sd = _state_dict(_tiny_multi())
  sd['layer2.0.conv2.weight'] = np.zeros((16, 16, 1, 3), np.float32)
  with pytest.raises(torch_import.WeightImportError,
                     match=r"layer2\.0\.conv2\.weight.*backbone/layer2/0/"
                     r"conv2/kernel"):
    torch_import.convert_state_dict(sd, 'deeplabv2_tiny')
  with pytest.raises(torch_import.WeightImportError, match='unknown arch'):
    torch_import.convert_state_dict(sd, 'deeplabv3')


def test_wrong_depth_is_an_error():
  """A one-block-per-layer file is not a ResNet-50."""
  sd = _state_dict(_tiny_multi())
  with pytest.raises(torch_import.WeightImportError,
                     match=r'layer1/1/conv1/kernel'):
    torch_import.convert_state_dict(sd, 'deeplabv2_r50')


def test_backbone_only_needs_explicit_drop():
  """The DeepLab init ('Scale.' prefix) with a 21-class layer5 head."""
  net = deeplab_v2.ResNetSingle((1, 1, 1, 1), 21, base_width=8)
  sd = _state_dict(_randomize(net, seed=12), 'Scale.')
  with pytest.raises(torch_import.WeightImportError,
                     match=r'layer5\.conv2d_list\.0\.weight'):
    torch_import.convert_state_dict(sd, 'resnet_tiny')
  weights = torch_import.convert_state_dict(sd, 'resnet_tiny',
                                            drop_prefixes=('layer5',))
  assert set(weights['params']) == {'backbone'}
  np.testing.assert_array_equal(
      weights['params']['backbone']['layer2']['0']['conv1']['kernel'],
      sd['Scale.layer2.0.conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      weights['batch_stats']['backbone']['bn1']['mean'],
      sd['Scale.bn1.running_mean'])


def test_load_torch_file(tmp_path, monkeypatch):
  sd = {'a.weight': torch.randn(2, 3), 'a.bias': torch.randn(2).half(),
        'bn.num_batches_tracked': torch.tensor(5)}
  torch.save({'state_dict': sd, 'epoch': 3}, tmp_path / 'w.pth')
  loaded = torch_import.load_torch_file(str(tmp_path / 'w.pth'))
  assert set(loaded) == set(sd)
  assert loaded['a.bias'].dtype == np.float32
  np.testing.assert_array_equal(loaded['a.weight'], sd['a.weight'].numpy())
  np.savez(tmp_path / 'w.npz', **loaded)
  from_npz = torch_import.load_torch_file(str(tmp_path / 'w.npz'))
  jax.tree.map(np.testing.assert_array_equal, from_npz, loaded)
  with pytest.raises(torch_import.WeightImportError, match='does not exist'):
    torch_import.load_torch_file(str(tmp_path / 'none.pth'))
  monkeypatch.setitem(sys.modules, 'torch', None)  # as if not installed
  with pytest.raises(torch_import.WeightImportError, match=r'jaxda\[torch\]'):
    torch_import.load_torch_file(str(tmp_path / 'w.pth'))


def test_overlay_errors():
  target = {'a': {'k': jnp.zeros((2, 3))}, 'b': jnp.ones(4)}
  merged, kept = torch_import.overlay(target, {'a': {'k': np.full((2, 3), 2.)}},
                                      'params', 'x')
  np.testing.assert_array_equal(merged['a']['k'], np.full((2, 3), 2.))
  np.testing.assert_array_equal(merged['b'], np.ones(4))
  assert kept == ['b']
  with pytest.raises(torch_import.WeightImportError, match="'?c/k"):
    torch_import.overlay(target, {'c': {'k': np.zeros(1)}}, 'params', 'x')
  with pytest.raises(torch_import.WeightImportError, match=r'a/k.*\(3, 2\)'):
    torch_import.overlay(target, {'a': {'k': np.zeros((3, 2))}}, 'params',
                         'x')


# ----------------------------------------------------------------------------
# CLI and config.model.init_weights.


def _random_variables(model):
  """Random variables of `model`'s shapes (no XLA compile of `init`)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(14)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def test_cli_round_trip_and_init_weights(tmp_path):
  net = _randomize(deeplab_v2.ResNetMulti((1, 1, 1, 1), 21, base_width=8),
                   seed=13)
  torch.save(net.state_dict(), tmp_path / 'init.pth')
  out = str(tmp_path / 'converted')
  env = child_env.child_env()
  cmd = [sys.executable, '-m', 'experiments.import_weights',
         f'--torch={tmp_path / "init.pth"}', '--arch=resnet_tiny',
         f'--out={out}']
  # Without --drop the heads fit nowhere: a one-line error, exit status 1.
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1
  assert 'layer6.conv2d_list.0.weight' in proc.stderr
  assert 'Traceback' not in proc.stderr
  proc = subprocess.run(cmd + ['--drop=layer5,layer6'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert os.path.isfile(os.path.join(out, 'import_info.json'))

  expected = torch_import.convert_state_dict(
      _state_dict(net), 'resnet_tiny', drop_prefixes=('layer5', 'layer6'))
  saved = checkpoint_lib.load_weights(out)
  for what in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, saved[what], expected[what])

  # Loaded as config.model.init_weights: backbone from the file, heads and
  # optimiser state fresh. (A stand-in `run`: `loop.create_state`
  # costs ~1 min on a loaded 2-core machine.)
  model = models.create_segmenter('deeplabv2_tiny', 4)
  variables = _random_variables(model)
  tx = optax.sgd(0.1, momentum=0.9)
  state = state_lib.TrainState.create(
      params=variables['params'], batch_stats=variables['batch_stats'],
      tx=tx, disc_params={}, disc_tx=None)
  logs = []
  run = types.SimpleNamespace(tx=tx, log=logs.append)
  loaded = init_weights.load_init_weights(run, state, out)
  jax.tree.map(np.testing.assert_array_equal, loaded.params['backbone'],
               expected['params']['backbone'])
  jax.tree.map(np.testing.assert_array_equal, loaded.batch_stats,
               expected['batch_stats'])
  for head in ('aspp_main', 'aspp_aux'):
    jax.tree.map(np.testing.assert_array_equal, loaded.params[head],
                 variables['params'][head])
  assert 'aspp_aux/branch_0' in logs[0]
  # A file for another architecture is refused with the leaf names.
  wide = models.create_segmenter('deeplabv2_tiny', 4).clone(base_width=16)
  wide_vars = _random_variables(wide)
  wide_state = state.replace(params=wide_vars['params'],
                             batch_stats=wide_vars['batch_stats'])
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r'backbone/conv1/kernel.*\(7, 7, 3, 8\)'):
    init_weights.load_init_weights(run, wide_state, out)
