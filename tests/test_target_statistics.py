"""AdaBN target statistics for self-training and the 'split' BatchNorm mode.

The reference is NumPy on a network of 1x1 convolutions (a matrix product
per pixel), so every layer's batch statistics can be computed by hand,
and its BatchNorm momenta are not the models' 0.9, so the estimate must
not assume one.
"""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import adaptsegnet as adaptsegnet_cfg
from experiments.configs import tpld as tpld_cfg
from jaxda import parallel
from jaxda.data import pipeline
from jaxda.methods.self_training import recipe
from jaxda.methods.self_training import target_statistics
from jaxda.models import forward
from jaxda.tasks import segmentation
from jaxda.train import exceptions

EPS = 1e-5


class TwoLayer(nn.Module):
  """1x1 conv -> BN (momentum 0.5) -> ReLU -> 1x1 conv -> BN (0.99)."""

  @nn.compact
  def __call__(self, x, *, train_bn=False):
    x = nn.Conv(4, (1, 1), use_bias=False, name="c1")(x)
    x = nn.BatchNorm(use_running_average=not train_bn, momentum=0.5,
                     epsilon=EPS, name="bn1")(x)
    x = nn.Conv(3, (1, 1), use_bias=False, name="c2")(nn.relu(x))
    x = nn.BatchNorm(use_running_average=not train_bn, momentum=0.99,
                     epsilon=EPS, name="bn2")(x)
    return {"main": x}


def _net(seed=0):
  net = TwoLayer()
  variables = net.init(jax.random.key(seed), jnp.zeros((1, 5, 6, 3)))
  # Non-trivial affine parameters so the second layer sees them.
  params = jax.tree.map(
      lambda p: p + 0.3 * jax.random.normal(jax.random.key(7), p.shape),
      variables["params"])
  return forward.Models(net), params, variables["batch_stats"]


def _reference_stats(params, images):
  """NumPy: every layer's batch mean / biased variance, in train mode."""
  p = jax.tree.map(np.asarray, params)
  x = np.asarray(images, np.float64)
  h1 = x @ p["c1"]["kernel"][0, 0]
  m1, v1 = h1.mean((0, 1, 2)), h1.var((0, 1, 2))
  a1 = (h1 - m1) / np.sqrt(v1 + EPS) * p["bn1"]["scale"] + p["bn1"]["bias"]
  h2 = np.maximum(a1, 0) @ p["c2"]["kernel"][0, 0]
  return {"bn1": {"mean": m1, "var": v1},
          "bn2": {"mean": h2.mean((0, 1, 2)), "var": h2.var((0, 1, 2))}}


def _close(got, want, rtol=1e-4, atol=1e-5):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(
      np.asarray(g), w, rtol=rtol, atol=atol), got, want)


@pytest.mark.parametrize("seed", [0, 1])
def test_batch_statistics_match_numpy_whatever_the_momentum(seed):
  models, params, stats = _net(seed)
  # Running statistics far from the batch's: the result must not see them.
  stats = jax.tree.map(lambda s: s + 5.0, stats)
  images = 2.0 * jax.random.normal(jax.random.key(10 + seed), (6, 5, 6, 3))
  got = jax.jit(forward.batch_statistics, static_argnums=0)(
      models, params, stats, images)
  _close(got, _reference_stats(params, images))


def test_inference_with_the_estimate_equals_a_training_pass():
  """AdaBN on one batch: normalising with its statistics as running ones
  gives exactly the batch-statistics forward pass."""
  models, params, stats = _net()
  images = jax.random.normal(jax.random.key(3), (4, 5, 6, 3)) * 3 + 1
  est = forward.batch_statistics(models, params, stats, images)
  frozen, _ = forward.forward(models, params, est, images, bn_mode="frozen",
                              labelled=False)
  batch, _ = forward.forward(models, params, stats, images, bn_mode="train",
                             labelled=True)
  np.testing.assert_allclose(frozen["main"], batch["main"], atol=1e-4)
  # With the stale statistics the outputs differ: the check can fail.
  stale, _ = forward.forward(models, params, stats, images, bn_mode="frozen",
                             labelled=False)
  assert np.abs(np.asarray(stale["main"] - batch["main"])).max() > 0.1


def test_split_mode_batch_statistics_for_labelled_running_for_the_rest():
  models, params, stats = _net()
  stats = jax.tree.map(lambda s: s + 0.5, stats)
  images = jax.random.normal(jax.random.key(4), (4, 5, 6, 3))
  out, new = forward.forward(models, params, stats, images, bn_mode="split",
                             labelled=True)
  want, updated = forward.forward(models, params, stats, images,
                                  bn_mode="source", labelled=True)
  np.testing.assert_array_equal(out["main"], want["main"])
  jax.tree.map(np.testing.assert_array_equal, new, stats)  # left alone
  assert any(np.abs(np.asarray(a - b)).max() > 0 for a, b in zip(
      jax.tree.leaves(updated), jax.tree.leaves(stats)))  # 'source' writes
  for labelled, training in ((False, True), (True, False)):
    out, new = forward.forward(models, params, stats, images,
                               bn_mode="split", labelled=labelled,
                               training=training)
    want, _ = forward.forward(models, params, stats, images,
                              bn_mode="frozen", labelled=labelled)
    np.testing.assert_array_equal(out["main"], want["main"])
    jax.tree.map(np.testing.assert_array_equal, new, stats)


def _fake_run(images, batch_size):
  config = ml_collections.ConfigDict({
      "eval": {"batch_size": batch_size, "host_batch_size": batch_size},
      "data": {"normalization": "unit"}})
  models, params, stats = _net()
  run = types.SimpleNamespace(
      config=config, models=models, mesh=parallel.make_mesh(1),
      data={"target_train": types.SimpleNamespace(images=images)})
  return run, types.SimpleNamespace(params=params, batch_stats=stats)


def test_estimate_averages_full_batches_and_leaves_the_rest_out():
  images = np.random.default_rng(0).integers(0, 256, (11, 5, 6, 3),
                                             dtype=np.uint8)
  run, state = _fake_run(images, 4)
  got = target_statistics.estimate(run, state)
  x = pipeline.normalize(images, "unit")
  per_batch = [_reference_stats(state.params, x[i:i + 4]) for i in (0, 4)]
  _close(got, jax.tree.map(lambda a, b: (a + b) / 2, *per_batch))
  # Fewer images than a batch: one batch of all of them.
  run, state = _fake_run(images[:3], 4)
  _close(target_statistics.estimate(run, state),
         _reference_stats(state.params, x[:3]))


def test_config_checks_are_one_line():
  config = tpld_cfg.get_config("tiny,target_bn")
  assert config.self_training.target_bn_stats
  assert recipe.problems(config) == []
  config.model.bn_mode = "train"
  with pytest.raises(exceptions.ConfigError, match="target_bn_stats needs"
                     " model.bn_mode 'source' or 'frozen'"):
    recipe.check(config)
  # The rounds' mode: 'source' -> 'split', 'frozen' stays.
  for base, rounds in (("source", "split"), ("frozen", "frozen")):
    config.model.bn_mode = base
    assert target_statistics.round_config(config).model.bn_mode == rounds
  # 'split' by hand, where nothing sets target statistics, is refused.
  other = adaptsegnet_cfg.get_config("tiny")
  other.model.bn_mode = "split"
  problems = segmentation.config_problems(other, None)
  assert any("bn_mode='split' needs target statistics" in p
             for p in problems)
  other.model.bn_mode = "source"
  assert not any("bn_mode" in p
                 for p in segmentation.config_problems(other, None))


@pytest.mark.parametrize("variant,expected", [
    ("", True), ("adapted_base", False), ("adapted_base,target_bn", True),
    ("target_bn,adapted_base", True), ("cbst", False), ("paper", False),
    ("cbst,adapted_base", False)])
def test_which_presets_reestimate_target_statistics(variant, expected):
  # TPLD from source-only re-estimates them (chosen on the development
  # shift); from an AdaptSegNet base it keeps one set (also chosen there),
  # unless target_bn is named, in either order.
  config = tpld_cfg.get_config(variant)
  assert config.self_training.target_bn_stats is expected
