"""bf16 compute, rematerialisation, the matmul-backed conv, and host syncs.

* `jaxda.models.conv.Conv` equals a direct NumPy convolution (every
  implementation, strides, dilations, paddings) and its custom matmul
  gradient equals autodiff of a plain `jnp.dot`;
* an AdaptSegNet step with `compute_dtype='bfloat16'` is finite and close to
  the float32 step on the same weights and batch; parameters, optimiser
  state and losses stay float32;
* `remat=True` gives the same step as `remat=False`;
* `train_loop.run_steps` reads no array back to the host except at logging
  and checkpoint steps (reads counted; `transfer_guard` is a no-op on CPU).
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


# 'auto' is 'dot' for 1x1 and 'lax' otherwise (float32): covered by both.
@pytest.mark.parametrize('impl', ['lax', 'dot'])
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


def _tiny_step(compute_dtype='float32', remat=False, bn_mode='train'):
  """One jitted AdaptSegNet step on the tiny network; (state, step, batch)."""
  config = adaptsegnet_config.get_config('tiny')
  config.model.compute_dtype = compute_dtype
  config.model.remat = remat
  config.model.bn_mode = bn_mode
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
  variables = jax.jit(models_lib.create_segmenter(
      config.model.name, num_classes).init)(key, jnp.zeros((1, h, w, 3)))
  disc_init = jax.jit(models_lib.create_discriminator(
      config.adversarial.ndf).init)
  disc_params = {
      level: disc_init(jax.random.fold_in(key, i),
                       jnp.zeros((1, h, w, num_classes)))['params']
      for i, level in enumerate(('main', 'aux'))}
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


@pytest.fixture(scope='module')
def fp32_step():
  """(state, batch, new state, metrics) of one plain float32 step."""
  state, step, batch = _tiny_step('float32')
  new, metrics = step(state, batch, jax.random.key(0))
  return state, batch, new, metrics


def test_bf16_step_is_finite_close_to_fp32_and_keeps_fp32_state(fp32_step):
  state, batch, new32, m32 = fp32_step
  _, step16, _ = _tiny_step('bfloat16')
  new16, m16 = step16(state, batch, jax.random.key(0))
  chex.assert_tree_all_finite((new16, m16))
  for tree in (new16.params, new16.opt_state, new16.disc_params,
               new16.batch_stats):
    for leaf in jax.tree.leaves(tree):
      assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  for k in ('seg_loss', 'ce_main', 'ce_aux', 'disc_main', 'disc_aux'):
    assert m16[k].dtype == jnp.float32
    np.testing.assert_allclose(m16[k], m32[k], rtol=2e-2, err_msg=k)
  np.testing.assert_allclose(m16['grad_norm'], m32['grad_norm'], rtol=5e-2)
  # The update itself points the same way. (Per leaf, bf16 gradients of the
  # backbone differ by up to ~35% here: BatchNorm's backward in train mode
  # subtracts two nearly equal terms, which bf16 rounding amplifies.)
  d32 = np.concatenate([np.ravel(a - b) for a, b in zip(
      jax.tree.leaves(new32.params), jax.tree.leaves(state.params))])
  d16 = np.concatenate([np.ravel(a - b) for a, b in zip(
      jax.tree.leaves(new16.params), jax.tree.leaves(state.params))])
  cosine = d16 @ d32 / (np.linalg.norm(d16) * np.linalg.norm(d32))
  assert cosine > 0.9, cosine


def test_remat_step_equals_plain_step(fp32_step):
  state, batch, a, ma = fp32_step
  _, step_remat, _ = _tiny_step('float32', remat=True)
  b, mb = step_remat(state, batch, jax.random.key(0))
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.disc_params)),
                  jax.tree.leaves((b.params, b.batch_stats, b.disc_params))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ma['loss'], mb['loss'], rtol=1e-6)


def test_remat_is_applied_to_backbone_blocks():
  from jaxda import models as models_lib  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((1, 16, 16, 3))
  counts = {}
  for remat in (False, True):
    model = models_lib.create_segmenter('deeplabv2_tiny', 3, remat=remat)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    loss = lambda p, bs: jnp.sum(model.apply(
        {'params': p, 'batch_stats': bs}, x)['main'])
    counts[remat] = str(jax.make_jaxpr(jax.grad(loss))(
        variables['params'], variables['batch_stats'])).count('remat')
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


def test_run_steps_syncs_only_at_logging_steps(tmp_path, monkeypatch):
  # `jax.transfer_guard` is not enforced on the CPU backend, so every read
  # of an array's host value (`ArrayImpl._value`: what `np.asarray`,
  # `float()` and `jax.device_get` go through) is counted instead, tagged
  # with the step that was running.
  from jax._src import array as jax_array  # pylint: disable=g-import-not-at-top
  run, state, step = _tiny_run(tmp_path, log_every=3)
  batches = train_loop.paired_batches(run, 0)
  state = train_loop.run_steps(run, state, step, batches, 0, 3)  # compiles
  current = {'step': 0}
  reads = []
  original = jax_array.ArrayImpl._value  # pylint: disable=protected-access

  def counted(self):
    reads.append(current['step'])
    return original.fget(self)

  monkeypatch.setattr(jax_array.ArrayImpl, '_value', property(counted))

  def tagged(fn, start):
    def wrapped(s, b, r):
      current['step'] += 1 if current['step'] else start + 1
      return fn(s, b, r)
    return wrapped

  with jax.transfer_guard_device_to_host('disallow_explicit'):
    state = train_loop.run_steps(run, state, tagged(step, 3), batches, 3, 9)
  # Steps 4, 5, 7 and 8 read nothing back; 6 and 9 log (9 also
  # checkpoints).
  assert reads and set(reads) <= {6, 9}, sorted(set(reads))

  # The check is able to fail: a step that reads its loss back is caught.
  def syncing_step(s, b, r):
    s, m = step(s, b, r)
    float(m['loss'])
    return s, m

  current['step'] = 0
  reads.clear()
  train_loop.run_steps(run, state, tagged(syncing_step, 9), batches, 9, 12)
  assert {10, 11} <= set(reads), sorted(set(reads))
  train_loop.close(run)
