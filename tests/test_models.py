"""Tests for jaxda.models: geometry, NumPy references, BN modes, registry.

ResNet-101 is only ever traced (`jax.eval_shape`), never run.
"""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda import models
from jaxda.models import deeplab
from jaxda.models import discriminator
from jaxda.models import resnet

NUM_CLASSES = 19


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/')


def _flat(tree) -> dict:
  return {_path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@functools.lru_cache(maxsize=None)
def _abstract_init(name: str, h: int, w: int, **overrides):
  """(outputs, variables) as ShapeDtypeStructs for a (1, h, w, 3) input."""
  model = models.create_segmenter(name, NUM_CLASSES, **overrides)
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x), x)


# ----------------------------------------------------------------------------
# Independent NumPy references.


def _np_conv(x, w, b=None, *, stride=1, padding=0, dilation=1):
  """Cross-correlation, x (B, H, W, Ci), w (kh, kw, Ci, Co), symmetric pad."""
  x = np.pad(x.astype(np.float64),
             ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  kh, kw = w.shape[:2]
  oh = (x.shape[1] - dilation * (kh - 1) - 1) // stride + 1
  ow = (x.shape[2] - dilation * (kw - 1) - 1) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i * dilation:i * dilation + (oh - 1) * stride + 1:stride,
                j * dilation:j * dilation + (ow - 1) * stride + 1:stride]
      out += patch @ w[i, j].astype(np.float64)
  return out if b is None else out + b


def _np_max_pool_ceil(x, k, s, p):
  """PyTorch MaxPool2d(k, s, p, ceil_mode=True) by explicit window loops."""
  def out_len(n):
    o = -(-(n + 2 * p - k) // s) + 1
    # PyTorch drops a last window that would start in the right padding.
    if (o - 1) * s >= n + p:
      o -= 1
    return o
  b, h, w, c = x.shape
  oh, ow = out_len(h), out_len(w)
  out = np.empty((b, oh, ow, c), x.dtype)
  for i in range(oh):
    for j in range(ow):
      r0, c0 = max(i * s - p, 0), max(j * s - p, 0)
      r1, c1 = min(i * s - p + k, h), min(j * s - p + k, w)
      out[:, i, j] = x[:, r0:r1, c0:c1].max(axis=(1, 2))
  return out


def _np_bn(x, v, eps=1e-5):
  return ((x - v['mean']) / np.sqrt(v['var'] + eps) * v['scale'] + v['bias'])


def _np_bottleneck(x, params, stats, *, stride, dilation):
  bn = lambda y, n: _np_bn(y, {**params[n], **stats[n]})
  k = lambda n: params[n]['kernel']
  y = np.maximum(bn(_np_conv(x, k('conv1'), stride=stride), 'bn1'), 0)
  y = np.maximum(bn(_np_conv(y, k('conv2'), padding=dilation,
                             dilation=dilation), 'bn2'), 0)
  y = bn(_np_conv(y, k('conv3')), 'bn3')
  shortcut = bn(_np_conv(x, k('downsample_conv'), stride=stride),
                'downsample_bn')
  return np.maximum(y + shortcut, 0)


def _normal(shape, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=shape).astype(np.float32) * scale)


def _random_variables(module, x, seed, scale=0.5, **kwargs):
  """Variables of `module` for input `x`, filled from NumPy's RNG.

  Real `init` is avoided: compiling JAX's RNG on CPU costs seconds. Variances
  are made positive.
  """
  abstract = jax.eval_shape(
      functools.partial(module.init, **kwargs), jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    v = rng.normal(size=leaf.shape).astype(np.float32) * scale
    if _path_str(path).endswith('var'):
      v = np.abs(v) + 0.5
    return jnp.asarray(v)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.lru_cache(maxsize=None)
def _tiny_init():
  """A real (jitted) init of the tiny model, shared by the tests."""
  model = models.create_segmenter('deeplabv2_tiny', NUM_CLASSES)
  x = jnp.zeros((1, 32, 32, 3))
  return model, jax.jit(model.init)(jax.random.key(0), x)


# ----------------------------------------------------------------------------
# Geometry.


@pytest.mark.parametrize('name', ['deeplabv2_resnet101', 'deeplabv2_tiny'])
@pytest.mark.parametrize('hw, logits_hw, layer1_hw', [
    ((512, 1024), (65, 129), (129, 257)),
    ((720, 1280), (91, 161), (181, 321)),
])
def test_segmenter_logit_geometry(name, hw, logits_hw, layer1_hw):
  outputs, variables = _abstract_init(name, *hw)
  assert set(outputs) == {'main', 'aux'}
  for out in outputs.values():
    assert out.shape == (1, *logits_hw, NUM_CLASSES)
    assert out.dtype == jnp.float32
  model = models.create_segmenter(name, NUM_CLASSES)
  backbone = resnet.ResNet(model.stage_sizes, model.base_width)
  feats = jax.eval_shape(
      lambda v, x: backbone.apply(
          {'params': v['params']['backbone'],
           'batch_stats': v['batch_stats']['backbone']}, x),
      variables, jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32))
  w = model.base_width
  assert feats['layer1'].shape == (1, *layer1_hw, 4 * w)
  assert feats['layer2'].shape == (1, *logits_hw, 8 * w)
  assert feats['layer3'].shape == (1, *logits_hw, 16 * w)
  assert feats['layer4'].shape == (1, *logits_hw, 32 * w)


@pytest.mark.parametrize('hw, out_hw', [((512, 1024), (16, 32)),
                                        ((720, 1280), (22, 40))])
def test_discriminator_geometry(hw, out_hw):
  disc = models.create_discriminator()
  x = jax.ShapeDtypeStruct((2, *hw, NUM_CLASSES), jnp.float32)
  out, _ = jax.eval_shape(
      lambda x: disc.init_with_output(jax.random.key(0), x), x)
  assert out.shape == (2, *out_hw, 1)


def test_tiny_forward_runs_and_is_finite():
  model, variables = _tiny_init()
  x = _normal((2, 64, 128, 3), seed=0)
  out = jax.jit(model.apply)(variables, x)
  chex.assert_shape([out['main'], out['aux']], (2, 9, 17, NUM_CLASSES))
  chex.assert_tree_all_finite(out)
  assert not np.allclose(out['main'], out['aux'])


# ----------------------------------------------------------------------------
# Ceil-mode max pool.


@pytest.mark.parametrize('k, s, p', [(3, 2, 1), (2, 2, 1), (3, 3, 1),
                                     (2, 2, 0), (4, 3, 2)])
def test_max_pool_ceil_matches_numpy(k, s, p):
  rng = np.random.default_rng(0)
  for h, w in [(8, 9), (11, 14), (5, 7), (16, 13)]:
    x = rng.normal(size=(2, h, w, 3)).astype(np.float32) - 5.0  # all < 0
    got = resnet.max_pool_ceil(jnp.asarray(x), window=k, stride=s, padding=p)
    np.testing.assert_array_equal(np.asarray(got),
                                  _np_max_pool_ceil(x, k, s, p))


def test_max_pool_ceil_differs_from_floor_mode():
  # 256 -> 129 with ceil mode; floor mode would give 128.
  x = jnp.zeros((1, 256, 512, 1))
  assert resnet.max_pool_ceil(x).shape == (1, 129, 257, 1)


# ----------------------------------------------------------------------------
# Parameter counts and names.


def _count(tree) -> int:
  return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


def _arithmetic_counts(stage_sizes, width=64, num_classes=NUM_CLASSES):
  """(params, batch_stats) of DeepLabV2, counted by hand per block."""
  params = 7 * 7 * 3 * width  # conv1 (no bias)
  bn_channels = width  # bn1
  inplanes = width
  for k, n in enumerate(stage_sizes):
    planes = width * 2**k
    for b in range(n):
      params += inplanes * planes + planes * planes * 9 + planes * planes * 4
      bn_channels += planes + planes + 4 * planes
      if b == 0:
        params += inplanes * 4 * planes
        bn_channels += 4 * planes
      inplanes = 4 * planes
  params += 2 * bn_channels  # BN scale and bias
  heads = sum(4 * (9 * c * num_classes + num_classes)
              for c in (16 * width, 32 * width))
  return params + heads, 2 * bn_channels


def test_resnet101_parameter_count():
  _, variables = _abstract_init('deeplabv2_resnet101', 512, 1024)
  expected_params, expected_stats = _arithmetic_counts((3, 4, 23, 3))
  assert _count(variables['params']) == expected_params
  assert _count(variables['batch_stats']) == expected_stats
  # torchvision's resnet101 has 44,549,160 params, 2,049,000 of them in fc;
  # the DeepLab variant only moves strides, so the backbone count matches.
  assert _count(variables['params']['backbone']) == 44_549_160 - 2_049_000
  heads = _count(variables['params']) - _count(variables['params']['backbone'])
  assert heads == 4 * (9 * 1024 * 19 + 19) + 4 * (9 * 2048 * 19 + 19)


def test_resnet50_backbone_count_matches_torchvision():
  model = models.create_segmenter('deeplabv2_resnet50', NUM_CLASSES)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  # torchvision resnet50: 25,557,032 params, fc 2048 * 1000 + 1000.
  assert _count(variables['params']['backbone']) == 25_557_032 - 2_049_000


def test_parameter_names_follow_pytorch_state_dict():
  _, variables = _abstract_init('deeplabv2_resnet101', 512, 1024)
  paths = set(_flat(variables['params']))
  for p in ['backbone/conv1/kernel', 'backbone/bn1/scale',
            'backbone/layer1/0/conv1/kernel',
            'backbone/layer1/0/downsample_conv/kernel',
            'backbone/layer1/0/downsample_bn/bias',
            'backbone/layer3/22/conv3/kernel', 'backbone/layer4/2/bn3/bias',
            'aspp_main/branch_3/kernel', 'aspp_aux/branch_0/bias']:
    assert p in paths, p
  assert not any('layer3/1/downsample' in p for p in paths)
  assert set(variables['params']) == {'backbone', 'aspp_main', 'aspp_aux'}
  k = _flat(variables['params'])
  assert k['backbone/layer2/0/conv1/kernel'].shape == (1, 1, 256, 128)
  assert k['backbone/layer4/0/conv2/kernel'].shape == (3, 3, 512, 512)


@pytest.mark.parametrize('name', ['deeplabv2_resnet101', 'deeplabv2_tiny'])
def test_param_regexes_partition_params(name):
  _, variables = _abstract_init(name, 64, 64)
  # A module is a BatchNorm iff it owns batch statistics: an independent
  # criterion from the regex on names.
  bn_modules = {p.rsplit('/', 1)[0] for p in _flat(variables['batch_stats'])}
  n_bn = n_head = 0
  for path in _flat(variables['params']):
    module, leaf = path.rsplit('/', 1)
    is_bn = module in bn_modules and leaf in ('scale', 'bias')
    is_head = path.split('/')[0] in ('aspp_main', 'aspp_aux')
    assert (re.search(models.batchnorm_param_regex, path) is not None) == is_bn
    assert (re.search(models.head_param_regex, path) is not None) == is_head
    n_bn += is_bn
    n_head += is_head
  blocks = sum(models.create_segmenter(name, 1).stage_sizes)
  assert n_bn == 2 * (1 + 3 * blocks + 4)
  assert n_head == 2 * 2 * 4


def test_conv_init_statistics():
  model, variables = _tiny_init()
  params = variables['params']
  kernel = np.asarray(params['backbone']['layer4']['0']['conv3']['kernel'])
  assert abs(kernel.std() - 0.01) < 0.001 and abs(kernel.mean()) < 0.001
  assert 'bias' not in params['backbone']['layer4']['0']['conv3']
  bias = np.asarray(params['aspp_main']['branch_0']['bias'])
  bound = 1 / math.sqrt(9 * 32 * model.base_width)
  assert np.all(np.abs(bias) <= bound) and np.any(bias != 0)


# ----------------------------------------------------------------------------
# Building blocks against NumPy.


def test_bottleneck_matches_numpy_reference():
  block = resnet.Bottleneck(width=3, stride=2, dilation=2, downsample=True)
  x = _normal((2, 9, 11, 5), seed=0)
  variables = _random_variables(block, x, seed=1)
  params, stats = variables['params'], variables['batch_stats']
  got = block.apply({'params': params, 'batch_stats': stats}, x)
  want = _np_bottleneck(np.asarray(x), jax.tree.map(np.asarray, params),
                        jax.tree.map(np.asarray, stats), stride=2, dilation=2)
  assert got.shape == (2, 5, 6, 12)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_aspp_matches_numpy_reference():
  aspp = deeplab.ASPP(4, dilations=(1, 2, 3, 6))
  x = _normal((2, 7, 10, 6), seed=0)
  params = _random_variables(aspp, x, seed=1, scale=1.0)['params']
  got = aspp.apply({'params': params}, x)
  p = jax.tree.map(np.asarray, params)
  want = sum(_np_conv(np.asarray(x), p[f'branch_{i}']['kernel'],
                      p[f'branch_{i}']['bias'], padding=d, dilation=d)
             for i, d in enumerate((1, 2, 3, 6)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('branches_used, depends', [(2, False), (4, True)])
def test_aspp_branches_used(branches_used, depends):
  aspp = deeplab.ASPP(3, branches_used=branches_used)
  x = _normal((1, 30, 30, 8), seed=0)
  params = _random_variables(aspp, x, seed=1)['params']
  assert set(params) == {'branch_0', 'branch_1', 'branch_2', 'branch_3'}
  perturbed = dict(params)
  for name in ('branch_2', 'branch_3'):
    perturbed[name] = jax.tree.map(lambda v: v + 1.0, params[name])
  out = aspp.apply({'params': params}, x)
  out_perturbed = aspp.apply({'params': perturbed}, x)
  assert (not np.allclose(out, out_perturbed, atol=1e-6)) == depends
  # Branches 0-1 always matter.
  perturbed['branch_1'] = jax.tree.map(lambda v: v + 1.0, params['branch_1'])
  assert not np.allclose(out, aspp.apply({'params': perturbed}, x), atol=1e-6)


def test_deeplab_aspp_quirk_zero_grads_for_dead_branches():
  model = models.create_segmenter('deeplabv2_tiny', 3, aspp_branches_used=2)
  x = _normal((1, 32, 32, 3), seed=0)
  variables = _random_variables(model, x, seed=1, scale=0.1)

  def loss(params):
    out = model.apply({**variables, 'params': params}, x)
    return sum(jnp.sum(o**2) for o in out.values())

  grads = jax.jit(jax.grad(loss))(variables['params'])
  for head in ('aspp_main', 'aspp_aux'):
    for b in range(4):
      g = grads[head][f'branch_{b}']['kernel']
      assert np.any(g != 0) == (b < 2), (head, b)


def test_discriminator_matches_numpy_and_has_no_norm():
  disc = discriminator.FCDiscriminator(ndf=4)
  x = _normal((2, 64, 96, 3), seed=0)
  variables = _random_variables(disc, x, seed=1, scale=0.3)
  assert set(variables) == {'params'}  # no batch_stats: no BatchNorm
  names = ['conv1', 'conv2', 'conv3', 'conv4', 'classifier']
  assert set(variables['params']) == set(names)
  for n in names:
    assert set(variables['params'][n]) == {'kernel', 'bias'}
  params = variables['params']
  got = disc.apply({'params': params}, x)
  y = np.asarray(x, np.float64)
  for i, n in enumerate(names):
    p = params[n]
    y = _np_conv(y, np.asarray(p['kernel']), np.asarray(p['bias']),
                 stride=2, padding=1)
    if i < 4:
      y = np.where(y > 0, y, 0.2 * y)
  assert got.shape == (2, 2, 3, 1)
  np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)
  # Raw logits: no sigmoid squashes them into (0, 1).
  assert np.any(np.asarray(got) < 0) or np.any(np.asarray(got) > 1)


# ----------------------------------------------------------------------------
# BatchNorm modes.


def _tiny_with_random_stats():
  model = models.create_segmenter('deeplabv2_tiny', 3)
  x = _normal((2, 32, 48, 3), seed=0, scale=20.0)
  return model, x, _random_variables(model, x, seed=1, scale=0.1)


def test_frozen_bn_needs_no_mutable_and_keeps_stats():
  model, x, variables = _tiny_with_random_stats()
  out = model.apply(variables, x, train_bn=False)  # no `mutable` needed
  assert isinstance(out, dict) and set(out) == {'main', 'aux'}
  out2, updates = model.apply(variables, x, train_bn=False,
                              mutable=['batch_stats'])
  chex.assert_trees_all_equal(updates['batch_stats'], variables['batch_stats'])
  chex.assert_trees_all_close(out, out2)
  # Frozen mode normalises with the running statistics: changing them
  # changes the output.
  shifted = jax.tree.map(lambda v: v + 1.0, variables['batch_stats'])
  out3 = model.apply({**variables, 'batch_stats': shifted}, x)
  assert not np.allclose(out['main'], out3['main'])


def test_train_bn_uses_batch_stats_and_updates_running_stats():
  model, x, variables = _tiny_with_random_stats()
  with pytest.raises(Exception):  # updating an immutable collection
    model.apply(variables, x, train_bn=True)
  out, updates = model.apply(
      variables, x, train_bn=True, mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda mdl, _: mdl.name == 'conv1')
  new, inter = updates['batch_stats'], updates['intermediates']
  # Stem BN: running = 0.9 * old + 0.1 * batch (biased variance, Flax).
  y = np.asarray(inter['backbone']['conv1']['__call__'][0], np.float64)
  old = variables['batch_stats']['backbone']['bn1']
  np.testing.assert_allclose(new['backbone']['bn1']['mean'],
                             0.9 * old['mean'] + 0.1 * y.mean((0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new['backbone']['bn1']['var'],
                             0.9 * old['var'] + 0.1 * y.var((0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  # Every BN updated its statistics.
  for path, v in _flat(new).items():
    assert not np.allclose(v, _flat(variables['batch_stats'])[path]), path
  # Batch statistics, not running ones: the output ignores the stored stats.
  shifted = jax.tree.map(lambda v: v + 1.0, variables['batch_stats'])
  out_shifted, _ = model.apply({**variables, 'batch_stats': shifted}, x,
                               train_bn=True, mutable=['batch_stats'])
  chex.assert_trees_all_close(out, out_shifted, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Registry.


def test_registry():
  assert models.SEGMENTER_NAMES == ('deeplabv2_resnet101',
                                    'deeplabv2_resnet50', 'deeplabv2_tiny',
                                    'deeplabv2_vgg16', 'mit_b0', 'mit_b1',
                                    'mit_b2', 'mit_b3', 'mit_b4', 'mit_b5',
                                    'mit_tiny')
  with pytest.raises(ValueError, match='Unknown segmenter'):
    models.create_segmenter('deeplabv3', 19)
  single = models.create_segmenter('deeplabv2_tiny', 7, multi_level=False)
  outputs, variables = jax.eval_shape(
      lambda x: single.init_with_output(jax.random.key(0), x),
      jax.ShapeDtypeStruct((1, 64, 128, 3), jnp.float32))
  assert set(outputs) == {'main'} and outputs['main'].shape == (1, 9, 17, 7)
  assert 'aspp_aux' not in variables['params']
  assert models.create_discriminator(ndf=32).ndf == 32
