"""MiT encoder + DAFormer head (jaxda.models.mit) and the MiT importer.

References: the transformers library's `SegformerModel` with a random tiny
config (encoder parity) and a DAFormer head written here with torch.nn
(decoder parity); both skip cleanly without transformers / torch.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.models import mit
from jaxda.weights import mit_import

TINY = dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 2, 1, 1],
            num_attention_heads=[1, 2, 2, 4])


def _hf_model():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  config = transformers.SegformerConfig(**TINY)
  config._attn_implementation = 'eager'
  model = transformers.SegformerModel(config).eval()
  with torch.no_grad():  # Non-trivial biases and norms, not the init.
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  return torch, model


def _random_variables(module, *args, seed=0):
  """Variables of ``module`` filled from NumPy (no jitted init: its RNG code
  takes many seconds to compile on a busy CPU). 1-d leaves (biases, norms,
  BN statistics) are U(0.5, 1.5) so eval-mode BN is not the identity."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
  fill = lambda s: (rng.uniform(0.5, 1.5, s.shape) if len(s.shape) == 1
                    else rng.normal(size=s.shape) * 0.2)
  return jax.tree.map(lambda s: jnp.asarray(fill(s), jnp.float32), shapes)


def _tiny_mit(ln_eps=1e-5):
  cfg = mit.MiTConfig(hidden_sizes=(8, 16, 32, 64), depths=(1, 2, 1, 1),
                      num_heads=(1, 2, 2, 4))
  return mit.MiT(cfg, drop_path_rate=0.1, ln_eps=ln_eps)


def test_mit_matches_transformers_segformer():
  torch, model = _hf_model()
  x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    out = model(torch.from_numpy(x), output_hidden_states=True)
  expected = [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states]
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  params = mit_import.import_mit(sd)
  # transformers' LayerNorms all use eps 1e-5 (the original MiT: 1e-6).
  module = _tiny_mit(ln_eps=1e-5)
  ref_tree = jax.eval_shape(module.init, jax.random.key(0),
                            jnp.zeros((1, 64, 64, 3)))
  assert (jax.tree.structure(ref_tree['params'])
          == jax.tree.structure(params))
  for a, b in zip(jax.tree.leaves(ref_tree['params']), jax.tree.leaves(params)):
    assert a.shape == b.shape
  with jax.default_matmul_precision('highest'):
    got = jax.jit(module.apply)({'params': params},
                                jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert [g.shape for g in got] == [(2, 16, 16, 8), (2, 8, 8, 16),
                                    (2, 4, 4, 32), (2, 2, 2, 64)]
  for g, e in zip(got, expected):
    np.testing.assert_allclose(np.asarray(g), e, atol=1e-5, rtol=1e-5)


def _v4_names(sd):
  """transformers 4 checkpoint names, written out independently."""
  rules = [
      (r'^stages\.(\d+)\.patch_embeddings\.', r'encoder.patch_embeddings.\1.'),
      (r'^stages\.(\d+)\.layer_norm\.', r'encoder.layer_norm.\1.'),
      (r'^stages\.(\d+)\.blocks\.(\d+)\.layernorm_before\.',
       r'encoder.block.\1.\2.layer_norm_1.'),
      (r'^stages\.(\d+)\.blocks\.(\d+)\.layernorm_after\.',
       r'encoder.block.\1.\2.layer_norm_2.'),
      (r'attention\.q_proj', 'attention.self.query'),
      (r'attention\.k_proj', 'attention.self.key'),
      (r'attention\.v_proj', 'attention.self.value'),
      (r'attention\.o_proj', 'attention.output.dense'),
      (r'attention\.sequence_reduction\.sequence_reduction',
       'attention.self.sr'),
      (r'attention\.sequence_reduction\.layer_norm',
       'attention.self.layer_norm'),
      (r'mlp\.fc1', 'mlp.dense1'), (r'mlp\.fc2', 'mlp.dense2'),
      (r'^stages\.(\d+)\.blocks\.(\d+)\.', r'encoder.block.\1.\2.'),
  ]
  out = {}
  for k, v in sd.items():
    for rx, rep in rules:
      k = re.sub(rx, rep, k)
    out['segformer.' + k] = v
  return out


def test_importer_layouts_agree_and_round_trip():
  _, model = _hf_model()
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  params = mit_import.import_mit(sd)
  v4 = _v4_names(sd)
  assert 'segformer.encoder.block.1.1.attention.self.query.weight' in v4
  params_v4 = mit_import.import_mit(v4)
  mmseg = mit_import.export_mmseg(params)
  assert 'block2.1.attn.kv.weight' in mmseg and 'norm4.bias' in mmseg
  assert mmseg['block1.0.attn.kv.weight'].shape == (16, 8)
  assert mmseg['block1.0.mlp.dwconv.dwconv.weight'].shape == (32, 1, 3, 3)
  mmseg['head.weight'] = np.zeros((10, 64), np.float32)  # ImageNet classifier.
  params_mm = mit_import.import_mit(mmseg)
  for other in (params_v4, params_mm):
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(other)):
      np.testing.assert_array_equal(a, b)
  # Round trip through the mmseg layout reproduces the fused kv exactly.
  k = sd['stages.0.blocks.0.attention.k_proj.weight']
  v = sd['stages.0.blocks.0.attention.v_proj.weight']
  np.testing.assert_array_equal(mmseg['block1.0.attn.kv.weight'],
                                np.concatenate([k, v]))
  with pytest.raises(mit_import.MiTImportError, match='unused'):
    mit_import.import_mit({**mmseg, 'block1.0.extra.weight': k})
  broken = dict(mmseg)
  del broken['norm2.weight']
  with pytest.raises(mit_import.MiTImportError, match='missing'):
    mit_import.import_mit(broken)


def _torch_head(torch, params, stats, feats, dilations):
  """DAFormer head (mmseg daformer_head.py semantics) in torch.nn, eval mode."""
  F = torch.nn.functional
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  conv_w = lambda k: t(np.transpose(np.asarray(k), (3, 2, 0, 1)))
  x = [t(np.asarray(f).transpose(0, 3, 1, 2)) for f in feats]
  size = x[0].shape[2:]
  embs = []
  for i, f in enumerate(x):
    p = params[f'embed{i + 1}']
    e = F.linear(f.flatten(2).transpose(1, 2), t(p['kernel']).T, t(p['bias']))
    e = e.transpose(1, 2).reshape(f.shape[0], -1, *f.shape[2:])
    embs.append(F.interpolate(e, size=size, mode='bilinear',
                              align_corners=False))
  x = torch.cat(embs, 1)

  def cbr(y, name, dil=1, groups=1):
    w = conv_w(params['fuse'][name]['conv']['kernel'])
    pad = dil * (w.shape[-1] // 2)
    y = F.conv2d(y, w, None, padding=pad, dilation=dil, groups=groups)
    bn, st = params['fuse'][name]['bn'], stats['fuse'][name]['bn']
    y = F.batch_norm(y, t(st['mean']), t(st['var']), t(bn['scale']),
                     t(bn['bias']), False, 0.1, 1e-5)
    return F.relu(y)

  outs = []
  for i, d in enumerate(dilations):
    if d == 1:
      outs.append(cbr(x, f'aspp{i}'))
    else:
      outs.append(cbr(cbr(x, f'aspp{i}_dw', d, x.shape[1]), f'aspp{i}_pw'))
  y = cbr(torch.cat(outs, 1), 'bottleneck')
  y = F.conv2d(y, conv_w(params['cls']['kernel']), t(params['cls']['bias']))
  return y.numpy().transpose(0, 2, 3, 1)


def test_daformer_head_matches_torch_reference():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  feats = [rng.normal(size=(2, 16 >> i, 16 >> i, c)).astype(np.float32)
           for i, c in enumerate((8, 16, 32, 64))]
  head = mit.DAFormerHead(5, embed_dim=12, dilations=(1, 2, 3))
  variables = _random_variables(head, [jnp.asarray(f) for f in feats])
  with jax.default_matmul_precision('highest'):
    got = jax.jit(head.apply)(variables, [jnp.asarray(f) for f in feats])
  assert got.shape == (2, 16, 16, 5)
  want = _torch_head(torch, variables['params'], variables['batch_stats'],
                     feats, (1, 2, 3))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_daformer_segmenter_shapes_and_variants():
  model = mit.DAFormer(num_classes=7, variant='mit_tiny', embed_dim=16,
                       scale_attention=True)
  x = jnp.zeros((1, 64, 96, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  # Training mode: DropPath/Dropout draw from the 'dropout' rng; BN updates.
  # Traced only (numerics: the two parity tests above), to keep CI fast.
  out, upd = jax.eval_shape(lambda v, x, k: model.apply(
      v, x, train_bn=True, deterministic=False, rngs={'dropout': k},
      mutable=['batch_stats']), variables, x, jax.random.key(1))
  assert out['main'].shape == (1, 16, 24, 7)
  assert out['attention'].shape == (1, 16, 24, 7)
  assert out['features'].shape == (1, 2, 3, 64)
  assert 'batch_stats' in upd
  assert set(variables['params']) == {'encoder', 'head', 'head_att'}
  assert set(variables['params']['head']['fuse']) == {
      'aspp0', 'aspp1_dw', 'aspp1_pw', 'aspp2_dw', 'aspp2_pw', 'aspp3_dw',
      'aspp3_pw', 'bottleneck'}
  assert set(variables['params']['head_att']['fuse']) == {'conv', 'bn'}
  # B0 and B5 geometry: parameter counts of the encoders (float32 leaves).
  n = lambda v: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v))
  enc = lambda name: jax.eval_shape(
      mit.MiT(mit.MIT_VARIANTS[name]).init, jax.random.key(0),
      jnp.zeros((1, 64, 64, 3)))['params']
  # B5: 81.4M, the SegFormer paper's encoder size; B0: 3,319,392 counted
  # from its geometry (32/64/160/256 channels, 2 blocks per stage).
  assert n(enc('mit_b0')) == 3_319_392
  assert abs(n(enc('mit_b5')) / 1e6 - 81.44) < 0.01


def test_import_weights_cli_writes_mit_for_daformer_init_weights(tmp_path):
  """`python -m experiments.import_weights --arch=mit` on an mmseg-layout
  file: the checkpoint holds the encoder, which `model.init_weights`
  overlays onto a DAFormer net (heads keep their init)."""
  torch = pytest.importorskip('torch')
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import child_env  # pylint: disable=g-import-not-at-top
  from jaxda import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from jaxda.weights import torch_import  # pylint: disable=g-import-not-at-top
  from jaxda.weights import torchvision_import  # pylint: disable=g-import-not-at-top
  model = mit.DAFormer(num_classes=5, variant='mit_tiny', embed_dim=16)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(5)
  # Random values (shapes only traced: nothing compiles).
  variables = jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  encoder = variables['params']['encoder']
  sd = mit_import.export_mmseg(encoder)
  sd['head.weight'] = np.zeros((10, 64), np.float32)  # ImageNet classifier
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()},
             tmp_path / 'mit_tiny.pth')
  out = tmp_path / 'converted'
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.import_weights',
       f'--torch={tmp_path / "mit_tiny.pth"}', '--arch=mit', f'--out={out}'],
      cwd=root, env=child_env.child_env(), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr
  saved = checkpoint_lib.load_weights(str(out))
  assert set(saved['params']) == {'encoder'} and not saved['batch_stats']
  jax.tree.map(np.testing.assert_array_equal, saved['params']['encoder'],
               encoder)
  # As config.model.init_weights: the encoder from the file, the head kept.
  target = jax.tree.map(jnp.zeros_like, variables['params'])
  params, kept = torch_import.overlay(target, saved['params'], 'params',
                                      str(out))
  jax.tree.map(np.testing.assert_array_equal, params['encoder'], encoder)
  assert kept and all(k.startswith('head/') for k in kept)
  assert not np.any(np.asarray(params['head']['cls']['kernel']))
  # A DeepLab file under --arch=mit: one line naming the problem.
  np.savez(tmp_path / 'deeplab.npz', **{'layer1.0.conv1.weight': np.zeros(
      (8, 8, 1, 1), np.float32)})
  with pytest.raises(torchvision_import.WeightImportError,
                     match='not a MiT encoder'):
    torchvision_import.convert_file(str(tmp_path / 'deeplab.npz'), 'mit')


def test_mit_in_the_segmenter_registry():
  """`model.name=mit_*` builds the DAFormer net for every segmentation
  method: same parameter tree (the MiT importer applies), one output."""
  from jaxda import models  # pylint: disable=g-import-not-at-top
  assert {'mit_b0', 'mit_b5', 'mit_tiny'} <= set(models.SEGMENTER_NAMES)
  seg = models.create_segmenter('mit_tiny', 7, multi_level=False)
  x = jnp.zeros((1, 64, 96, 3))
  v = jax.eval_shape(seg.init, jax.random.key(0), x)
  ref = jax.eval_shape(mit.DAFormer(num_classes=7, variant='mit_tiny').init,
                       jax.random.key(0), x)
  assert (jax.tree.map(lambda a: a.shape, v)
          == jax.tree.map(lambda a: a.shape, ref))
  out = jax.eval_shape(seg.apply, v, x)
  assert set(out) == {'main'} and out['main'].shape == (1, 16, 24, 7)
  with pytest.raises(ValueError, match='multi_level=False'):
    models.create_segmenter('mit_tiny', 7, multi_level=True)
  with pytest.raises(ValueError, match='aspp_branches_used=4'):
    models.create_segmenter('mit_tiny', 7, aspp_branches_used=2)


@pytest.mark.slow  # two MiT gradient compiles, 12 s of CI; the gated remat
# itself (and with rngs) is tested in CI below and in test_performance_switches
def test_remat_mit_same_parameters_outputs_and_gradients():
  """``remat`` (gated: each block recomputed once its output cotangent
  exists) keeps the parameter tree, the outputs and the gradients."""
  cfg = mit.MiTConfig(hidden_sizes=(8, 16, 32, 64), depths=(1, 1, 1, 1),
                      num_heads=(1, 2, 2, 4))
  plain = mit.MiT(cfg, drop_path_rate=0.1, ln_eps=1e-5)
  remat = plain.clone(remat=True)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 32, 32, 3)),
                  jnp.float32)
  variables = _random_variables(plain, x)
  assert (jax.tree.structure(jax.eval_shape(remat.init, jax.random.key(0),
                                            x))
          == jax.tree.structure(variables))

  def loss(module, params):
    return sum(jnp.sum(o * o) for o in module.apply({'params': params}, x))

  want = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(
      variables['params'])
  got = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(
      variables['params'])
  # Float summation order differs: tolerance relative to each leaf's scale.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b)))), got, want)


def test_gated_remat_with_rngs_redraws_the_forward_masks():
  """With ``rngs`` the recomputation draws the forward's dropout masks:
  value and gradients equal the plain block applied with that key."""
  from jaxda.models.kernels import remat as remat_lib  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic):
      y = nn.Dense(8)(x)
      return x + nn.Dropout(0.5)(jnp.tanh(y), deterministic=deterministic)

  class Gated(nn.Module):
    @nn.compact
    def __call__(self, x, key):
      return remat_lib.gated_remat(Block(name='b'), x, False,
                                   rngs={'dropout': key})

  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 8)), jnp.float32)
  key = jax.random.key(5)
  params = Block().init(jax.random.key(0), x, True)['params']

  def ref(p, x):
    return jnp.sum(Block().apply({'params': p}, x, False,
                                 rngs={'dropout': key}) ** 2)

  def gated(p, x):
    return jnp.sum(Gated().apply({'params': {'b': p}}, x, key) ** 2)

  want = jax.value_and_grad(ref, argnums=(0, 1))(params, x)
  got = jax.value_and_grad(gated, argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-6), got, want)
