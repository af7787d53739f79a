"""TADA / DANN math and steps against independent NumPy references."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import classification_common
from jaxda.methods import tada_attention as attention
from jaxda import models as models_lib
from jaxda import optim
from jaxda import state as state_lib
from jaxda.methods import classification_steps as classification
from jaxda.methods import dann
from jaxda.methods import tada

LN2 = math.log(2.0)


def _np_binary_entropy(z):
  z = np.asarray(z, np.float64)
  p = 1.0 / (1.0 + np.exp(-z))
  p = np.clip(p, 1e-300, 1.0)
  q = np.clip(1.0 - p, 1e-300, 1.0)
  return -(p * np.log(p) + q * np.log(q))


def _np_softmax_entropy(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
  return -(p * np.log(np.clip(p, 1e-300, None))).sum(-1)


def test_binary_entropy_matches_reference_and_edges():
  rng = np.random.default_rng(0)
  z = rng.normal(0, 3, (5, 7)).astype(np.float32)
  np.testing.assert_allclose(attention.binary_entropy_from_logits(z),
                             _np_binary_entropy(z), rtol=1e-5, atol=1e-6)
  edges = attention.binary_entropy_from_logits(
      jnp.array([0.0, 80.0, -80.0, 1e4]))
  np.testing.assert_allclose(edges, [LN2, 0.0, 0.0, 0.0], atol=1e-6)
  grads = jax.grad(lambda x: attention.binary_entropy_from_logits(x).sum())(
      jnp.array([0.0, 50.0, -50.0]))
  assert np.all(np.isfinite(grads))


def test_local_attention_forms_and_range():
  rng = np.random.default_rng(1)
  z = rng.normal(0, 4, (3, 49)).astype(np.float32)
  ref_h = _np_binary_entropy(z)
  w = attention.local_attention(z, "1-H")
  chex.assert_shape(w, (3, 49))
  np.testing.assert_allclose(w, 1.0 - ref_h, rtol=1e-5, atol=1e-6)
  assert float(w.min()) >= 1.0 - LN2 - 1e-6 and float(w.max()) <= 1.0 + 1e-6
  # A confused discriminator (z = 0) gives the smallest 1-H weight.
  np.testing.assert_allclose(attention.local_attention(jnp.zeros(2)),
                             1.0 - LN2, rtol=1e-6)
  np.testing.assert_allclose(attention.local_attention(z, "H"), ref_h,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(attention.local_attention(z, "none"), 0.0)
  with pytest.raises(ValueError, match="form"):
    attention.local_attention(z, "1+H")


def test_residual_attend_is_one_plus_w_times_f():
  rng = np.random.default_rng(2)
  f = rng.normal(size=(2, 6, 5)).astype(np.float32)
  w = rng.uniform(0.3, 1.0, (2, 6)).astype(np.float32)
  out = attention.residual_attend(jnp.asarray(f), jnp.asarray(w))
  np.testing.assert_allclose(out, f * (1.0 + w[..., None]), rtol=1e-6)
  # Residual form: w = 0 keeps the features, it never erases them.
  np.testing.assert_array_equal(
      attention.residual_attend(jnp.asarray(f), jnp.zeros((2, 6))), f)
  with pytest.raises(ValueError, match="regions"):
    attention.residual_attend(jnp.asarray(f), jnp.zeros((2, 5)))


def test_global_attention_and_attentive_entropy():
  rng = np.random.default_rng(3)
  d_logits = rng.normal(0, 3, (8,)).astype(np.float32)
  logits = rng.normal(0, 2, (8, 10)).astype(np.float32)
  m = attention.global_attention(d_logits)
  np.testing.assert_allclose(m, 1.0 + _np_binary_entropy(d_logits),
                             rtol=1e-5)
  assert float(m.min()) >= 1.0 and float(m.max()) <= 1.0 + LN2 + 1e-6
  ref = np.mean((1.0 + _np_binary_entropy(d_logits))
                * _np_softmax_entropy(logits))
  np.testing.assert_allclose(attention.attentive_entropy(logits, m), ref,
                             rtol=1e-5)
  # Uniform predictions: ln C times the mean weight; confident ones: ~0.
  np.testing.assert_allclose(
      attention.attentive_entropy(jnp.zeros((4, 10)), 2.0 * jnp.ones(4)),
      2.0 * math.log(10.0), rtol=1e-6)
  confident = jnp.asarray(np.eye(10)[:4] * 200.0)
  assert float(attention.attentive_entropy(confident, jnp.ones(4))) < 1e-6


def test_region_discriminators_vmap_equals_per_position_loop():
  k, c, b = 5, 6, 3
  region = models_lib.RegionDiscriminators(hidden=(7,))
  x = jax.random.normal(jax.random.key(0), (b, k, c))
  params = region.init(jax.random.key(1), x)["params"]
  chex.assert_shape(params["regions"]["dense0"]["kernel"], (k, c, 7))
  out = region.apply({"params": params}, x)
  chex.assert_shape(out, (b, k))
  single = models_lib.DomainDiscriminator(hidden=(7,))
  loop = np.stack([
      single.apply({"params": jax.tree.map(lambda p, i=i: p[i],
                                           params["regions"])}, x[:, i])
      for i in range(k)], axis=1)
  np.testing.assert_allclose(out, loop, rtol=1e-5, atol=1e-6)
  # Independent parameter sets: split init keys give different regions.
  kernel = np.asarray(params["regions"]["dense0"]["kernel"])
  assert not np.allclose(kernel[0], kernel[1])


def test_grl_schedules_against_formulas():
  steps = np.array([0, 1, 37, 250, 999, 1000, 5000])
  total = 1000
  paper = [float(dann.grl_coefficient(s, total, schedule="paper"))
           for s in steps]
  p = np.clip(steps / total, 0, 1)
  np.testing.assert_allclose(paper, 2 / (1 + np.exp(-10 * p)) - 1,
                             rtol=1e-5, atol=1e-7)
  assert paper[0] == 0.0
  tllib = [float(dann.grl_coefficient(s, total, schedule="tllib",
                                      max_value=0.5)) for s in steps]
  np.testing.assert_allclose(tllib, 0.5 * (2 / (1 + np.exp(-steps / 1000))
                                           - 1), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(tllib[5] / 0.5, 0.4621, atol=1e-4)
  assert float(dann.grl_coefficient(3, total, schedule="constant",
                                    max_value=0.7)) == pytest.approx(0.7)
  with pytest.raises(ValueError):
    dann.grl_coefficient(0, total, schedule="linear")


def test_inv_lr_schedule():
  sched = optim.inv_schedule(0.01, 200, alpha=10.0, beta=0.75)
  for step in (0, 13, 100, 200, 400):
    p = min(step / 200, 1.0)
    np.testing.assert_allclose(float(sched(step)),
                               0.01 / (1 + 10 * p) ** 0.75, rtol=1e-6)


def _tiny_setup(method, **tada_overrides):
  config = classification_common.apply_variant(
      classification_common.get_base_config(), "tiny")
  config.method = method
  config.num_steps = 10
  for key, value in tada_overrides.items():
    config.tada[key] = value
  from jaxda.tasks import classification as classification_task  # pylint: disable=g-import-not-at-top
  from jaxda.methods import get_method  # pylint: disable=g-import-not-at-top
  built = classification_task.build_models(config, get_method(method), 10)
  params, stats, disc_params = classification_task.init_params(
      built["models"], config, jax.random.key(0), get_method(method))
  state = state_lib.TrainState.create(
      params=params, batch_stats=stats, tx=built["tx"],
      disc_params=disc_params, disc_tx=built["disc_tx"])
  return config, built, state


def _batch(seed=0, b=4):
  rng = np.random.default_rng(seed)
  return {
      "source": {"image": jnp.asarray(rng.uniform(-1, 1, (b, 28, 28, 3)),
                                      jnp.float32),
                 "label": jnp.asarray(rng.integers(0, 10, b), jnp.int32)},
      "target": {"image": jnp.asarray(rng.uniform(-1, 1, (b, 28, 28, 3)),
                                      jnp.float32)},
  }


def test_tada_without_attention_or_entropy_is_dann():
  batch = _batch()
  cfg_d, built_d, state_d = _tiny_setup("dann")
  cfg_t, built_t, state_t = _tiny_setup(
      "tada", local_attention_form="none", lambda_local=0.0,
      gamma_entropy=0.0)
  assert built_t["models"].region_discriminators is None
  # Advance a few steps so the GRL coefficient is non-zero.
  step_d = jax.jit(dann.make_step(built_d["models"], cfg_d, built_d["tx"],
                                  built_d["disc_tx"]))
  step_t = jax.jit(tada.make_step(built_t["models"], cfg_t, built_t["tx"],
                                  built_t["disc_tx"]))
  rng = jax.random.key(0)
  for _ in range(3):
    state_d, m_d = step_d(state_d, batch, rng)
    state_t, m_t = step_t(state_t, batch, rng)
  np.testing.assert_allclose(m_t["loss"], m_d["loss"], rtol=1e-5)
  assert float(m_d["grl_coeff"]) > 0
  chex.assert_trees_all_close(state_t.params, state_d.params, rtol=1e-5,
                              atol=1e-6)
  chex.assert_trees_all_close(state_t.disc_params, state_d.disc_params,
                              rtol=1e-5, atol=1e-6)


def test_tada_step_shapes_and_local_discriminators_learn():
  config, built, state = _tiny_setup("tada")
  models = built["models"]
  local = state.disc_params["local"]["regions"]
  # K = 49 region discriminators for 28x28 digits (7x7 map, like R50@224).
  chex.assert_shape(local["dense0"]["kernel"], (49, 64, 8))
  step = jax.jit(tada.make_step(models, config, built["tx"],
                                built["disc_tx"]))
  new_state, metrics = step(state, _batch(1), jax.random.key(0))
  chex.assert_tree_all_finite(metrics)
  assert 1.0 - LN2 - 1e-5 <= float(metrics["local_attention"]) <= 1.0
  assert 1.0 <= float(metrics["global_attention"]) <= 1.0 + LN2
  expected = (metrics["ce"] + 0.1 * metrics["entropy_loss"]
              + metrics["domain_loss"] + metrics["local_loss"])
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  # Every region discriminator gets its own update.
  delta = np.abs(np.asarray(new_state.disc_params["local"]["regions"]["out"]
                            ["bias"]) - np.asarray(local["out"]["bias"]))
  assert np.all(delta[:, 0] > 0)
  maps = tada.make_attention_fn(models, config)(new_state,
                                                _batch(2)["target"]["image"])
  chex.assert_shape(maps, (4, 7, 7))


def test_gradient_reversal_reaches_features_with_coefficient():
  """The network's gradient of the domain loss is -coeff times plain."""
  config, built, state = _tiny_setup("dann")
  models = built["models"]
  batch = _batch(3)
  d = classification.domain_labels(4, 4, 1)

  def domain_loss(params, reverse, coeff):
    f_s, _ = classification.extract_features(
        models, params, {}, batch["source"]["image"], bn_mode="source",
        labelled=True)
    f_t, _ = classification.extract_features(
        models, params, {}, batch["target"]["image"], bn_mode="source",
        labelled=False)
    z = classification.classify(models, params,
                                jnp.concatenate([f_s, f_t]))["bottleneck"]
    if reverse:
      from jaxda import ops  # pylint: disable=g-import-not-at-top
      z = ops.gradient_reversal(z, coeff)
    logits = models.discriminator.apply(
        {"params": state.disc_params["global"]}, z)
    from jaxda import losses  # pylint: disable=g-import-not-at-top
    return losses.bce_with_logits(logits, d)

  plain = jax.grad(domain_loss)(state.params, False, 0.0)
  reversed_ = jax.grad(domain_loss)(state.params, True, 0.4)
  chex.assert_trees_all_close(reversed_, jax.tree.map(lambda g: -0.4 * g,
                                                      plain), rtol=1e-5,
                              atol=1e-8)


def test_dann_discriminator_on_pooled_features():
  """``dann_features='pooled'``: D sees the flattened 7x7x64 conv map."""
  config = classification_common.apply_variant(
      classification_common.get_base_config(), "tiny")
  config.method = "dann"
  config.adversarial.dann_features = "pooled"
  from jaxda.tasks import classification as classification_task  # pylint: disable=g-import-not-at-top
  built = classification_task.build_models(config, dann.DANN, 10)
  params, stats, disc_params = classification_task.init_params(
      built["models"], config, jax.random.key(0), dann.DANN)
  chex.assert_shape(disc_params["global"]["dense0"]["kernel"],
                    (7 * 7 * 64, 16))
  state = state_lib.TrainState.create(
      params=params, batch_stats=stats, tx=built["tx"],
      disc_params=disc_params, disc_tx=built["disc_tx"])
  step = jax.jit(dann.make_step(built["models"], config, built["tx"],
                                built["disc_tx"]))
  _, metrics = step(state, _batch(4), jax.random.key(0))
  chex.assert_tree_all_finite(metrics)


def test_ablation_variants_set_only_their_switches():
  from experiments.configs import tada as tada_config  # pylint: disable=g-import-not-at-top
  full = tada_config.get_config()
  assert (full.tada.lambda_global, full.tada.global_attention) == (1.0, True)
  assert tada.uses_local(full)
  local = tada_config.get_config("local_only")
  assert local.tada.lambda_global == 0.0 and not local.tada.global_attention
  assert tada.uses_local(local)
  glob = tada_config.get_config("global_only")
  assert not tada.uses_local(glob) and glob.tada.lambda_global == 1.0
  ent = tada_config.get_config("entropy_only")
  assert not tada.uses_local(ent) and ent.tada.lambda_global == 0.0
  assert ent.tada.gamma_entropy == full.tada.gamma_entropy
  # Any position, with the shared presets; at most one ablation.
  assert (tada_config.get_config("tiny,local_only").to_dict()
          == tada_config.get_config("local_only,tiny").to_dict())
  with pytest.raises(ValueError, match="conflict") as e:
    tada_config.get_config("local_only,global_only")
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="unknown config variant"):
    tada_config.get_config("local")


def test_no_global_term_leaves_the_network_to_the_source_with_a_probe():
  """lambda_global = 0, no global attention, γ = 0, no local part: nothing
  from the target reaches the network (other target images, the same
  network update), while the global D still learns from them (a probe)."""
  cfg, built, state = _tiny_setup(
      "tada", local_attention_form="none", lambda_local=0.0,
      gamma_entropy=0.0, lambda_global=0.0, global_attention=False)
  step = jax.jit(tada.make_step(built["models"], cfg, built["tx"],
                                built["disc_tx"]))
  state = state.replace(step=jnp.asarray(5, state.step.dtype))  # coeff > 0
  batch, other = _batch(5), _batch(6)
  other = {"source": batch["source"], "target": other["target"]}
  rng = jax.random.key(0)
  new, metrics = step(state, batch, rng)
  new_other, _ = step(state, other, rng)
  assert float(metrics["grl_coeff"]) > 0
  assert float(metrics["global_attention"]) == 1.0
  chex.assert_trees_all_close(new.params, new_other.params, rtol=1e-6,
                              atol=1e-7)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       new.disc_params, new_other.disc_params)
  assert max(jax.tree.leaves(moved)) > 0


def test_local_disc_grad_scale_speeds_the_region_ds_not_the_features():
  """s = 4: each region D's (zero-initialised) output bias moves 4x as far
  on the first update; the network's update is unchanged."""
  batch, rng = _batch(7), jax.random.key(0)
  cfg, built, state = _tiny_setup("tada")
  state = state.replace(step=jnp.asarray(5, state.step.dtype))  # coeff > 0
  out = {}
  for s in (1.0, 4.0):
    cfg.tada.local_disc_grad_scale = s
    step = jax.jit(tada.make_step(built["models"], cfg, built["tx"],
                                  built["disc_tx"]))
    new, _ = step(state, batch, rng)
    bias = state.disc_params["local"]["regions"]["out"]["bias"]
    out[s] = (new.params, np.asarray(
        new.disc_params["local"]["regions"]["out"]["bias"] - bias))
  chex.assert_trees_all_close(out[4.0][0], out[1.0][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[4.0][1], 4.0 * out[1.0][1], rtol=1e-4,
                             atol=1e-7)
