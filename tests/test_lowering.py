"""Steps lower for cpu, cuda and tpu; 'auto' convs follow the platform.

No accelerator is needed: `jit(f).trace(...).lower(lowering_platforms=(p,))`
lowers for any platform on this CPU machine (`benchmarks.lower_steps`).

* `Conv(impl='auto')` traced once lowers to the CPU's hand-written forms on
  cpu (Winograd dots for a float32 3×3 with >= 64 input channels) and to
  XLA's convolution, with no dots, on cuda and tpu
  (`jaxda.models.kernels.platform`).
* A tiny segmentation step and a classification step lower for all three
  platforms; on cuda/tpu 'auto' gives the same program counts as 'lax'.
* (slow) every method's every phase lowers for cuda and tpu.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import lower_steps
from jaxda.models.kernels import conv as conv_lib
from jaxda.models.kernels import platform as platform_lib

PLATFORMS = ('cpu', 'cuda', 'tpu')


def _conv_counts(conv: nn.Module, x_shape, dtype=jnp.float32):
  """Op counts of value-and-grad of one conv, traced once, per platform."""
  x = jax.ShapeDtypeStruct(x_shape, dtype)
  params = jax.eval_shape(lambda x: conv.init(jax.random.key(0), x), x)

  def loss(params, x):
    return jnp.sum(conv.apply(params, x).astype(jnp.float32) ** 2)

  traced = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(params, x)
  return {p: lower_steps.count_ops(
      traced.lower(lowering_platforms=(p,)).as_text()) for p in PLATFORMS}


def test_auto_conv_is_winograd_on_cpu_and_xla_conv_on_cuda_and_tpu():
  conv = conv_lib.Conv(64, (3, 3), padding=((1, 1), (1, 1)))
  counts = _conv_counts(conv, (2, 8, 8, 64))
  # Winograd F(2x2, 3x3): 16 products per pass, forward + 2 gradients.
  assert counts['cpu']['convolutions'] == 0
  assert counts['cpu']['dots'] >= 3 * 16
  for p in ('cuda', 'tpu'):
    assert counts[p]['convolutions'] == 3, (p, counts[p])  # fwd, dx, dw
    assert counts[p]['dots'] == 0, (p, counts[p])


@pytest.mark.parametrize('kernel,strides,c_in,dtype', [
    ((1, 1), (1, 1), 64, jnp.float32),  # CPU: matmul
    ((3, 3), (1, 1), 16, jnp.bfloat16),  # CPU: taps
    ((4, 4), (2, 2), 16, jnp.bfloat16),  # CPU: space_to_depth
    ((7, 7), (2, 2), 3, jnp.bfloat16),  # CPU: patches
])
def test_auto_conv_has_no_dot_forms_on_cuda_and_tpu(kernel, strides, c_in,
                                                      dtype):
  pad = tuple((k // 2, k // 2) for k in kernel)
  conv = conv_lib.Conv(32, kernel, strides, pad, dtype=dtype)
  counts = _conv_counts(conv, (2, 8, 8, c_in))
  assert counts['cpu']['dots'] > 0 and counts['cpu']['convolutions'] == 0
  for p in ('cuda', 'tpu'):
    assert counts[p]['convolutions'] > 0 and counts[p]['dots'] == 0, p


def test_explicit_impl_runs_as_asked_on_every_platform():
  conv = conv_lib.Conv(64, (3, 3), padding=((1, 1), (1, 1)), impl='winograd')
  counts = _conv_counts(conv, (2, 8, 8, 64))
  for p in PLATFORMS:
    assert counts[p]['convolutions'] == 0 and counts[p]['dots'] >= 48, p
  lax_conv = conv_lib.Conv(64, (3, 3), padding=((1, 1), (1, 1)), impl='lax')
  counts = _conv_counts(lax_conv, (2, 8, 8, 64))
  for p in PLATFORMS:
    assert counts[p]['convolutions'] == 3 and counts[p]['dots'] == 0, p


def test_choose_impl_per_platform():
  choose = conv_lib.choose_impl
  same = ((1, 1), (1, 1))
  cases = [((3, 3), (1, 1), same, 256, 256, jnp.float32),
           ((3, 3), (1, 1), same, 2048, 19, jnp.float32),
           ((1, 1), (2, 2), ((0, 0), (0, 0)), 64, 8, jnp.float32),
           ((3, 3), (1, 1), same, 32, 32, jnp.bfloat16),
           ((4, 4), (2, 2), same, 19, 64, jnp.bfloat16)]
  for case in cases:
    assert choose('auto', *case) == choose('auto', *case, platform='cpu')
    assert choose('auto', *case, platform='cpu') != 'lax'
    for p in ('cuda', 'rocm', 'tpu', None):
      assert choose('auto', *case, platform=p) == 'lax', (p, case)
    assert choose('dot', *case, platform='tpu') == choose('dot', *case)
  assert platform_lib.conv_auto_rule('cpu') == 'cpu_rules'
  assert platform_lib.conv_auto_rule('metal') == 'lax'


def test_unsupported_impl_is_a_one_line_error(monkeypatch):
  monkeypatch.setitem(platform_lib.CONV_UNSUPPORTED, 'tpu',
                      {'winograd': 'lax'})
  with pytest.raises(ValueError) as e:
    conv_lib.choose_impl('winograd', (3, 3), (1, 1), ((1, 1), (1, 1)), 64,
                         64, jnp.float32, platform='tpu')
  assert str(e.value) == ("conv impl 'winograd' does not run on tpu; set"
                          " config.model.conv_impl='lax'")
  assert conv_lib.choose_impl('winograd', (3, 3), (1, 1), ((1, 1), (1, 1)),
                              64, 64, jnp.float32) == 'winograd'


def test_count_ops():
  text = ('%0 = stablehlo.convolution(%a, %b)\n'
          '%1 = stablehlo.dot_general %0, %c\n'
          '%2 = stablehlo.custom_call @Sharding(%1)\n'
          '%3 = stablehlo.custom_call @Sharding(%2)\n')
  assert lower_steps.count_ops(text) == {
      'convolutions': 1, 'dots': 1, 'custom_calls': ['Sharding']}


@pytest.mark.parametrize('name', ['source_only', 'dann'])
def test_tiny_step_lowers_for_every_platform(name):
  auto = lower_steps.lower_method(name, PLATFORMS, tiny=True, height=16,
                                  width=32)
  lax = lower_steps.lower_method(name, ('cuda',), tiny=True, height=16,
                                 width=32, conv_impl='lax')
  for key, per in auto.items():
    for p, r in per.items():
      assert r['ok'], (key, p, r['error'])
    assert per['cuda']['convolutions'] > 0, key
    for p in ('cuda', 'tpu'):
      assert (per[p]['convolutions'], per[p]['dots']) == (
          lax[key]['cuda']['convolutions'], lax[key]['cuda']['dots']), (key, p)


@pytest.mark.slow
def test_every_method_lowers_for_cuda_and_tpu(tmp_path):
  assert lower_steps.main(['--tiny', '--platforms=cpu,cuda,tpu',
                           f'--out={tmp_path}']) == 0
  import json  # pylint: disable=g-import-not-at-top
  results = json.loads((tmp_path / 'lowering.json').read_text())
  from jaxda.methods import METHODS  # pylint: disable=g-import-not-at-top
  assert {k.split(':')[0] for k in results} == set(METHODS)
  assert 'tpld:phase2' in results
  for key, per in results.items():
    for p in PLATFORMS:
      assert per[p]['ok'], (key, p, per[p]['error'])
    if METHODS[key.split(':')[0]].task != 'classification':
      assert per['cuda']['convolutions'] > 0, key


def test_paper_size_keeps_the_presets_crop_and_batch():
  config = lower_steps.load_config('daformer', False, 0, 0, paper_size=True)
  assert (config.data.height, config.data.width) == (512, 512)
  assert config.batch_size == 2 and config.num_devices == 1
  assert config.daformer.network == 'mit_b5'
  hrda = lower_steps.load_config('daformer', False, 0, 0, 'hrda',
                                 paper_size=True)
  assert (hrda.data.height, hrda.data.width) == (1024, 1024)
  assert tuple(hrda.daformer.hrda_detail_crop) == (512, 512)
  assert hrda.target.height == hrda.target.width == 0  # from config.data


def test_memory_analysis_of_a_compiled_step():
  per = lower_steps.lower_method('dann', ('cpu', 'cuda'), tiny=True,
                                 height=16, width=16, memory=True)['dann']
  cpu = per['cpu']
  assert cpu['ok'], cpu['error']
  assert 'total_bytes' not in per['cuda']  # compiled for cpu only
  assert cpu['argument_bytes'] > 0 and cpu['temp_bytes'] > 0
  assert cpu['total_bytes'] == (cpu['argument_bytes'] + cpu['output_bytes']
                                + cpu['temp_bytes'] - cpu['alias_bytes'])
  assert cpu['total_gib'] == round(cpu['total_bytes'] / 2**30, 3)
  assert cpu['images']['source'][1:3] == [16, 16]


def test_mit_memory_fit_recovers_an_affine_law_and_flags_a_bad_one():
  from benchmarks import mit_memory_fit as fit_lib
  rng = np.random.default_rng(0)
  a, c = 3e9, rng.uniform(1e7, 1e8, size=4)
  points = [(d, a + float(np.dot(c, d))) for d in fit_lib.FIT_DEPTHS]
  coef = fit_lib.fit_affine(points)
  np.testing.assert_allclose(coef, [a, *c], rtol=1e-9)
  real = (3, 6, 40, 3)
  assert fit_lib.predict(coef, real) == pytest.approx(a + np.dot(c, real))
  # A law that is not affine in the depths misses the held-out point.
  quad = [(d, a + float(np.dot(c, np.square(d)))) for d in fit_lib.FIT_DEPTHS]
  coef = fit_lib.fit_affine(quad)
  held = a + float(np.dot(c, np.square(fit_lib.HELD_OUT)))
  assert abs(fit_lib.predict(coef, fit_lib.HELD_OUT) - held) > 1e6
