"""bf16 compute, rematerialisation, the matmul-backed conv, and host syncs.

* `jaxda.models.conv.Conv` equals a direct NumPy convolution (every
  implementation, strides, dilations, paddings) and its custom matmul
  gradient equals autodiff of a plain `jnp.dot`;
* an AdaptSegNet step with `compute_dtype='bfloat16'` is finite and close to
  the float32 step on the same weights and batch; parameters, optimiser
  state and losses stay float32;
* `remat=True` gives the same step as `remat=False` (both remat
  implementations), and the cotangent-gated one shrinks XLA's temporaries;
* `fusion.fusion_boundary` keeps values and gradients and stops XLA:CPU
  from fusing a residual chain into every later step;
* the `grad_norm` metric covers the trained parameters only, so XLA drops
  the frozen BatchNorm gradients;
* `loop.run_steps` reads no array back to the host except at logging
  and checkpoint steps (reads counted; `transfer_guard` is a no-op on CPU).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import adaptsegnet as adaptsegnet_config
from jaxda import models
from jaxda import parallel
from jaxda.train import loop as train_loop
from jaxda import methods
from jaxda.methods import base
from jaxda.models import forward
from jaxda.models.kernels import conv as conv_lib
from jaxda.models.kernels import matmul as matmul_lib


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


# 'auto' picks one of these per conv (`choose_impl`, tested below).
@pytest.mark.parametrize('impl', ['lax', 'dot', 'taps', 'winograd'])
@pytest.mark.parametrize('kernel,stride,padding,dilation', [
    ((1, 1), (1, 1), 'VALID', (1, 1)),
    ((1, 1), (2, 2), 'VALID', (1, 1)),
    ((3, 3), (1, 1), ((2, 2), (2, 2)), (2, 2)),
    ((4, 4), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    ((7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1)),
])
def test_conv_matches_numpy(impl, kernel, stride, padding, dilation):
  if impl == 'taps' and stride != (1, 1):
    pytest.skip("'taps' is stride-1 only (its error is tested below)")
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


@pytest.mark.parametrize('kernel,stride,padding,dilation', [
    ((3, 3), (1, 1), ((2, 2), (2, 2)), (2, 2)),
    ((4, 4), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    ((7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1)),
    ((3, 3), (1, 1), ((6, 6), (6, 6)), (6, 6)),  # taps wholly in the padding
])
def test_patches_matmul_gradient_matches_numpy(kernel, stride, padding,
                                               dilation):
  # The k x k matmul conv keeps only its input and rebuilds the patches in
  # the backward pass: both gradients against the NumPy convolution's
  # (its VJP by central differences would be too loose, so the reference is
  # the exact adjoint: <conv(x, w), g> differentiated in closed form).
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 11, 13, 5)).astype(np.float32)
  w = rng.normal(size=kernel + (5, 6)).astype(np.float32)
  y = _numpy_conv(x, w, stride, padding, dilation)
  g = rng.normal(size=y.shape).astype(np.float32)
  geometry = (kernel, stride, padding, dilation)
  dx, dw = jax.grad(
      lambda x, w: jnp.sum(conv_lib.patches_matmul(x, w, geometry) * g),
      argnums=(0, 1))(x, w)
  # Reference: d<conv(x, w), g>/dw[a, c] = sum over output pixels of
  # patch_ac^T g; d/dx scatters g @ w[a, c]^T back onto the padded input.
  (pt, pb), (pl, pr) = padding
  xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  dxp = np.zeros_like(xp)
  want_dw = np.zeros(w.shape)
  oh, ow = y.shape[1:3]
  (sh, sw), (dh, dw_) = stride, dilation
  for a in range(kernel[0]):
    for c in range(kernel[1]):
      rows = slice(a * dh, a * dh + (oh - 1) * sh + 1, sh)
      cols = slice(c * dw_, c * dw_ + (ow - 1) * sw + 1, sw)
      want_dw[a, c] = np.einsum('bhwi,bhwo->io', xp[:, rows, cols], g)
      dxp[:, rows, cols] += np.einsum('bhwo,io->bhwi', g, w[a, c])
  want_dx = dxp[:, pt:pt + x.shape[1], pl:pl + x.shape[2]]
  np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
      conv_lib.patches_matmul(x, w, geometry), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dilation,padding', [((1, 1), ((1, 1), (1, 1))),
                                              ((6, 6), ((6, 6), (6, 6))),
                                              ((2, 3), ((0, 4), (3, 1)))])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_output_taps_conv_value_and_gradient(dilation, padding, dtype):
  # Against the direct NumPy conv (value) and XLA's conv (gradients), also
  # with asymmetric padding and taps that fall wholly into the padding.
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 9, 12, 7)).astype(np.float32)
  w = rng.normal(size=(3, 3, 7, 4)).astype(np.float32)
  got = conv_lib.output_taps_conv(jnp.asarray(x, dtype), jnp.asarray(w, dtype),
                                  padding, dilation)
  assert got.dtype == jnp.float32
  tol = 1e-4 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(
      got, _numpy_conv(x, w, (1, 1), padding, dilation), rtol=tol,
      atol=tol * 10)
  g = rng.normal(size=got.shape).astype(np.float32)
  lax_conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), padding, rhs_dilation=dilation,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  want = jax.grad(lambda x, w: jnp.sum(lax_conv(x, w) * g),
                  argnums=(0, 1))(x, w)
  have = jax.grad(lambda x, w: jnp.sum(conv_lib.output_taps_conv(
      x.astype(dtype), w.astype(dtype), padding, dilation) * g),
                  argnums=(0, 1))(x, w)
  for a, b in zip(have, want):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * 30)


@pytest.mark.parametrize('kernel_size,padding,dilation', [
    ((3, 3), ((1, 1), (1, 1)), (1, 1)),
    ((3, 3), ((2, 6), (4, 0)), (2, 3)),   # asymmetric, one-sided
    ((2, 2), ((3, 0), (0, 4)), (1, 1)),   # padding past the taps' reach
    ((1, 3), ((0, 0), (0, 0)), (1, 2)),   # 'valid': the output shrinks
])
def test_shifted_tap_sum_value_and_transpose(kernel_size, padding, dilation):
  # The hand-written backward (a concatenation of shifted cotangent slices)
  # against the definition, y[i, j] = sum_t Z_t[i + a dh - top, j + c dw -
  # left], and its transpose written as loops in NumPy.
  (kh, kw), ((top, bottom), (left, right)), (dh, dw) = (
      kernel_size, padding, dilation)
  rng = np.random.default_rng(11)
  b, h, w, cout = 2, 7, 9, 3
  z = rng.normal(size=(b, h, w, kh * kw * cout)).astype(np.float32)
  oh = h + top + bottom - dh * (kh - 1)
  ow = w + left + right - dw * (kw - 1)
  want = np.zeros((b, oh, ow, cout), np.float32)
  g = rng.normal(size=want.shape).astype(np.float32)
  want_dz = np.zeros_like(z)
  for a in range(kh):
    for c in range(kw):
      t = slice((a * kw + c) * cout, (a * kw + c + 1) * cout)
      for i in range(oh):
        for j in range(ow):
          p, q = i + a * dh - top, j + c * dw - left
          if 0 <= p < h and 0 <= q < w:
            want[:, i, j] += z[:, p, q, t]
            want_dz[:, p, q, t] += g[:, i, j]
  y, vjp = jax.vjp(lambda v: conv_lib.shifted_tap_sum(
      v, kernel_size, padding, dilation), jnp.asarray(z))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  (dz,) = vjp(jnp.asarray(g))
  assert dz.shape == z.shape
  np.testing.assert_allclose(dz, want_dz, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('kernel,stride,padding,size', [
    ((4, 4), (2, 2), ((1, 1), (1, 1)), (11, 13)),  # odd sizes: crop / pad
    ((4, 4), (2, 2), ((1, 1), (1, 1)), (16, 8)),
    ((6, 4), (3, 2), ((2, 0), (1, 3)), (14, 9)),
    ((2, 2), (2, 2), ((0, 0), (0, 0)), (7, 10)),
])
def test_space_to_depth_conv_matches_numpy(kernel, stride, padding, size):
  rng = np.random.default_rng(6)
  x = rng.normal(size=(2,) + size + (5,)).astype(np.float32)
  w = rng.normal(size=kernel + (5, 3)).astype(np.float32)
  got = conv_lib.space_to_depth_conv(x, w, stride, padding)
  np.testing.assert_allclose(got, _numpy_conv(x, w, stride, padding, (1, 1)),
                             rtol=1e-4, atol=1e-4)
  g = rng.normal(size=got.shape).astype(np.float32)
  lax_conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, stride, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  want = jax.grad(lambda x, w: jnp.sum(lax_conv(x, w) * g),
                  argnums=(0, 1))(x, w)
  have = jax.grad(lambda x, w: jnp.sum(
      conv_lib.space_to_depth_conv(x, w, stride, padding) * g),
                  argnums=(0, 1))(x, w)
  for a, b in zip(have, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_choose_impl_rule():
  choose = conv_lib.choose_impl
  f32, bf16 = jnp.float32, jnp.bfloat16
  same = ((1, 1), (1, 1))
  # ASPP (2048 -> 19, Z smaller than the input) and bottleneck 3x3s.
  assert choose('auto', (3, 3), (1, 1), same, 2048, 19, f32) == 'taps'
  assert choose('auto', (3, 3), (1, 1), same, 256, 256, f32) == 'winograd'
  assert choose('auto', (5, 5), (1, 1), same, 256, 256, f32) == 'patches'
  assert choose('winograd', (3, 3), (1, 1), same, 8, 8, bf16) == 'winograd'
  assert choose('winograd', (4, 4), (2, 2), same, 19, 64, bf16) == (
      'space_to_depth')
  assert choose('auto', (3, 3), (1, 1), same, 256, 256, bf16) == 'taps'
  assert choose('auto', (1, 1), (2, 2), ((0, 0), (0, 0)), 64, 8,
                f32) == 'matmul'
  # Strided k x k: XLA's conv in float32, im2col in bfloat16.
  assert choose('auto', (4, 4), (2, 2), same, 19, 64, f32) == 'lax'
  assert choose('auto', (4, 4), (2, 2), same, 19, 64, bf16) == 'space_to_depth'
  assert choose('auto', (7, 7), (2, 2), same, 3, 64, bf16) == 'patches'
  assert choose('auto', (3, 3), (1, 1), same, 32, 32, f32) == 'lax'
  assert choose('auto', (3, 3), (1, 1), same, 32, 32, bf16) == 'taps'
  assert choose('dot', (3, 3), (1, 1), same, 8, 8, f32) == 'patches'
  assert choose('lax', (1, 1), (1, 1), ((0, 0), (0, 0)), 8, 8, f32) == 'lax'
  with pytest.raises(ValueError, match='stride 1'):
    choose('taps', (4, 4), (2, 2), same, 19, 64, f32)
  with pytest.raises(ValueError, match='not in'):
    choose('fft', (3, 3), (1, 1), same, 8, 8, f32)


def test_patches_matmul_keeps_only_its_input_for_backward():
  # The residuals of the k x k matmul conv: the input and the kernel, not
  # the kh*kw-times larger patch matrix (what made bf16 double the memory).
  x = jnp.ones((1, 9, 9, 4), jnp.bfloat16)
  w = jnp.ones((3, 3, 4, 8), jnp.bfloat16)
  geometry = ((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1))
  _, residuals = conv_lib._patches_matmul_fwd(x, w, geometry)  # pylint: disable=protected-access
  assert [r.shape for r in residuals] == [x.shape, w.shape]


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_weight_gradient_matches_numpy(dtype):
  # bfloat16 on CPU takes the layout-pinned transpose path, under jit too.
  rng = np.random.default_rng(7)
  x = rng.normal(size=(257, 33)).astype(np.float32)
  g = rng.normal(size=(257, 20)).astype(np.float32)
  xd, gd = jnp.asarray(x, dtype), jnp.asarray(g, dtype)
  want = (np.asarray(xd, np.float64).T @ np.asarray(gd, np.float64))
  for fn in (matmul_lib.weight_gradient, jax.jit(matmul_lib.weight_gradient)):
    got = fn(xd, gd)
    assert got.dtype == jnp.float32 and got.shape == (33, 20)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_matmul_gradient_matches_autodiff_of_dot():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
  loss = lambda f: (lambda x, w: jnp.sum(f(x, w) * g))
  got = jax.grad(loss(matmul_lib.matmul), argnums=(0, 1))(x, w)
  want = jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # bfloat16: the gradient keeps the input dtypes.
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  dx, dw = jax.grad(loss(matmul_lib.matmul), argnums=(0, 1))(xb, wb)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dw, np.float32), want[1], rtol=5e-2,
                             atol=5e-2)


def _tiny_step(compute_dtype='float32', remat=False, bn_mode='train',
               remat_impl='gated'):
  """One jitted AdaptSegNet step on the tiny network; (state, step, batch)."""
  config = adaptsegnet_config.get_config('tiny')
  config.model.compute_dtype = compute_dtype
  config.model.remat = remat
  config.model.bn_mode = bn_mode
  num_classes = 5
  precision = forward.precision_options(config)
  from jaxda import models as models_lib  # pylint: disable=g-import-not-at-top
  from jaxda import optim  # pylint: disable=g-import-not-at-top
  from jaxda import state as state_lib  # pylint: disable=g-import-not-at-top
  from jaxda.methods import get_method  # pylint: disable=g-import-not-at-top
  seg = models_lib.create_segmenter(config.model.name, num_classes,
                                    remat=remat, remat_impl=remat_impl,
                                    **precision)
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


@pytest.fixture(scope='module')
def frozen_bn_step():
  """(state, batch, new state, metrics) of a plain step with frozen BN."""
  state, step, batch = _tiny_step('float32', bn_mode='frozen')
  new_state, metrics = step(state, batch, jax.random.key(0))
  return state, batch, new_state, metrics


# 'jax' (Flax's nn.remat, whose train-BN case test_remat_step_equals_plain_
# step covers) is `slow`: one more 10 s compile of CI time.
@pytest.mark.parametrize('remat_impl', [
    'gated', pytest.param('jax', marks=pytest.mark.slow)])
def test_remat_step_with_frozen_bn_equals_plain_step(frozen_bn_step,
                                                     remat_impl):
  # Frozen BN ('gated' with train BN: test_remat_step_equals_plain_step).
  state, batch, a, ma = frozen_bn_step
  _, step_remat, _ = _tiny_step('float32', remat=True, bn_mode='frozen',
                                remat_impl=remat_impl)
  b, mb = step_remat(state, batch, jax.random.key(0))
  for x, y in zip(jax.tree.leaves((a.params, a.disc_params)),
                  jax.tree.leaves((b.params, b.disc_params))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  for k in ma:
    np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, atol=1e-7,
                               err_msg=k)


def test_after_keeps_values_and_orders_by_data():
  from jaxda.models.kernels import remat as remat_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  x = {'a': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
       'b': jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16)}
  dep = jnp.asarray(rng.normal(size=(2, 7)), jnp.float32) * 1e30
  got = remat_lib.after(x, dep, jnp.float32(-3.0))
  chex.assert_trees_all_equal(got, x)
  chex.assert_trees_all_equal_dtypes(got, x)
  # The dependency is real data flow: its value reaches the output when it
  # is not finite (what keeps XLA from dropping it).
  bad = remat_lib.after(x, jnp.full((2,), jnp.inf))
  assert not np.isfinite(np.asarray(bad['a'])).any()


def _grad_temp_bytes(remat, remat_impl, stage_sizes=(1, 1, 8, 1),
                     train_bn=False):
  from jaxda.models import deeplab  # pylint: disable=g-import-not-at-top
  model = deeplab.DeepLabV2(5, stage_sizes=stage_sizes, base_width=8,
                            remat=remat, remat_impl=remat_impl)
  x = jnp.zeros((1, 96, 160, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)

  def grad(params, batch_stats, x):
    def loss(p):
      variables = {'params': p, 'batch_stats': batch_stats}
      if train_bn:  # batch statistics, running ones updated (and returned)
        out, new = model.apply(variables, x, train_bn=True,
                               mutable=['batch_stats'])
        return sum(jnp.sum(v ** 2) for v in out.values()), new
      return sum(jnp.sum(v ** 2) for v in model.apply(variables,
                                                      x).values()), {}
    return jax.grad(loss, has_aux=True)(params)

  compiled = jax.jit(grad).lower(variables['params'],
                                 variables['batch_stats'], x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_gated_remat_shrinks_the_backward_pass_memory():
  # What remat is for, measured on XLA's own buffer assignment: with the
  # cotangent-gated recomputation only block inputs outlive the forward
  # pass, so the gradient's temporaries shrink (8 blocks in layer3 here).
  # `nn.remat` is not held to this: XLA:CPU schedules its recomputations
  # early and it does not shrink there (benchmarks/NOTES.md).
  plain = _grad_temp_bytes(False, 'gated')
  gated = _grad_temp_bytes(True, 'gated')
  assert gated < 0.6 * plain, (gated, plain)


def test_gated_remat_shrinks_the_backward_pass_memory_with_train_bn():
  # The same with BatchNorm on batch statistics (the AdaptSegNet paper
  # preset's bn_mode='train'): the gated recomputation carries the update.
  plain = _grad_temp_bytes(False, 'gated', train_bn=True)
  gated = _grad_temp_bytes(True, 'gated', train_bn=True)
  assert gated < 0.6 * plain, (gated, plain)


def test_trainable_norm_leaves_frozen_leaves_out():
  rng = np.random.default_rng(7)
  grads = {'conv1': {'kernel': rng.normal(size=(3, 3, 2, 4))},
           'bn1': {'scale': rng.normal(size=(4,)) * 10,
                   'bias': rng.normal(size=(4,)) * 10},
           'layer1': {'block_0': {'bn2': {'scale': rng.normal(size=(4,))},
                                  'conv2': {'kernel': rng.normal(size=(4,))}}}}
  grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
  from jaxda import models as models_lib  # pylint: disable=g-import-not-at-top
  got = base.trainable_norm(grads, [models_lib.batchnorm_param_regex])
  kept = np.concatenate([np.ravel(grads['conv1']['kernel']),
                         np.ravel(grads['layer1']['block_0']['conv2'][
                             'kernel'])])
  np.testing.assert_allclose(got, np.linalg.norm(kept), rtol=1e-6)
  assert got.dtype == jnp.float32
  every = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
  np.testing.assert_allclose(base.trainable_norm(grads, ()),
                             np.linalg.norm(every), rtol=1e-6)


def test_grad_norm_of_trainable_leaves_lets_xla_skip_frozen_bn_grads():
  # Reading a frozen BatchNorm's gradient makes XLA compute it, and its scale
  # gradient keeps every normalised conv output for the backward pass; the
  # metric over the trained leaves only lets XLA drop that work.
  from jaxda import models as models_lib  # pylint: disable=g-import-not-at-top
  from jaxda.models import deeplab  # pylint: disable=g-import-not-at-top
  model = deeplab.DeepLabV2(5, stage_sizes=(1, 1, 2, 1), base_width=8)
  x = jnp.zeros((1, 96, 160, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)

  def temp_bytes(norm):
    def grad_norm(params, batch_stats, x):
      loss = lambda p: sum(jnp.sum(v ** 2) for v in model.apply(
          {'params': p, 'batch_stats': batch_stats}, x).values())
      return norm(jax.grad(loss)(params))
    compiled = jax.jit(grad_norm).lower(
        variables['params'], variables['batch_stats'], x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  every = temp_bytes(base.global_norm)
  trained = temp_bytes(lambda g: base.trainable_norm(
      g, [models_lib.batchnorm_param_regex]))
  assert trained < 0.85 * every, (trained, every)  # measured ~0.76


def _max_fusion_operands(fn, *args) -> int:
  import re  # pylint: disable=g-import-not-at-top
  text = jax.jit(fn).lower(*args).compile().as_text()
  return max(m.group(1).count('%') for m in re.finditer(
      r'= \S+ fusion\((.*?)\), kind=', text))


def _shortcut_chain(boundary):
  """12 residual steps relu(1.5 x W + 0.25 + out), as a frozen-BN ResNet."""
  from jaxda.models.kernels import fusion  # pylint: disable=g-import-not-at-top

  def f(x, ws):
    out = x
    for w in ws:
      new = jax.nn.relu(jnp.dot(out, w) * 1.5 + 0.25 + out)
      out = fusion.fusion_boundary(new, out.ravel()[0]) if boundary else new
    return out
  return f


def test_fusion_boundary_keeps_values_and_cuts_the_shortcut_chain():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  ws = [jnp.asarray(rng.normal(size=(32, 32)) * 0.1, jnp.float32)
        for _ in range(12)]
  loss = lambda b: lambda x, ws: jnp.sum(_shortcut_chain(b)(x, ws) ** 2)
  chex.assert_trees_all_close(_shortcut_chain(True)(x, ws),
                              _shortcut_chain(False)(x, ws), rtol=1e-6)
  chex.assert_trees_all_close(jax.grad(loss(True), (0, 1))(x, ws),
                              jax.grad(loss(False), (0, 1))(x, ws),
                              rtol=1e-5, atol=1e-6)
  # NumPy reference for the forward values.
  ref = np.asarray(x, np.float64)
  for w in ws:
    ref = np.maximum(ref @ np.asarray(w, np.float64) * 1.5 + 0.25 + ref, 0)
  np.testing.assert_allclose(_shortcut_chain(True)(x, ws), ref, rtol=1e-4,
                             atol=1e-4)
  # Without the boundary XLA:CPU fuses every earlier step into each step's
  # fusion (13 operands here); with it every fusion reads a few buffers.
  for fn in (_shortcut_chain, lambda b: jax.grad(loss(b), (0, 1))):
    assert _max_fusion_operands(fn(False), x, ws) >= 10
    assert _max_fusion_operands(fn(True), x, ws) <= 4


def test_remat_is_applied_to_backbone_blocks():
  from jaxda import models as models_lib  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((1, 16, 16, 3))
  jaxprs = {}
  for remat, impl in ((False, 'gated'), (True, 'jax'), (True, 'gated')):
    model = models_lib.create_segmenter('deeplabv2_tiny', 3, remat=remat,
                                        remat_impl=impl)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    loss = lambda p, bs: jnp.sum(model.apply(
        {'params': p, 'batch_stats': bs}, x)['main'])
    jaxprs[remat, impl] = str(jax.make_jaxpr(jax.grad(loss))(
        variables['params'], variables['batch_stats']))
  plain, jax_remat, gated = jaxprs.values()
  # One `remat` call per tiny block for nn.remat; custom VJPs beside the
  # matmul convs' for the gated remat (its effect: the memory test above).
  assert plain.count('remat') == 0 and jax_remat.count('remat') == 4
  assert gated.count('remat') == 0
  assert gated.count('custom_vjp') > plain.count('custom_vjp')


def _tiny_run(tmp_path, log_every):
  config = adaptsegnet_config.get_config('tiny')
  config.num_devices = 1
  config.batch_size = 2
  config.log_every = log_every
  config.checkpoint_every = 1000
  config.source.data_dir = str(tmp_path / 'cache')
  config.target.data_dir = str(tmp_path / 'cache')
  run = train_loop.setup(config, str(tmp_path / 'work'),
                         methods.get_method(config.method))
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


def test_init_replicated_matches_optimised_init_and_is_replicated():
  """Level-0 init: the same parameters (to an ulp), on every device."""
  seg = models.create_segmenter("deeplabv2_tiny", 5, multi_level=False)
  init = lambda: seg.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
  mesh = parallel.make_mesh()
  got = parallel.init_replicated(init, mesh)
  want = jax.jit(init)()
  leaves = jax.tree_util.tree_leaves_with_path(got)
  assert len(leaves) == len(jax.tree.leaves(want)) > 10
  for (path, g), w in zip(leaves, jax.tree.leaves(want)):
    assert g.sharding.is_fully_replicated and len(g.devices()) == len(
        mesh.devices.ravel()), path
    w = np.asarray(w)
    # 1-ulp differences (no FMA at level 0), never different draws.
    np.testing.assert_allclose(np.asarray(g), w, rtol=0,
                               atol=4 * np.spacing(np.max(np.abs(w)) + 1e-30),
                               err_msg=jax.tree_util.keystr(path))
  # Different seeds really draw differently (the check above can fail).
  other = parallel.init_replicated(
      lambda: seg.init(jax.random.key(4), jnp.zeros((1, 32, 32, 3))), mesh)
  assert not np.allclose(np.asarray(jax.tree.leaves(other)[-1]),
                         np.asarray(jax.tree.leaves(want)[-1]))
