"""GAM / DAM: activation matching math, taps, step, and the CLI end to end.

NumPy references are written here (float64); inputs are random with
per-channel offsets and scales so that a wrong axis or a swapped statistic
shows.
"""

import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import inprocess_cli
import pytest

from experiments.configs import gam as gam_cfg
from jaxda.methods.gam import matching as am
from jaxda import models
from jaxda import optim
from jaxda import parallel
from jaxda import state as state_lib
from jaxda.methods import base
from jaxda.methods.gam import activation_step as gam_method
from jaxda.methods.gam import activation_discriminator
from jaxda.methods.gam import taps as activation_taps

NUM_CLASSES = 5
H, W = 32, 64
EPS = am.EPSILON


def _random_acts(rng, shape):
  """Activations with a different mean and scale per channel."""
  c = shape[-1]
  mean = rng.normal(0.0, 3.0, c)
  scale = rng.uniform(0.2, 4.0, c)
  return (rng.normal(size=shape) * scale + mean).astype(np.float32)


def np_stats(x, mask=None):
  x = np.asarray(x, np.float64)
  if mask is not None:
    x = x[np.asarray(mask, bool)]
  flat = x.reshape(-1, x.shape[-1])
  return flat.mean(0), flat.var(0)


def np_match(x, t_mean, t_var, s_mean, s_var):
  x = np.asarray(x, np.float64)
  return (x - t_mean) / np.sqrt(t_var + EPS) * np.sqrt(s_var + EPS) + s_mean


# --------------------------------------------------------------------------
# Pure math
# --------------------------------------------------------------------------


def test_gaussian_match_gives_source_statistics_on_a_pytree():
  rng = np.random.default_rng(0)
  acts = {"conv": _random_acts(rng, (4, 6, 7, 5)),
          "fc": _random_acts(rng, (64, 3))}
  source = {k: am.ChannelStats(
      jnp.asarray(rng.normal(0, 2, v.shape[-1]), jnp.float32),
      jnp.asarray(rng.uniform(0.1, 9.0, v.shape[-1]), jnp.float32))
            for k, v in acts.items()}
  batch = am.channel_stats(jax.tree.map(jnp.asarray, acts))
  matched = am.gaussian_match(jax.tree.map(jnp.asarray, acts), batch, source)
  for k, x in acts.items():
    m, v = np_stats(x)
    np.testing.assert_allclose(batch[k].mean, m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch[k].var, v, rtol=1e-4)
    ref = np_match(x, m, v, np.asarray(source[k].mean),
                   np.asarray(source[k].var))
    chex.assert_shape(matched[k], x.shape)
    np.testing.assert_allclose(matched[k], ref, rtol=1e-4, atol=1e-4)
    # The point of the matching: source per-channel mean and std.
    got_m, got_v = np_stats(matched[k])
    np.testing.assert_allclose(got_m, source[k].mean, atol=1e-4)
    np.testing.assert_allclose(np.sqrt(got_v), np.sqrt(source[k].var),
                               rtol=1e-3)


def test_gaussian_match_constant_channel_maps_to_source_mean():
  x = np.ones((3, 4, 4, 2), np.float32) * np.array([2.5, -1.0], np.float32)
  src = am.ChannelStats(jnp.array([0.3, 7.0]), jnp.array([4.0, 0.5]))
  out = am.gaussian_match(jnp.asarray(x), am.channel_stats(jnp.asarray(x)),
                          src)
  chex.assert_tree_all_finite(out)
  np.testing.assert_allclose(out, np.broadcast_to([0.3, 7.0], x.shape),
                             atol=1e-4)


def test_masked_moments_accumulate_to_the_statistics_of_the_union():
  rng = np.random.default_rng(1)
  a = _random_acts(rng, (5, 3, 4, 6))
  b = _random_acts(rng, (5, 3, 4, 6))
  mask_b = np.array([1, 1, 0, 1, 0], bool)  # padding of a last batch
  total = am.add_moments(am.moments(jnp.asarray(a)),
                         am.moments(jnp.asarray(b), jnp.asarray(mask_b)))
  stats = am.stats_from_moments(total)
  m, v = np_stats(np.concatenate([a, b[mask_b]]))
  np.testing.assert_allclose(stats.mean, m, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats.var, v, rtol=1e-3)
  masked = am.channel_stats(jnp.asarray(b), jnp.asarray(mask_b))
  m, v = np_stats(b, mask_b)
  np.testing.assert_allclose(masked.mean, m, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(masked.var, v, rtol=1e-3)


def test_stats_gap_and_ema_against_numpy():
  rng = np.random.default_rng(2)
  t = am.ChannelStats(jnp.asarray(rng.normal(size=4), jnp.float32),
                      jnp.asarray(rng.uniform(0.1, 3, 4), jnp.float32))
  s = am.ChannelStats(jnp.asarray(rng.normal(size=4), jnp.float32),
                      jnp.asarray(rng.uniform(0.1, 3, 4), jnp.float32))
  gap = am.stats_gap({"l": t}, {"l": s})["l"]
  sd_s = np.sqrt(np.asarray(s.var, np.float64) + EPS)
  sd_t = np.sqrt(np.asarray(t.var, np.float64) + EPS)
  np.testing.assert_allclose(
      gap["mean_gap"], np.mean(np.abs(np.asarray(t.mean) - s.mean) / sd_s),
      rtol=1e-5)
  np.testing.assert_allclose(gap["std_gap"],
                             np.mean(np.abs(sd_t - sd_s) / sd_s), rtol=1e-5)
  assert float(am.stats_gap(s, s)["std_gap"]) == 0.0
  ema = am.ema_stats(t, s, 0.9)
  np.testing.assert_allclose(ema.mean, 0.9 * np.asarray(t.mean)
                             + 0.1 * np.asarray(s.mean), rtol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean_per_variable"])
def test_weight_drift_value_and_gradient(reduction):
  rng = np.random.default_rng(3)
  shapes = {"a": {"kernel": (3, 4)}, "b": (5,)}
  src = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                     is_leaf=lambda x: isinstance(x, tuple))
  tgt = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(
      np.float32), src)
  diffs = [np.asarray(t, np.float64) - s for t, s in
           zip(jax.tree.leaves(tgt), jax.tree.leaves(src))]
  if reduction == "sum":
    ref = sum(float(np.sum(d**2)) for d in diffs)
  else:
    ref = sum(float(np.mean(d**2)) for d in diffs)
  value = am.weight_drift(tgt, src, reduction=reduction)
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  g_t, g_s = jax.grad(
      lambda t, s: am.weight_drift(t, s, reduction=reduction),
      argnums=(0, 1))(tgt, src)
  for g, d in zip(jax.tree.leaves(g_t), diffs):
    scale = 1.0 if reduction == "sum" else 1.0 / d.size
    np.testing.assert_allclose(g, 2.0 * scale * d, rtol=1e-5, atol=1e-6)
  # The source model is frozen: no gradient reaches it.
  for g in jax.tree.leaves(g_s):
    assert not np.any(np.asarray(g))
  assert float(am.weight_drift(src, src)) == 0.0
  with pytest.raises(ValueError, match="reduction"):
    am.weight_drift(tgt, src, reduction="l1")


# --------------------------------------------------------------------------
# Model side: taps and discriminators
# --------------------------------------------------------------------------

LAYERS = ("backbone/layer1", "backbone/layer2", "backbone/layer4",
          "aspp_main")


def _taps(matching=True, layers=LAYERS):
  seg = models.create_segmenter("deeplabv2_tiny", NUM_CLASSES)
  return activation_taps.ActivationTaps(seg, layers,
                                        gaussian_matching=matching)


def _with_stats(taps, variables, rng):
  """Random source/target statistics in the variables."""
  act = variables["batch_stats"][activation_taps.STATS_KEY]
  new = {}
  for k, v in act.items():
    c = v["source_mean"].shape
    new[k] = {"source_mean": jnp.asarray(rng.normal(size=c), jnp.float32),
              "source_var": jnp.asarray(rng.uniform(.5, 2, c), jnp.float32),
              "target_mean": jnp.asarray(rng.normal(size=c), jnp.float32),
              "target_var": jnp.asarray(rng.uniform(.5, 2, c), jnp.float32)}
  bs = dict(variables["batch_stats"], **{activation_taps.STATS_KEY: new})
  return dict(variables, batch_stats=bs)


def test_taps_shapes_running_matching_and_discriminator_shapes():
  taps = _taps()
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, H, W, 3)),
                  jnp.float32)
  variables = _with_stats(taps, jax.jit(taps.init)(jax.random.key(0), x),
                          np.random.default_rng(5))
  plain = _taps(matching=False)

  @jax.jit
  def run_all(variables, x):
    # One compilation for every forward this test compares.
    model_stats, _ = activation_taps.split_stats(variables["batch_stats"])
    return (taps.apply_with_taps(variables, x, match="running")[:2],
            taps.apply(variables, x)["main"],
            plain.apply(variables, x)["main"],
            plain.module.apply({"params": variables["params"],
                                "batch_stats": model_stats}, x)["main"])

  (outputs, t), applied, plain_out, module_out = run_all(variables, x)
  # Output stride 4 for layer1, 8 after it (ceil-mode pool: 32 -> 9 -> 5).
  expected = {"backbone_layer1": (2, 9, 17, 32),
              "backbone_layer2": (2, 5, 9, 64),
              "backbone_layer4": (2, 5, 9, 256),
              "aspp_main": (2, 5, 9, NUM_CLASSES)}
  assert {k: v.shape for k, v in t["matched"].items()} == expected
  act = variables["batch_stats"][activation_taps.STATS_KEY]
  for k in expected:
    s = act[k]
    ref = np_match(t["raw"][k], np.asarray(s["target_mean"]),
                   np.asarray(s["target_var"]), np.asarray(s["source_mean"]),
                   np.asarray(s["source_var"]))
    np.testing.assert_allclose(t["matched"][k], ref, rtol=1e-4, atol=1e-4)
  # The logits are the matched aspp_main output, and `apply` (what
  # evaluation calls) gives the same.
  np.testing.assert_allclose(outputs["main"], t["matched"]["aspp_main"],
                             rtol=1e-6)
  np.testing.assert_allclose(applied, outputs["main"], rtol=1e-6)
  # Without matching the wrapper is the plain segmenter.
  np.testing.assert_allclose(plain_out, module_out, rtol=1e-6)
  assert not np.allclose(plain_out, applied, atol=1e-3)
  disc = activation_discriminator.ActivationDiscriminator(features=(8,))
  for k, a in t["matched"].items():
    p = disc.init(jax.random.key(1), a)
    chex.assert_shape(disc.apply(p, a), a.shape[:3] + (1,))
  vec = jnp.ones((6, 20))
  chex.assert_shape(disc.apply(disc.init(jax.random.key(2), vec), vec),
                    (6, 1))
  with pytest.raises(ValueError, match="never called"):
    jax.eval_shape(_taps(layers=("backbone/layer9",)).init,
                   jax.random.key(0), x)


# --------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------


def _gam_setup(variant="tiny"):
  config = gam_cfg.get_config(variant)
  taps = _taps(config.gam.gaussian_matching, tuple(config.gam.layers))
  disc = (activation_discriminator.ActivationDiscriminator(features=(8,))
          if config.gam.discriminators else None)
  tx, _ = optim.make_segmenter_tx(
      learning_rate=0.05, schedule_steps=10,
      head_regexes=(models.head_param_regex,),
      frozen_regexes=(models.batchnorm_param_regex,), weight_decay=0.0)
  disc_tx = optim.make_discriminator_tx(learning_rate=1e-3, schedule_steps=10)
  x = jnp.zeros((1, H, W, 3))
  variables = _with_stats(taps, jax.jit(taps.init)(jax.random.key(0), x),
                          np.random.default_rng(6))
  _, t, _ = jax.eval_shape(functools.partial(taps.apply_with_taps,
                                             match="none"), variables, x)
  disc_params = ({k: disc.init(jax.random.key(i), jnp.zeros(a.shape))["params"]
                  for i, (k, a) in enumerate(t["raw"].items())}
                 if disc else {})
  model_stats, _ = activation_taps.split_stats(variables["batch_stats"])
  state = state_lib.FrozenSourceTrainState.create(
      params=variables["params"], batch_stats=variables["batch_stats"],
      tx=tx, disc_params=disc_params, disc_tx=disc_tx).replace(
          source=jax.tree.map(jnp.copy, {"params": variables["params"],
                                         "batch_stats": model_stats}))
  step = gam_method.make_step(base.Models(taps, disc), config, tx,
                                  disc_tx)
  return state, step


def _batch(seed):
  rng = np.random.default_rng(seed)
  def dom(shift):
    labels = rng.integers(0, NUM_CLASSES, (8, H, W)).astype(np.int32)
    return {"image": (rng.normal(size=(8, H, W, 3)) + shift).astype(
        np.float32), "label": labels}
  return {"source": dom(0.0), "target": dom(0.7)}


def test_step_keeps_source_frozen_and_trains_the_rest():
  state, step = _gam_setup("tiny")
  before = jax.device_get(state)
  mesh = parallel.make_mesh(1)
  step_jit = parallel.jit_step(chex.assert_max_traces(n=1)(step), mesh)
  s = parallel.replicate(jax.tree.map(jnp.copy, state), mesh)
  for i in range(2):
    s, metrics = step_jit(s, parallel.shard_batch(_batch(i), mesh),
                          jax.random.key(0))
  chex.clear_trace_counter()
  s, metrics = parallel.to_host(s), parallel.to_host(metrics)
  chex.assert_tree_all_finite(metrics)
  assert int(s.step) == 2
  # The frozen source model is bit-identical after training steps.
  for a, b in zip(jax.tree.leaves(before.source), jax.tree.leaves(s.source)):
    np.testing.assert_array_equal(a, b)
  # Running target statistics moved towards the (shifted) target batches.
  act_before = before.batch_stats[activation_taps.STATS_KEY]
  act_after = s.batch_stats[activation_taps.STATS_KEY]
  assert not np.allclose(act_before["backbone_layer2"]["target_mean"],
                         act_after["backbone_layer2"]["target_mean"])
  np.testing.assert_array_equal(act_before["aspp_main"]["source_var"],
                                act_after["aspp_main"]["source_var"])
  moved = [not np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(before.params), jax.tree.leaves(s.params))]
  assert any(moved)
  assert metrics["drift"] > 0.0
  for k in act_after:
    assert not np.array_equal(before.disc_params[k]["conv0"]["kernel"],
                              s.disc_params[k]["conv0"]["kernel"])
    assert 0.0 <= metrics[f"disc_acc_{k}"] <= 1.0


# --------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------


# Slow (~42 s on the CI machine): the GAM driver's end-to-end path (base
# model, adaptation, activation report) runs in CI through the cheaper
# digits run (tests/test_gam_digits.py); the segmentation step is tested
# in-process above.
@pytest.mark.slow
def test_cli_tiny_end_to_end(tmp_path, shared_data_cache):
  # The CLI in this process (one device, as a CPU user gets).
  workdir = str(tmp_path / "gam")
  cache = shared_data_cache
  proc = inprocess_cli.run("gam", "--config=experiments/configs/gam.py:tiny",
                           f"--config.source.data_dir={cache}",
                           f"--config.target.data_dir={cache}",
                           f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "activation statistics" in proc.stdout
  assert "target mIoU" in proc.stdout
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["method"] == "gam" and summary["steps"] == 4
  report = summary["activation_report"]
  keys = ["backbone_layer2", "aspp_main"]  # the tiny variant's layers
  assert list(report["before"]) == keys
  assert set(report["after"]["aspp_main"]) == {
      "mean_gap", "std_gap", "mean_gap_raw", "std_gap_raw"}
  assert sorted(report["discriminator_accuracy"]) == sorted(keys)
  assert os.path.getsize(summary["activation_picture"]) > 1000
  assert os.path.exists(os.path.join(workdir, "base_source_only",
                                     "summary.json"))
  assert 0.0 <= summary["target"]["miou"] <= 1.0
