"""Optimiser labels, the 10x head multiplier and frozen parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxda import models
from jaxda import optim


def _params():
  model = models.create_segmenter("deeplabv2_tiny", 5)
  return model.init(jax.random.key(0), jnp.zeros((1, 32, 64, 3)))["params"]


def _make(params, **kw):
  kw.setdefault("learning_rate", 0.1)
  kw.setdefault("schedule_steps", 10)
  kw.setdefault("weight_decay", 0.0)
  kw.setdefault("momentum", 0.0)
  return optim.make_segmenter_tx(
      head_regexes=(models.head_param_regex,),
      frozen_regexes=(models.batchnorm_param_regex,), **kw)


def test_every_param_labelled_and_bn_frozen():
  params = _params()
  _, labels_fn = _make(params)
  labels = labels_fn(params)
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  assert flat and all(v in (optim.TRAIN, optim.FROZEN) for _, v in flat)
  for path, label in flat:
    name = optim.param_path(path)
    is_bn = "bn" in name.split("/")[-2] or "downsample_bn" in name
    assert (label == optim.FROZEN) == is_bn, name
  assert any(v == optim.FROZEN for _, v in flat)
  assert any(v == optim.TRAIN for _, v in flat)


def test_head_lr_is_ten_times_and_frozen_unchanged():
  params = _params()
  tx, _ = _make(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  flat_u = dict(jax.tree_util.tree_flatten_with_path(updates)[0])
  seen_head = seen_body = seen_bn = False
  for path, u in flat_u.items():
    name = optim.param_path(path)
    u = np.asarray(u)
    if name.startswith(("aspp_main/", "aspp_aux/")):
      np.testing.assert_allclose(u, -1.0, rtol=1e-6)  # 10 x 0.1 x 1
      seen_head = True
    elif "bn" in name.split("/")[-2]:
      np.testing.assert_array_equal(u, 0.0)
      seen_bn = True
    else:
      np.testing.assert_allclose(u, -0.1, rtol=1e-6)
      seen_body = True
  assert seen_head and seen_body and seen_bn


def test_sgd_matches_pytorch_update_rule():
  """PyTorch SGD: d = g + wd*w; buf = m*buf + d; w -= lr_i * buf."""
  w0 = np.array([1.0, -2.0, 0.5], np.float32)
  params = {"layer": {"kernel": jnp.asarray(w0)}}
  tx, _ = optim.make_segmenter_tx(learning_rate=0.1, schedule_steps=5,
                                  momentum=0.9, weight_decay=0.01)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  w, buf = w0.astype(np.float64), np.zeros(3)
  p = params
  for i in range(4):
    g = rng.normal(size=3).astype(np.float32)
    updates, state = tx.update({"layer": {"kernel": jnp.asarray(g)}}, state, p)
    p = optax.apply_updates(p, updates)
    lr = 0.1 * (1 - i / 5) ** 0.9
    d = g + 0.01 * w
    buf = 0.9 * buf + d if i else d
    w = w - lr * buf
  np.testing.assert_allclose(np.asarray(p["layer"]["kernel"]), w, rtol=1e-5)


def test_poly_schedule_values():
  sched = optim.poly_schedule(2.5e-4, 250_000)
  np.testing.assert_allclose(float(sched(0)), 2.5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(sched(150_000)) / 2.5e-4, 0.4 ** 0.9,
                             rtol=1e-4)


def test_staircase_decay_multiplies_the_lr_per_period():
  base = optim.poly_schedule(1.0, 100, power=0.9)
  sched = optim.staircase(base, every=3, factor=0.5)
  for count in range(10):
    want = (1 - count / 100) ** 0.9 * 0.5 ** (count // 3)
    np.testing.assert_allclose(float(sched(count)), want, rtol=1e-6)
  assert optim.staircase(base, 0, 0.5) is base
  assert optim.staircase(base, 3, 1.0) is base
  # Through the optimiser: plain SGD, constant LR, unit gradients.
  tx, _ = optim.make_segmenter_tx(
      learning_rate=0.1, schedule_steps=100, momentum=0.0, weight_decay=0.0,
      power=0.0, decay_every=2, decay_factor=0.5)
  params = {"w": jnp.zeros(())}
  opt_state = tx.init(params)
  got = []
  for _ in range(5):
    updates, opt_state = tx.update({"w": jnp.ones(())}, opt_state, params)
    got.append(float(updates["w"]))
  np.testing.assert_allclose(got, [-0.1, -0.1, -0.05, -0.05, -0.025],
                             rtol=1e-6)
