"""Method steps: one step per method on random batches, sharded == single.

Uses the tiny model so every step compiles in seconds on CPU.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import adaptsegnet as adaptsegnet_cfg
from experiments.configs import advent as advent_cfg
from experiments.configs import source_only as source_only_cfg
from jaxda import models
from jaxda import optim
from jaxda import parallel
from jaxda import state as state_lib
from jaxda.methods import base
from jaxda.methods import get_method

NUM_CLASSES = 5
H, W = 32, 64


def _setup(config):
  method = get_method(config.method)
  seg = models.create_segmenter(config.model.name, NUM_CLASSES,
                                multi_level=config.model.multi_level)
  disc = (models.create_discriminator(8)
          if method.discriminator_inputs != "none" else None)
  tx, _ = optim.make_segmenter_tx(
      learning_rate=0.01, schedule_steps=10,
      head_regexes=(models.head_param_regex,),
      frozen_regexes=(models.batchnorm_param_regex,))
  disc_tx = optim.make_discriminator_tx(learning_rate=1e-3,
                                        schedule_steps=10) if disc else None
  def init():
    variables = seg.init(jax.random.key(0), jnp.zeros((1, H, W, 3)))
    disc_params = {}
    if disc:
      for i, level in enumerate(base.output_levels(config)):
        disc_params[level] = disc.init(
            jax.random.key(i + 1), jnp.zeros((1, H, W, NUM_CLASSES)))["params"]
    return state_lib.TrainState.create(
        params=variables["params"], batch_stats=variables["batch_stats"],
        tx=tx, disc_params=disc_params, disc_tx=disc_tx)

  # One compiled program instead of ~300 eager ones (each a small compile).
  state = jax.jit(init)()
  step = method.make_step(base.Models(seg, disc), config, tx, disc_tx)
  return state, step


def _batch(seed=0, b=8):
  rng = np.random.default_rng(seed)
  def dom():
    labels = rng.integers(0, NUM_CLASSES, (b, H, W)).astype(np.int32)
    labels[:, :2] = 255
    return {"image": rng.normal(size=(b, H, W, 3)).astype(np.float32),
            "label": labels}
  return {"source": dom(), "target": dom()}


def _one_step_single(step, state, batch):
  mesh = parallel.make_mesh(1)
  s, m = parallel.jit_step(step, mesh)(
      parallel.replicate(jax.tree.map(jnp.copy, state), mesh),
      parallel.shard_batch(batch, mesh), jax.random.key(0))
  return parallel.to_host(s), parallel.to_host(m)


def _assert_close_to_scale(a, b, rel=2e-3):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(float(np.max(np.abs(a))), 1e-6)
  assert float(np.max(np.abs(a - b))) <= rel * scale, (
      float(np.max(np.abs(a - b))), scale)


CONFIGS = {
    "source_only": lambda: source_only_cfg.get_config("tiny"),
    "oracle": lambda: _with_method(source_only_cfg.get_config("tiny"),
                                   "oracle"),
    "adaptsegnet": lambda: adaptsegnet_cfg.get_config("tiny"),
    "adaptsegnet_ls_single": lambda: adaptsegnet_cfg.get_config(
        "tiny,single_ls"),
    "adaptsegnet_bn_train": lambda: adaptsegnet_cfg.get_config(
        "tiny,faithful"),
    "advent": lambda: advent_cfg.get_config("tiny"),
    "minent": lambda: advent_cfg.get_config("tiny,minent"),
}


def _with_method(c, name):
  c.method = name
  return c


# Every config runs a step; sharded-vs-single is checked in CI on the
# supervised step. Every step is one global-semantics jit (GSPMD through
# `parallel.jit_step`, no shard_map), so the adversarial step's 8-device
# check is `slow`: its 8-device compile was 18 s of CI time. (MinEnt's and
# the other steps' 8-device compiles left CI before, for the same reason.)
CASES = [pytest.param(name, name == "source_only", id=name)
         for name in sorted(CONFIGS)] + [
             pytest.param("adaptsegnet", True, id="adaptsegnet-sharded",
                          marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,sharded", CASES)
def test_step_runs_and_sharded_equals_single_device(name, sharded):
  config = CONFIGS[name]()
  state, step = _setup(config)
  batch = _batch()
  results = []
  for n in ((1, 8) if sharded else (1,)):
    mesh = parallel.make_mesh(n)
    jitted = chex.assert_max_traces(n=1)(step)
    step_jit = parallel.jit_step(jitted, mesh)
    s = parallel.replicate(jax.tree.map(jnp.copy, state), mesh)
    s, metrics = step_jit(s, parallel.shard_batch(batch, mesh),
                          jax.random.key(0))
    if n == 1:  # A second step, on the single device only (see below).
      s, metrics = step_jit(s, parallel.shard_batch(_batch(1), mesh),
                            jax.random.key(0))
    chex.clear_trace_counter()
    results.append((parallel.to_host(s), parallel.to_host(metrics)))
  s1, m1 = results[0]
  assert int(s1.step) == 2
  chex.assert_tree_all_finite(m1)
  assert np.isfinite(m1["loss"]) and m1["loss"] > 0
  # Parameters moved.
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                       parallel.to_host(state.params), s1.params)
  assert max(jax.tree.leaves(moved)) > 0
  if len(results) == 2:
    # One step from the same state: 8 devices == 1 device. (Over several
    # steps float noise grows through the ill-conditioned BatchNorm of a
    # fresh net, so one step is the meaningful comparison.)
    s1, m1 = _one_step_single(step, state, batch)
    s8, m8 = results[1]
    # Summation order differs across devices. Gradients through BatchNorm of
    # a freshly initialised net (N(0, 0.01) convs, batch variance ~ eps) are
    # ill-conditioned, so momentum traces differ by float noise relative to
    # their scale: compare each leaf relative to its own magnitude.
    jax.tree.map(_assert_close_to_scale, s1, s8)
    jax.tree.map(_assert_close_to_scale, m1, m8)


def test_source_only_never_sees_target():
  """Target images of a source-only step cannot change anything."""
  config = source_only_cfg.get_config("tiny")
  config.model.bn_mode = "train"
  state, step = _setup(config)
  b1, b2 = _batch(0), _batch(0)
  b2["target"]["image"] = b2["target"]["image"] * 100 + 7
  s1, _ = jax.jit(step)(state, b1, jax.random.key(0))
  s2, _ = jax.jit(step)(state, b2, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, s1, s2)


# 'frozen' is `slow` (11 s of CI): frozen BatchNorm has no mutable
# statistics at all (test_models.test_frozen_bn_needs_no_mutable_and_keeps_
# stats), so no batch can change them.
@pytest.mark.parametrize("bn_mode,target_changes_stats", [
    ("train", True), ("source", False),
    pytest.param("frozen", False, marks=pytest.mark.slow)])
def test_bn_mode_target_statistics(bn_mode, target_changes_stats):
  config = adaptsegnet_cfg.get_config("tiny")
  config.model.bn_mode = bn_mode
  state, step = _setup(config)
  b1, b2 = _batch(0), _batch(0)
  b2["target"]["image"] = b2["target"]["image"] * 3 + 1
  s1, _ = jax.jit(step)(state, b1, jax.random.key(0))
  s2, _ = jax.jit(step)(state, b2, jax.random.key(0))
  diff = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(jnp.max(jnp.abs(a - b))), s1.batch_stats,
      s2.batch_stats)))
  assert (diff > 0) == target_changes_stats
  if bn_mode == "frozen":
    jax.tree.map(np.testing.assert_array_equal, s1.batch_stats,
                 state.batch_stats)


def test_running_statistics_carry_no_gradient():
  """A target pass that normalises with the statistics a source pass just
  updated (bn_mode 'source') differentiates as if they were constants,
  as PyTorch's in-place buffer update: the independent reference feeds
  them in from outside the differentiated function."""
  class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, *, train_bn=False):
      x = nn.BatchNorm(use_running_average=not train_bn)(nn.Conv(4, (3, 3))(x))
      return {"main": nn.Conv(NUM_CLASSES, (1, 1))(nn.relu(x))}

  seg = ConvBN()
  m = base.Models(seg)
  variables = jax.jit(seg.init)(jax.random.key(0), jnp.zeros((1, H, W, 3)))
  batch = _batch(4, b=2)
  xs, xt = batch["source"]["image"], batch["target"]["image"]

  def target_loss(params, stats):
    out, _ = base.forward(m, params, stats, xt, bn_mode="source",
                          labelled=False)
    return jnp.mean(out["main"] ** 2)

  def chained(params):
    _, stats = base.forward(m, params, variables["batch_stats"], xs,
                            bn_mode="source", labelled=True)
    return target_loss(params, stats)

  _, updated = jax.jit(lambda p, s: base.forward(
      m, p, s, xs, bn_mode="source", labelled=True))(
          variables["params"], variables["batch_stats"])
  got = jax.jit(jax.grad(chained))(variables["params"])
  want = jax.jit(jax.grad(target_loss))(variables["params"], updated)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7), got, want)


def test_adversarial_disc_gradient_does_not_reach_segmenter():
  """With λ_adv = 0 AdaptSegNet's segmenter update equals source-only's."""
  config = adaptsegnet_cfg.get_config("tiny")
  config.adversarial.lambda_adv_main = 0.0
  config.adversarial.lambda_adv_aux = 0.0
  state, step = _setup(config)
  so_config = source_only_cfg.get_config("tiny")
  so_state, so_step = _setup(so_config)
  batch = _batch(3)
  s_adv, m = jax.jit(step)(state, batch, jax.random.key(0))
  s_so, _ = jax.jit(so_step)(so_state, batch, jax.random.key(0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               s_adv.params, s_so.params)
  # ...while the discriminators did learn.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       state.disc_params, s_adv.disc_params)
  assert max(jax.tree.leaves(moved)) > 0
  assert 0.0 <= float(m["disc_acc_main"]) <= 1.0
