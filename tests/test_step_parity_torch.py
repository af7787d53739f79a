"""One AdaptSegNet / ADVENT training step: jaxda == PyTorch, weight for weight.

The reference is the originals' iteration written out in PyTorch
(`_torch_step`: `wasidennis/AdaptSegNet:train_gta2cityscapes_multi.py` and
`valeoai/ADVENT:advent/domain_adaptation/train_UDA.py:train_advent`, one
iteration, `iter_size = 1`) on the hand-written `benchmarks.torch_reference`
networks (the originals' state-dict names). Both sides start from the same
random weights (converted by `jaxda.weights.torch_import`) and run ONE step on
the same tiny batch; then the losses, the gradients (read from the optimiser
states) and the updated segmenter and discriminator parameters must agree.

What the comparison pins down is the originals' update order: every gradient
is taken before any parameter changes. The generator's adversarial gradient
uses the discriminators' pre-update weights and does not reach them
(`requires_grad = False`); the discriminators are trained on the detached
predictions of that same forward pass; then SGD (segmenter) and Adam
(discriminators) step. jaxda computes the same thing as two
`value_and_grad`s (segmenter; discriminators on `stop_gradient`-ed maps)
followed by both updates (`jaxda/methods/adversarial.py`).

Each test CAN fail. Checked by running a copy of this file with the PyTorch
side changed (not kept here); every parametrisation failed for each of
  (a) D's Adam stepped before the target pass and the adversarial loss (the
      segmenter fooled the updated D): adv losses, segmenter gradient and
      updated segmenter weights off by up to 76% of the leaf's scale;
  (b) D trained on the non-detached predictions (`.detach()` removed,
      `retain_graph=True`, so L_D also reaches the segmenter): grad_norm,
      segmenter gradient and weights off by up to 17%;
  (c) D's `requires_grad` left True in the generator pass (the adversarial
      loss also trains D): D gradients (Adam mu) off by up to 170%, D
      updates of the wrong sign;
  (d) the segmenter's SGD stepped before D's loss, D fed the updated
      segmenter's predictions: disc losses, D gradients and D updates;
and each failure was also caught with the loss asserts removed, and again
with the loss and gradient asserts removed (the updated weights alone). With
the originals' order restored, all pass.

Choices that make the two sides comparable, all deliberate:

* BatchNorm `bn_mode='frozen'` = PyTorch BN in eval mode (running statistics,
  never updated; affine parameters `requires_grad=False` as in the originals
  and jaxda's frozen regex). The published runs use `model.train()`
  (`bn_mode='train'`); there the running variances would differ anyway
  (Flax averages in the biased batch variance, PyTorch the unbiased one,
  a factor n / (n - 1) on the new term), and the parameters' update is what
  this file checks.
* Random He-scaled weights and random BN statistics (as
  `tests/test_torch_import.py`), so logits, softmax and D's outputs are far
  from degenerate. Large learning rates (segmenter 0.25, heads 10x; D 1e-2)
  and adversarial weights (λ_adv 0.5 / 0.2, λ_seg_aux 0.3) make each term a
  visible part of the update and keep the float32 rounding of the weights
  small against the update (one step: the size changes nothing else); with
  the originals' values (2.5e-4, 1e-4, 0.001 / 0.0002, 0.1) an update-order
  error would be a far smaller fraction of the update.
* One step from a fresh optimiser state: the poly schedules are at their base
  value on both sides (PyTorch `lr_poly(i_iter=0)`, optax count 0), SGD's
  momentum buffer is the first (coupled weight-decay) gradient and Adam's
  first step is `lr * g / (|g| + eps)`.

Tolerances (float32 on both sides; measured errors in parentheses):

* losses and the applied gradient's norm: 1e-5 relative (<= 2.5e-6).
* gradients, per leaf: max |jax - torch| <= 1e-5 * max |torch| of that leaf.
  Segmenter: SGD momentum trace = g + wd * w (optax `trace` vs PyTorch
  `momentum_buffer`); discriminators: Adam's `mu` = (1 - b1) g and
  sqrt(`nu` / (1 - b2)) = |g| vs `exp_avg` / `exp_avg_sq` (segmenter
  <= 1.1e-6, D <= 3.5e-6).
* updated segmenter weights, per leaf: max |Δw_jax - Δw_torch| <=
  1e-5 * max |Δw_torch| + 2 float32 ulps of the leaf's largest weight (each
  side rounds w - lr * v to float32 once; error <= 4.6e-6 of the update,
  <= 0.16 of the tolerance).
* updated discriminator weights, per element: Adam's first step is
  lr * u(g) with u(g) = g / (|g| + eps), eps = 1e-8, which blows float32
  noise in the tiny gradients of cancelling taps (|g| ~ 1e-9 of a leaf whose
  largest is 1e-2) up to a sizeable fraction of lr. So the bound is the
  1e-5 gradient tolerance pushed through u (mean-value bound, δg = 1e-5 max
  |g| of the leaf): lr * (1e-5 + δg * eps / (max(|g| - δg, 0) + eps)^2) plus
  2 ulps of the leaf's largest weight (<= 0.27 of the tolerance; the
  largest single difference, 0.24 lr, is on such a tap).
"""

import copy
import os
import sys
import types

import jax
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `benchmarks` is a repository folder, not an installed package.
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from torch.nn import functional as F

from benchmarks.torch_reference import adaptsegnet_step
from benchmarks.torch_reference import deeplab_v2
from benchmarks.torch_reference import discriminator as torch_disc
from experiments.configs import adaptsegnet as adaptsegnet_cfg
from experiments.configs import advent as advent_cfg
from jaxda import state as state_lib
from jaxda.methods import get_method
from jaxda.tasks import segmentation
from jaxda.weights import torch_import

NUM_CLASSES = 4
B, H, W = 2, 33, 41
IGNORE = 255
RTOL = 1e-5
ADAM_EPS = 1e-8  # optax.adam and torch.optim.Adam default
LEVELS = ('main', 'aux')  # jaxda level names; PyTorch layer6 / layer5


# ----------------------------------------------------------------------------
# Shared set-up.


@pytest.fixture(autouse=True)
def _one_torch_thread():
  """PyTorch on one thread while these tests run.

  Its two OpenMP threads spin at every barrier; on the loaded 2-core CI
  machine (JAX's threads, the other xdist worker) the tiny first step took
  8 s instead of 1.5 s. The previous count is restored afterwards.
  """
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _randomize(module, seed):
  """He-scaled conv weights, random biases, BN affine and statistics."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.Conv2d):
        m.weight.normal_(0, (2.0 / m.weight[0].numel())**0.5, generator=g)
        if m.bias is not None:
          m.bias.normal_(0, 0.1, generator=g)
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.normal_(0, 0.1, generator=g)
        m.running_mean.normal_(0, 0.1, generator=g)
        m.running_var.uniform_(0.5, 2.0, generator=g)
  return module


def _numpy_state_dict(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _torch_models(aspp_branches_used):
  net = deeplab_v2.ResNetMulti((1, 1, 1, 1), NUM_CLASSES, base_width=8,
                               aspp_branches_used=aspp_branches_used)
  # ndf 8 = the `tiny` preset's config.adversarial.ndf.
  discs = {level: _randomize(torch_disc.FCDiscriminator(NUM_CLASSES, ndf=8),
                             seed=i + 1) for i, level in enumerate(LEVELS)}
  return _randomize(net, seed=0), discs


def _batch():
  """Source images + labels (some 255) and shifted target images, NCHW."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(B, 3, H, W)).astype(np.float32)
  images_t = (1.5 * rng.normal(size=(B, 3, H, W)) + 0.3).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, (B, H, W))
  labels[:, :3] = IGNORE
  labels[0, 10:20, 5:9] = IGNORE
  return images, labels, images_t


def _config(name, gan, aspp_branches_used):
  cfg_module = {'adaptsegnet': adaptsegnet_cfg, 'advent': advent_cfg}[name]
  config = cfg_module.get_config('tiny')
  config.model.bn_mode = 'frozen'
  config.model.aspp_branches_used = aspp_branches_used
  config.adversarial.gan = gan
  config.optim.learning_rate = 0.25
  config.adversarial.learning_rate = 1e-2
  config.adversarial.lambda_adv_main = 0.5
  config.adversarial.lambda_adv_aux = 0.2
  config.loss.lambda_seg_aux = 0.3
  assert config.model.name == 'deeplabv2_tiny' and config.model.multi_level
  assert config.model.upsample_align_corners
  assert config.optim.optimizer == 'sgd'
  return config


# ----------------------------------------------------------------------------
# jaxda: the step the training loop runs, built the way the loop builds it.


def _jax_step(config, net, discs, batch):
  """Returns (initial variables, initial D params, new state, metrics)."""
  method = get_method(config.method)
  # The segmentation task's builder: the loop's models and optimisers (head
  # regex, frozen BN / dead-branch regexes, poly schedules, Adam betas).
  built = segmentation.build(config, method, {
      'target_val': types.SimpleNamespace(
          class_names=tuple(f'c{i}' for i in range(NUM_CLASSES)))})
  tx, disc_tx = built['tx'], built['disc_tx']
  variables = torch_import.convert_state_dict(_numpy_state_dict(net),
                                              'deeplabv2_tiny')
  disc_params = {
      level: torch_import.convert_state_dict(_numpy_state_dict(d),
                                             'fc_discriminator')['params']
      for level, d in discs.items()}
  state = state_lib.TrainState.create(
      params=variables['params'], batch_stats=variables['batch_stats'],
      tx=tx, disc_params=disc_params, disc_tx=disc_tx)
  step = method.make_step(built['models'], config, tx, disc_tx)
  images, labels, images_t = batch
  jax_batch = {
      'source': {'image': images.transpose(0, 2, 3, 1),
                 'label': labels.astype(np.int32)},
      'target': {'image': images_t.transpose(0, 2, 3, 1)}}
  new_state, metrics = jax.device_get(
      jax.jit(step)(state, jax_batch, jax.random.key(0)))
  return variables, disc_params, new_state, metrics


# ----------------------------------------------------------------------------
# PyTorch: the originals' iteration.


def _prob_2_entropy(prob):
  """ADVENT `advent/utils/func.py:prob_2_entropy`."""
  c = prob.size(1)
  return -torch.mul(prob, torch.log2(prob + 1e-30)) / np.log2(c)


def _torch_step(config, net, discs, batch, disc_input):
  """One iteration of the originals, in place; returns losses, optimisers.

  AdaptSegNet (`disc_input='softmax'`, `--gan Vanilla|LS`) and ADVENT
  (`'entropy'`, BCE) share it: they differ only in what D sees. Level 'aux'
  is `layer5` / `pred1` / `D1` (ADVENT `d_aux`), 'main' `layer6` / `pred2` /
  `D2` (`d_main`).
  """
  lr = config.optim.learning_rate
  lr_d = config.adversarial.learning_rate
  lambda_adv = {'main': config.adversarial.lambda_adv_main,
                'aux': config.adversarial.lambda_adv_aux}
  # `model.train()` with BN frozen in eval mode (bn_mode='frozen').
  net.train()
  for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.eval()
  # `optim_parameters`: backbone at lr, heads (layer5, layer6) at 10 lr; BN
  # affine parameters have requires_grad=False. SGD with coupled weight decay.
  head = [p for m in (net.layer5, net.layer6) for p in m.parameters()]
  head_ids = {id(p) for p in head}
  backbone = [p for p in net.parameters()
              if p.requires_grad and id(p) not in head_ids]
  optimizer = torch.optim.SGD(
      [{'params': backbone, 'lr': lr},
       {'params': head, 'lr': lr * config.optim.head_lr_mult}],
      lr=lr, momentum=config.optim.momentum,
      weight_decay=config.optim.weight_decay)
  optimizers_d = {
      level: torch.optim.Adam(d.parameters(), lr=lr_d,
                              betas=(config.adversarial.b1,
                                     config.adversarial.b2))
      for level, d in discs.items()}
  # `bce_loss` of the originals; AdaptSegNet's `--gan LS` is MSELoss.
  criterion = (torch.nn.BCEWithLogitsLoss()
               if config.adversarial.gan == 'vanilla' else torch.nn.MSELoss())
  ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)  # CrossEntropy2d

  def d_in(pred):
    prob = F.softmax(pred, dim=1)
    return prob if disc_input == 'softmax' else _prob_2_entropy(prob)

  def predict(x):
    aux, main = net(x)
    # nn.Upsample(size=input size, mode='bilinear', align_corners=True)
    up = lambda p: F.interpolate(p, size=(H, W), mode='bilinear',
                                 align_corners=True)
    return {'main': up(main), 'aux': up(aux)}

  images, labels, images_t = (torch.from_numpy(a) for a in batch)
  out = {}
  optimizer.zero_grad()
  for opt in optimizers_d.values():
    opt.zero_grad()

  # Train G: D fixed.
  for d in discs.values():
    for p in d.parameters():
      p.requires_grad = False
  pred = predict(images)
  out['ce_main'] = ce(pred['main'], labels)
  out['ce_aux'] = ce(pred['aux'], labels)
  seg = out['ce_main'] + config.loss.lambda_seg_aux * out['ce_aux']
  seg.backward()
  pred_t = predict(images_t)
  adv = 0.0
  for level, d in discs.items():
    d_out = d(d_in(pred_t[level]))
    out[f'adv_{level}'] = criterion(d_out, torch.full_like(d_out, 0.0))
    adv = adv + lambda_adv[level] * out[f'adv_{level}']
  adv.backward()

  # Train D on the detached predictions: source 0, target 1, each halved.
  for d in discs.values():
    for p in d.parameters():
      p.requires_grad = True
  for level, d in discs.items():
    d_out = d(d_in(pred[level].detach()))
    loss_src = criterion(d_out, torch.full_like(d_out, 0.0)) / 2
    loss_src.backward()
    d_out = d(d_in(pred_t[level].detach()))
    loss_tgt = criterion(d_out, torch.full_like(d_out, 1.0)) / 2
    loss_tgt.backward()
    out[f'disc_{level}'] = loss_src + loss_tgt

  optimizer.step()
  for opt in optimizers_d.values():
    opt.step()
  out['seg_loss'] = seg
  out['loss'] = seg + adv
  grads = [p.grad for p in net.parameters() if p.grad is not None]
  out['grad_norm'] = torch.sqrt(sum(torch.sum(g**2) for g in grads))
  return ({k: float(v.detach()) for k, v in out.items()}, optimizer,
          optimizers_d)


# ----------------------------------------------------------------------------
# Comparisons.


def _ulp_floor(*arrays):
  """2 float32 ulps of the largest magnitude in `arrays`."""
  top = max(float(np.max(np.abs(a))) for a in arrays)
  return 2.0 * float(np.spacing(np.float32(top)))


def _flat(tree):
  """{'a/b/c': leaf}, MaskedNode leaves (optax: frozen) left out."""
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
  return {jax.tree_util.keystr(p, simple=True, separator='/'):
          np.asarray(v, np.float64)
          for p, v in leaves if not isinstance(v, optax.MaskedNode)}


def _assert_grads_match(got_tree, want_tree, what):
  got, want = _flat(got_tree), _flat(want_tree)
  assert set(got) == set(want), (what, set(got) ^ set(want))
  bad = {}
  for name, w in want.items():
    scale = float(np.max(np.abs(w)))
    err = float(np.max(np.abs(got[name] - w)))
    if err > RTOL * scale:
      bad[name] = (err / max(scale, 1e-30), scale)
  assert not bad, f'{what}: (relative error, scale) per leaf: {bad}'


def _assert_segmenter_updates_match(old, got_new, want_new, frozen_paths):
  old, got_new, want_new = _flat(old), _flat(got_new), _flat(want_new)
  bad = {}
  for name, w0 in old.items():
    d_got, d_want = got_new[name] - w0, want_new[name] - w0
    if name in frozen_paths:
      # BN affine and dead ASPP branches: untouched on both sides.
      np.testing.assert_array_equal(got_new[name], w0, err_msg=name)
      np.testing.assert_array_equal(want_new[name], w0, err_msg=name)
      continue
    size = float(np.max(np.abs(d_want)))
    assert size > 0, f'{name} did not move in PyTorch'
    err = float(np.max(np.abs(d_got - d_want)))
    if err > RTOL * size + _ulp_floor(w0, want_new[name]):
      bad[name] = (err / size, size)
  assert not bad, f'segmenter: (error / update size, update size): {bad}'


def _assert_discriminator_updates_match(old, got_new, want_new, grads, lr):
  old, got_new, want_new = _flat(old), _flat(got_new), _flat(want_new)
  grads = _flat(grads)
  bad = {}
  for name, w0 in old.items():
    g = grads[name]
    dg = RTOL * float(np.max(np.abs(g)))
    slope = ADAM_EPS / (np.maximum(np.abs(g) - dg, 0.0) + ADAM_EPS)**2
    tol = lr * (RTOL + dg * slope) + _ulp_floor(w0, want_new[name])
    d_got, d_want = got_new[name] - w0, want_new[name] - w0
    assert np.max(np.abs(d_want)) > 0.5 * lr, f'{name} did not move'
    excess = np.abs(d_got - d_want) - tol
    if np.max(excess) > 0:
      i = np.unravel_index(np.argmax(excess), excess.shape)
      bad[name] = dict(index=i, got=d_got[i], want=d_want[i], tol=tol[i],
                       grad=g[i])
  assert not bad, f'discriminator updates beyond tolerance: {bad}'


def _torch_tree(module, arch, values):
  """`module`'s state dict with `values` (name -> tensor) put in, converted
  to jaxda's tree; tensors not in `values` become zeros."""
  sd = {k: np.zeros_like(v) for k, v in _numpy_state_dict(module).items()}
  sd.update({k: v.detach().numpy() for k, v in values.items()})
  return torch_import.convert_state_dict(sd, arch)['params']


def _check_step(config, disc_input):
  net, discs = _torch_models(config.model.aspp_branches_used)
  batch = _batch()
  variables, disc_params, new, metrics = _jax_step(config, net, discs, batch)
  want, optimizer, optimizers_d = _torch_step(config, net, discs, batch,
                                              disc_input)

  # Losses (and the norm of the applied gradient).
  for key in ('ce_main', 'ce_aux', 'seg_loss', 'adv_main', 'adv_aux',
              'disc_main', 'disc_aux', 'loss', 'grad_norm'):
    np.testing.assert_allclose(float(metrics[key]), want[key], rtol=RTOL,
                               err_msg=key)

  # Segmenter gradient: optax trace == PyTorch momentum buffer.
  buffers = {name: optimizer.state[p]['momentum_buffer']
             for name, p in net.named_parameters() if p in optimizer.state}
  trace = optax.tree_utils.tree_get(new.opt_state, 'trace')
  want_trace = _torch_tree(net, 'deeplabv2_tiny', buffers)
  trained = _flat(trace)
  # Exactly the parameters PyTorch's SGD updated are trained in jaxda.
  updated = _flat(_torch_tree(net, 'deeplabv2_tiny', {
      name: torch.ones_like(p) for name, p in net.named_parameters()
      if p.grad is not None}))
  assert set(trained) == {k for k, v in updated.items() if np.all(v == 1)}
  _assert_grads_match(trace, {k: v for k, v in _flat(want_trace).items()
                              if k in trained}, 'segmenter gradient')

  # Segmenter parameters.
  want_params = torch_import.convert_state_dict(_numpy_state_dict(net),
                                                'deeplabv2_tiny')
  frozen = set(_flat(variables['params'])) - set(trained)
  _assert_segmenter_updates_match(variables['params'], new.params,
                                  want_params['params'], frozen)
  # bn_mode='frozen': running statistics unchanged on both sides.
  jax.tree.map(np.testing.assert_array_equal, new.batch_stats,
               variables['batch_stats'])
  jax.tree.map(np.testing.assert_array_equal, want_params['batch_stats'],
               variables['batch_stats'])

  # Discriminator gradients: Adam's first moments.
  mu = optax.tree_utils.tree_get(new.disc_opt_state, 'mu')
  nu = optax.tree_utils.tree_get(new.disc_opt_state, 'nu')
  b1, b2 = config.adversarial.b1, config.adversarial.b2
  for level, d in discs.items():
    state = optimizers_d[level].state
    params = dict(d.named_parameters())
    want_mu = _torch_tree(d, 'fc_discriminator', {
        n: state[p]['exp_avg'] for n, p in params.items()})
    want_g_abs = _torch_tree(d, 'fc_discriminator', {
        n: torch.sqrt(state[p]['exp_avg_sq'] / (1 - b2))
        for n, p in params.items()})
    _assert_grads_match(mu[level], want_mu, f'D {level} gradient (mu)')
    _assert_grads_match(jax.tree.map(lambda v: np.sqrt(v / (1 - b2)),
                                     nu[level]),
                        want_g_abs, f'D {level} |gradient| (nu)')
    # Discriminator parameters.
    _assert_discriminator_updates_match(
        disc_params[level], new.disc_params[level],
        torch_import.convert_state_dict(_numpy_state_dict(d),
                                        'fc_discriminator')['params'],
        jax.tree.map(lambda m: m / (1 - b1), want_mu),
        config.adversarial.learning_rate)


def _assert_benchmark_step_is_the_reference(config):
  """`benchmarks.torch_reference.adaptsegnet_step` (BCE only; what
  `benchmarks/train_step_bench.py` times) == `_torch_step`, bit for bit."""
  net, discs = _torch_models(config.model.aspp_branches_used)
  net_b, discs_b = copy.deepcopy(net), copy.deepcopy(discs)
  batch = _batch()
  want, _, _ = _torch_step(config, net, discs, batch, 'softmax')
  step = adaptsegnet_step.AdaptSegNetStep(
      net_b, discs_b, learning_rate=config.optim.learning_rate,
      momentum=config.optim.momentum, weight_decay=config.optim.weight_decay,
      head_lr_mult=config.optim.head_lr_mult,
      learning_rate_d=config.adversarial.learning_rate,
      betas=(config.adversarial.b1, config.adversarial.b2),
      power=config.optim.power, max_iter=config.num_steps,
      lambda_seg=config.loss.lambda_seg_aux,
      lambda_adv={'main': config.adversarial.lambda_adv_main,
                  'aux': config.adversarial.lambda_adv_aux},
      bn_mode='frozen', channels_last=False)
  got = step(0, *(torch.from_numpy(a) for a in batch))
  assert {k: float(v) for k, v in got.items()} == {k: want[k] for k in got}
  for a, b in [(net, net_b)] + [(discs[k], discs_b[k]) for k in discs]:
    jax.tree.map(np.testing.assert_array_equal, _numpy_state_dict(a),
                 _numpy_state_dict(b))


# ----------------------------------------------------------------------------
# The tests.


@pytest.mark.parametrize('gan,aspp_branches_used', [
    # BCE with ADVENT's / the paper's 4 summed ASPP branches.
    ('vanilla', 4),
    # LS-GAN with the released code's early-return ASPP (2 branches): the
    # dead branches get no gradient in PyTorch (SGD skips them, no weight
    # decay); jaxda freezes them by regex (`segmenter_frozen_regexes`).
    ('ls', 2),
])
def test_adaptsegnet_step_matches_torch(gan, aspp_branches_used):
  """Multi-level AdaptSegNet: D on softmax(up(P)) for main and aux."""
  config = _config('adaptsegnet', gan, aspp_branches_used)
  if gan == 'vanilla':
    _assert_benchmark_step_is_the_reference(config)
  _check_step(config, 'softmax')


def test_advent_step_matches_torch():
  """Multi-level AdvEnt: D on the weighted self-information map, BCE."""
  config = _config('advent', 'vanilla', 4)
  assert get_method('advent').discriminator_inputs == 'entropy'
  _check_step(config, 'entropy')


@pytest.mark.parametrize('bn_mode', ['frozen', 'train'])
def test_step_benchmark_gives_torch_the_bn_mode_jaxda_runs(bn_mode,
                                                          monkeypatch):
  """`benchmarks.train_step_bench` once timed jaxda's paper preset (BN on
  batch statistics) against a PyTorch step hard-wired to running statistics
  (first-step losses 9.8 apart); both sides must now read one setting."""
  from benchmarks import train_step_bench  # pylint: disable=g-import-not-at-top
  seen = {}

  def capture(model, discs, **kwargs):
    del model, discs
    seen.update(kwargs)

  monkeypatch.setattr(adaptsegnet_step, 'AdaptSegNetStep', capture)
  size = train_step_bench.parse_size('small')
  config = train_step_bench.make_config(size, 'float32', bn_mode=bn_mode)
  train_step_bench.torch_step(None, None, config)
  assert config.model.bn_mode == bn_mode
  assert seen['bn_mode'] == bn_mode
