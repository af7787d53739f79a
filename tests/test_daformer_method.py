"""DAFormer / MIC as registered methods (jaxda.methods.daformer.ema_*).

The step on a two-layer segmenter (compiles in seconds): it jits, trains,
and its teacher follows the EMA recursion of a NumPy reference; the debug
grid draws; rare-class source batches are deterministic in (seed, step) and
favour rare classes; the CLI's ``tiny`` variant runs end to end in this
process and resumes with its teacher.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import inprocess_cli
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import daformer as daformer_config
from jaxda import methods
from jaxda.methods import base
from jaxda.methods.daformer import debug_grid
from jaxda.methods.daformer import ema_driver
from jaxda.methods.daformer import ema_step
from jaxda.methods.daformer import rare_class
from jaxda.methods.daformer import rare_class_batches
from jaxda.train import exceptions

NUM_CLASSES = 4
B, H, W = 2, 16, 16


class _TinySegmenter(nn.Module):
  """conv-BN-ReLU-conv: the interface of the registry's segmenters."""
  num_classes: int = NUM_CLASSES
  width: int = 4
  depth: int = 1  # conv-BN-ReLU layers

  @nn.compact
  def __call__(self, x, *, train_bn: bool = False):
    for _ in range(self.depth):
      x = nn.Conv(self.width, (3, 3))(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train_bn,
                               momentum=0.9)(x))
    return {"main": nn.Conv(self.num_classes, (1, 1))(x)}


def _config(variant="tiny,mic", **daformer):
  c = daformer_config.get_config(variant)
  c.data.height, c.data.width = H, W
  c.daformer.ema_alpha = 0.6  # reached at step 3: warm-up and cap both run
  c.daformer.pseudo_threshold = 0.3  # some confident pixels at init
  for k, v in daformer.items():
    c.daformer[k] = v
  return c


def _batch(seed=0, size=H):
  rng = np.random.default_rng(seed)
  shape = (B, size, size)
  label = rng.integers(0, NUM_CLASSES, shape).astype(np.int32)
  label[:, :2] = 255
  return {"source": {"image": rng.normal(size=shape + (3,)).astype(np.float32),
                     "label": label},
          "target": {"image": rng.normal(size=shape + (3,)).astype(np.float32)}}


def _setup(per_loss=True, size=H, **segmenter):
  """``(config, models, tx, state)`` of a MIC step on the tiny segmenter
  at ``size``² (no colour jitter / blur: 3.5 s less to compile)."""
  config = _config(color_jitter_strength=0.0, blur=False,
                   per_loss_backward=per_loss)
  config.data.height = config.data.width = size
  models = base.Models(_TinySegmenter(**segmenter))
  variables = jax.jit(models.segmenter.init)(jax.random.key(0),
                                             jnp.zeros((1, size, size, 3)))
  tx = optax.adam(1e-2)
  state = ema_driver.TeacherTrainState.create(
      params=variables["params"], batch_stats=variables["batch_stats"],
      tx=tx)
  return config, models, tx, state.replace(
      teacher=jax.tree.map(jnp.copy, state.params))


@pytest.fixture(scope="module")
def tiny_run():
  """A jitted MIC step on the tiny segmenter and four steps of it (the
  debug-grid test runs them)."""
  config, models, tx, state = _setup()
  step = jax.jit(ema_step.make_step(models, config, tx))
  history = [(jax.device_get(state.params), jax.device_get(state.teacher))]
  metrics = []
  for i in range(4):
    state, m = step(state, _batch(i), jax.random.key(i))
    metrics.append(jax.device_get(m))
    history.append((jax.device_get(state.params),
                    jax.device_get(state.teacher)))
  return {"config": config, "models": models, "state": state,
          "history": history, "metrics": metrics}


def test_step_trains_and_reports_every_term(tiny_run):
  m = tiny_run["metrics"]
  for key in ("loss", "ce_main", "mix_ce_main", "mask_ce_main",
              "pseudo_weight", "teacher_confidence", "grad_norm"):
    assert all(np.isfinite(x[key]) for x in m), key
  assert all(0.0 <= x["pseudo_weight"] <= 1.0 for x in m)
  assert any(x["pseudo_weight"] > 0 for x in m)  # the target terms train
  np.testing.assert_allclose(
      [x["loss"] for x in m],
      [x["ce_main"] + x["mix_ce_main"] + x["mask_ce_main"] for x in m],
      rtol=1e-5)
  assert int(tiny_run["state"].step) == 4
  first, last = tiny_run["history"][0][0], tiny_run["history"][-1][0]
  assert not np.allclose(first["Conv_0"]["kernel"], last["Conv_0"]["kernel"])


def test_teacher_follows_the_ema_of_a_numpy_reference(tiny_run):
  alpha = tiny_run["config"].daformer.ema_alpha
  history = tiny_run["history"]
  teacher = jax.tree.map(np.asarray, history[0][0])  # a copy at step 0
  np.testing.assert_array_equal(jax.tree.leaves(history[0][1])[0],
                                jax.tree.leaves(teacher)[0])
  for t in range(1, len(history)):
    a = min(1.0 - 1.0 / (t + 1.0), alpha)  # 0.5, then capped at 0.6
    student = jax.tree.map(np.asarray, history[t][0])
    teacher = jax.tree.map(lambda te, s: a * te + (1.0 - a) * s, teacher,
                           student)
    for got, want in zip(jax.tree.leaves(history[t][1]),
                         jax.tree.leaves(teacher)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_per_loss_backward_equals_the_summed_loss_in_less_memory():
  """One backward per loss (the default) gives the summed loss's update
  (the same gradients, statistics chained through the passes) while the
  compiled step's scratch memory drops: the source, mixed and masked
  passes' activations are not all alive at one backward."""
  size = 32  # 8 layers of 16 channels: activations dominate the scratch
  batch = _batch(7, size)
  temp, out = {}, {}
  for per_loss in (True, False):
    config, models, tx, state = _setup(per_loss, size, width=16, depth=8)
    step = jax.jit(ema_step.make_step(models, config, tx))
    compiled = step.lower(state, batch, jax.random.key(7)).compile()
    temp[per_loss] = compiled.memory_analysis().temp_size_in_bytes
    out[per_loss] = jax.device_get(compiled(state, batch, jax.random.key(7)))
  (a, ma), (b, mb) = out[True], out[False]
  assert mb["pseudo_weight"] > 0  # the target passes train
  for key in ("loss", "ce_main", "mix_ce_main", "mask_ce_main", "grad_norm"):
    np.testing.assert_allclose(ma[key], mb[key], rtol=1e-5, err_msg=key)
  for got, want in zip(jax.tree.leaves((a.params, a.batch_stats, a.teacher)),
                       jax.tree.leaves((b.params, b.batch_stats, b.teacher))):
    np.testing.assert_allclose(got, want, rtol=1e-5,
                               atol=1e-6 * float(np.max(np.abs(want))))
  # Three passes alive at once -> one: about 1/3 (measured 0.35).
  assert temp[True] < 0.6 * temp[False], temp


def test_debug_grid_draws(tiny_run, tmp_path):
  """The grid of a DAFormer batch: ClassMix, jitter and blur under jit."""
  config = _config("tiny", color_jitter_skip_prob=0.0)  # always jitter
  fn = jax.jit(debug_grid.make_debug_fn(tiny_run["models"], config))
  batch = _batch(9)
  out = jax.device_get(fn(tiny_run["state"], batch, jax.random.key(9)))
  assert out["mixed_image"].shape == (B, H, W, 3)
  mask = out["mix_mask"]
  assert set(np.unique(mask)) == {0.0, 1.0}  # some pixels pasted
  source = np.where(mask[..., None] > 0, batch["source"]["image"],
                    batch["target"]["image"])
  assert not np.allclose(out["mixed_image"], source, atol=1e-3)  # jittered
  path = debug_grid.save_grid(
      str(tmp_path / "grid.png"), out, mode="unit",
      class_names=tuple(f"c{i}" for i in range(NUM_CLASSES)), title="t")
  assert os.path.getsize(path) > 1000
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3))
  for mode in ("unit", "imagenet", "caffe_bgr"):
    from jaxda.data import pipeline  # pylint: disable=g-import-not-at-top
    back = debug_grid.to_uint8(pipeline.normalize(images, mode), mode)
    np.testing.assert_allclose(back, images, atol=1)


def test_optimizer_groups():
  config = daformer_config.get_config("tiny")
  params = {"backbone": {"conv1": {"kernel": jnp.zeros(2)},
                         "bn1": {"scale": jnp.zeros(2)}},
            "aspp_main": {"branch_0": {"kernel": jnp.zeros(2)}}}
  _, labels_fn = ema_driver.make_tx(config)
  labels = labels_fn(params)
  assert labels["backbone"]["conv1"]["kernel"] == "default"
  assert labels["backbone"]["bn1"]["scale"] == ema_driver.FROZEN
  assert labels["aspp_main"]["branch_0"]["kernel"] == "head"
  config.daformer.network = "mit_b0"
  mit_params = {"encoder": {"norm1": {"scale": 0}, "block1_0": {
      "attn": {"q": {"kernel": 0}}}}, "head": {"fuse": {"bn": {"scale": 0}}}}
  labels = ema_driver.make_tx(config)[1](mit_params)
  assert labels == {"encoder": {"norm1": {"scale": "no_decay"}, "block1_0": {
      "attn": {"q": {"kernel": "default"}}}}, "head": {"fuse": {"bn": {
          "scale": "head"}}}}


def test_rare_class_source_batches():
  rng = np.random.default_rng(0)
  labels = np.zeros((40, 8, 8), np.uint8)
  labels[:4, :4, :4] = 1  # class 1 is rare: 4 images of 40
  images = rng.integers(0, 256, (40, 8, 8, 3)).astype(np.uint8)
  domain = type("D", (), {"images": images, "labels": labels})
  config = daformer_config.get_config("tiny")
  config.daformer.rcs = True
  config.daformer.rcs_min_pixels = 8
  config.data.crop_height = config.data.crop_width = 4
  stats = rare_class.rare_class_stats(
      rare_class_batches.class_counts(labels, 2), 0.01, 8)
  make = lambda start: rare_class_batches.source_batches(
      domain, stats, config, batch_size=8, seed=3, start_step=start)
  run = make(0)
  batches = [next(run) for _ in range(20)]
  resumed = next(make(5))
  for k in ("image", "label", "index"):
    np.testing.assert_array_equal(resumed[k], batches[5][k])
  idx = np.concatenate([b["index"] for b in batches])
  assert np.mean(idx < 4) > 0.4  # uniform sampling: 0.1
  # Crops of the rare images hold the class (> 8 * 0.5 pixels) unless all
  # 10 checked crops failed (p ~ 0.02 here; then the 11th is kept).
  held = [np.sum(lab == 1) > 4 for b in batches
          for i, lab in zip(b["index"], b["label"]) if i < 4]
  assert all(b["image"].shape == (8, 4, 4, 3) for b in batches)
  assert np.mean(held) > 0.9  # a random crop: 0.32


def test_config_errors_are_one_line():
  problems = ema_driver._mic_problems(_config("tiny", mask_lambda=0.0))
  assert any("mask_lambda" in p for p in problems)
  c = _config("tiny", hrda=True, network="bogus")
  c.source.height = 8
  problems = ema_driver._daformer_problems(c)
  # 16x16 crops: HRDA's 8x8 detail crop is off DeepLab's 16-pixel grid.
  assert any("hrda_detail_crop" in p for p in problems)
  assert any("network" in p for p in problems)
  assert any("one size" in p for p in problems)
  assert all("\n" not in p for p in problems)
  assert daformer_config.get_config("paper,hrda").daformer.hrda
  assert methods.get_method("daformer").driver is not None
  assert methods.get_method("mic").task == "segmentation"
  with pytest.raises(exceptions.ConfigError, match="network"):
    ema_driver.train_and_evaluate(c, "/nonexistent", methods.METHODS["mic"])


def test_cli_tiny_runs_and_resumes(tmp_path, shared_data_cache):
  workdir = str(tmp_path / "run")
  # One LR schedule for both runs: the resumed run's step is then the same
  # program, read from the test session's compilation cache.
  args = ["--config=experiments/configs/daformer.py:tiny",
          f"--workdir={workdir}", "--config.daformer.debug_every=-1",
          "--config.optim.schedule_steps=6",
          # No jitter / blur: 2 s less to compile (tiny_run covers them).
          "--config.daformer.color_jitter_strength=0",
          "--config.daformer.blur=False",
          f"--config.source.data_dir={shared_data_cache}",
          f"--config.target.data_dir={shared_data_cache}"]
  proc = inprocess_cli.run("daformer", *args)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "target mIoU" in proc.stdout
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["method"] == "daformer" and summary["steps"] == 4
  assert 0.0 <= summary["target"]["miou"] <= 1.0
  ckpt = os.path.join(workdir, "checkpoints", "4")
  assert any("teacher" in open(os.path.join(root, f), errors="ignore").read()
             for root, _, files in os.walk(ckpt) for f in files
             if "METADATA" in f.upper())
  proc = inprocess_cli.run("daformer", *args, "--config.num_steps=6")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "Resuming from checkpoint step 4" in proc.stdout
  lines = [json.loads(l) for l in open(os.path.join(workdir,
                                                    "metrics.jsonl"))]
  logged = sorted({l["step"] for l in lines if "train/pseudo_weight" in l})
  assert logged == [2, 4, 6]
