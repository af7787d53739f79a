"""bf16 compute, rematerialisation, the matmul-backed conv, and host syncs.

* `jaxda.models.conv.Conv` equals a direct NumPy convolution (every
  implementation, strides, dilations, paddings) and its custom matmul
  gradient equals autodiff of a plain `jnp.dot`;
* an AdaptSegNet step with `compute_dtype='bfloat16'` is finite and close to
  the float32 step on the same weights and batch; parameters, optimiser
  state and losses stay float32;
* `remat=True` gives the same step as `remat=False`;
* `train_loop.run_steps` makes no device-to-host transfer except at logging
  and checkpoint steps (`jax.transfer_guard_device_to_host`).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import adaptsegnet as adaptsegnet_config
from jaxda import train_loop
from jaxda.methods import base
from jaxda.models import conv as conv_lib


def _numpy_conv(x, w, stride, padding, dilation):
  """Direct convolution: out[b, i, j, o] = sum x[b, i s + a d, ...] w[a, c]."""
  (pt, pb), (pl, pr) = padding
  x = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw, _, cout = w.shape
  sh, sw = stride
  dh, dw = dilation
  oh = (x.shape[1] - dh * (kh - 1) - 1) // sh + 1
  ow = (x.shape[2] - dw * (kw - 1) - 1) // sw + 1
  out = np.zeros((x.shape[0], oh, ow, cout))
  for a in range(kh):
    for c in range(kw):
      patch = x[:, a * dh:a * dh + (oh - 1) * sh + 1:sh,
                c * dw:c * dw + (ow - 1) * sw + 1:sw, :]
      out += np.einsum('bhwi,io->bhwo', patch, w[a, c].astype(np.float64))
  return out


@pytest.mark.parametrize('impl', ['auto', 'lax', 'dot'])
@pytest.mark.parametrize('kernel,stride,padding,dilation', [
    ((1, 1), (1, 1), 'VALID', (1, 1)),
    ((1, 1), (2, 2), 'VALID', (1, 1)),
    ((3, 3), (1, 1), ((2, 2), (2, 2)), (2, 2)),
    ((4, 4), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    ((7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1)),
])
def test_conv_matches_numpy(impl, kernel, stride, padding, dilation):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 11, 13, 5)).astype(np.float32)
  module = conv_lib.Conv(6, kernel, strides=stride, padding=padding,
                         kernel_dilation=dilation, use_bias=True,
                         bias_init=jax.nn.initializers.normal(1.0),
                         impl=impl)
  variables = module.init(jax.random.key(1), x)
  got = np.asarray(module.apply(variables, x))
  pad = ((0, 0), (0, 0)) if padding == 'VALID' else padding
  want = _numpy_conv(x, np.asarray(variables['params']['kernel']), stride,
                     pad, dilation) + np.asarray(variables['params']['bias'])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_matmul_gradient_matches_autodiff_of_dot():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
  loss = lambda f: (lambda x, w: jnp.sum(f(x, w) * g))
  got = jax.grad(loss(conv_lib.matmul), argnums=(0, 1))(x, w)
  want = jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # bfloat16: the gradient keeps the input dtypes.
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  dx, dw = jax.grad(loss(conv_lib.matmul), argnums=(0, 1))(xb, wb)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dw, np.float32), want[1], rtol=5e-2,
                             atol=5e-2)


def _tiny_step(compute_dtype='float32', remat=False):
  """One jitted AdaptSegNet step on the tiny network; (state, step, batch)."""
  config = adaptsegnet_config.get_config('tiny')
  config.model.compute_dtype = compute_dtype
  config.model.remat = remat
  config.model.bn_mode = 'train'  # Exercises BN statistics in bf16 too.
  num_classes = 5
  precision = train_loop.precision_options(config)
  from jaxda import models as models_lib  # pylint: disable=g-import-not-at-top
  from jaxda import optim  # pylint: disable=g-import-not-at-top
  from jaxda import state as state_lib  # pylint: disable=g-import-not-at-top
  from jaxda.methods import get_method  # pylint: disable=g-import-not-at-top
  seg = models_lib.create_segmenter(config.model.name, num_classes,
                                    remat=remat, **precision)
  disc = models_lib.create_discriminator(config.adversarial.ndf).clone(
      **precision)
  tx, _ = optim.make_segmenter_tx(
      learning_rate=0.05, schedule_steps=10, momentum=0.9,
      weight_decay=5e-4, power=0.9,
      head_regexes=(models_lib.head_param_regex,), head_lr_mult=10.0,
      frozen_regexes=[models_lib.batchnorm_param_regex], optimizer='sgd')
  disc_tx = optim.make_discriminator_tx(learning_rate=1e-3, schedule_steps=10,
                                        b1=0.9, b2=0.99, power=0.9)
  h, w = 32, 64
  key = jax.random.key(0)
  # Parameters are initialised in float32 whatever the compute dtype.
  variables = models_lib.create_segmenter(config.model.name,
                                          num_classes).init(
                                              key, jnp.zeros((1, h, w, 3)))
  disc_params = {
      level: models_lib.create_discriminator(config.adversarial.ndf).init(
          jax.random.fold_in(key, i), jnp.zeros((1, h, w, num_classes)))[
              'params'] for i, level in enumerate(('main', 'aux'))}
  state = state_lib.TrainState.create(
      params=variables['params'], batch_stats=variables['batch_stats'],
      tx=tx, disc_params=disc_params, disc_tx=disc_tx)
  step = get_method('adaptsegnet').make_step(base.Models(seg, disc), config,
                                             tx, disc_tx)
  rng = np.random.default_rng(3)
  labels = rng.integers(0, num_classes, (2, h, w)).astype(np.int32)
  labels[:, :4] = 255
  batch = {'source': {'image': rng.normal(size=(2, h, w, 3)).astype(
      np.float32), 'label': labels},
           'target': {'image': rng.normal(size=(2, h, w, 3)).astype(
               np.float32)}}
  return state, jax.jit(step), batch


def test_bf16_step_is_finite_close_to_fp32_and_keeps_fp32_state():
  state, step32, batch = _tiny_step('float32')
  _, step16, _ = _tiny_step('bfloat16')
  rng = jax.random.key(0)
  new32, m32 = step32(state, batch, rng)
  new16, m16 = step16(state, batch, rng)
  chex.assert_tree_all_finite((new16, m16))
  for tree in (new16.params, new16.opt_state, new16.disc_params,
               new16.batch_stats):
    for leaf in jax.tree.leaves(tree):
      assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  for k in ('seg_loss', 'ce_main', 'ce_aux', 'disc_main', 'disc_aux'):
    assert m16[k].dtype == jnp.float32
    np.testing.assert_allclose(m16[k], m32[k], rtol=2e-2, err_msg=k)
  # The update itself: relative error of the parameter change.
  d32 = jax.tree.map(lambda a, b: a - b, new32.params, state.params)
  d16 = jax.tree.map(lambda a, b: a - b, new16.params, state.params)
  num = sum(float(jnp.sum((a - b) ** 2)) for a, b in
            zip(jax.tree.leaves(d16), jax.tree.leaves(d32)))
  den = sum(float(jnp.sum(b ** 2)) for b in jax.tree.leaves(d32))
  assert np.sqrt(num / den) < 0.1, np.sqrt(num / den)


def test_remat_step_equals_plain_step():
  state, step_plain, batch = _tiny_step('float32', remat=False)
  _, step_remat, _ = _tiny_step('float32', remat=True)
  rng = jax.random.key(0)
  a, ma = step_plain(state, batch, rng)
  b, mb = step_remat(state, batch, rng)
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.disc_params)),
                  jax.tree.leaves((b.params, b.batch_stats, b.disc_params))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ma['loss'], mb['loss'], rtol=1e-6)


def test_remat_is_applied_to_backbone_blocks():
  from jaxda import models as models_lib  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((1, 32, 32, 3))
  counts = {}
  for remat in (False, True):
    model = models_lib.create_segmenter('deeplabv2_tiny', 3, remat=remat)
    variables = model.init(jax.random.key(0), x)
    loss = lambda p: jnp.sum(model.apply(
        {'params': p, 'batch_stats': variables['batch_stats']}, x)['main'])
    counts[remat] = str(jax.make_jaxpr(jax.grad(loss))(
        variables['params'])).count('remat')
  assert counts[False] == 0 and counts[True] == 4  # one per tiny block


def _tiny_run(tmp_path, log_every):
  config = adaptsegnet_config.get_config('tiny')
  config.num_devices = 1
  config.batch_size = 2
  config.log_every = log_every
  config.checkpoint_every = 1000
  config.source.data_dir = str(tmp_path / 'cache')
  config.target.data_dir = str(tmp_path / 'cache')
  run = train_loop.setup(config, str(tmp_path / 'work'))
  state = train_loop.create_state(run)
  return run, state, train_loop.compile_step(run)


def test_run_steps_syncs_only_at_logging_steps(tmp_path):
  run, state, step = _tiny_run(tmp_path, log_every=3)
  batches = train_loop.paired_batches(run, 0)
  # Compile and warm up outside the guard.
  state = train_loop.run_steps(run, state, step, batches, 0, 3)
  with jax.transfer_guard_device_to_host('disallow_explicit'):
    # Steps 4, 5 and 7, 8 must not read anything back; 6 and 9 log.
    state = train_loop.run_steps(run, state, step, batches, 3, 9)
  assert int(jax.device_get(state.step)) == 9

  # The guard is able to fail: a step that reads its loss back is caught.
  def syncing_step(s, b, r):
    s, m = step(s, b, r)
    float(m['loss'])
    return s, m

  with pytest.raises(Exception, match='[Dd]isallowed'):
    with jax.transfer_guard_device_to_host('disallow_explicit'):
      train_loop.run_steps(run, state, syncing_step, batches, 9, 12)
  train_loop.close(run)
