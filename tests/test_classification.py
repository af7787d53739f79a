"""Classification stack: digits data on its real sources, models, evaluation,
and the shared run loop end to end (CLI and in-process)."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import inprocess_cli
import pytest

from experiments.configs import classification_common
from jaxda import methods
from jaxda.tasks import classification as classification_task
from jaxda import models as models_lib
from jaxda.train import loop as train_loop
from jaxda.data.embedded import digits
from jaxda.data import pipeline



@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("digits_cache"))


def test_digit_domains_from_packaged_data(cache_dir):
  sizes = {"mnist": (4000, 1000), "digits": (1297, 500),
           "mnist_m": (4000, 1000)}
  loaded = {}
  for name, (n_train, n_val) in sizes.items():
    for split, n in zip(("train", "val"), (n_train, n_val)):
      d = pipeline.load_domain(name, split=split, data_dir=cache_dir)
      chex.assert_shape(d.images, (n, 28, 28, 3))
      chex.assert_shape(d.labels, (n,))
      assert d.images.dtype == np.uint8 and d.labels.dtype == np.uint8
      assert set(np.unique(d.labels)) == set(range(10))
      assert d.class_names == tuple("0123456789")
      loaded[name, split] = d
  # Train and val are disjoint: no val image also occurs in train.
  for name in ("mnist", "digits"):
    train = {im.tobytes() for im in loaded[name, "train"].images}
    assert not any(im.tobytes() in train
                   for im in loaded[name, "val"].images)
  # sklearn digits sit in MNIST's 20x20 box: a 4-pixel empty border.
  border = loaded["digits", "train"].images.copy()
  border[:, 4:24, 4:24] = 0
  assert border.max() == 0
  # MNIST-M reuses the MNIST digits (same labels) on colour photo patches.
  np.testing.assert_array_equal(loaded["mnist_m", "train"].labels,
                                loaded["mnist", "train"].labels)
  mm = loaded["mnist_m", "val"].images.astype(int)
  assert np.abs(mm[..., 0] - mm[..., 1]).mean() > 5  # Colour, not grey.
  # Cached, deterministic, prefix-consistent; other sizes are resized.
  again = pipeline.load_domain("mnist_m", split="val", data_dir=cache_dir,
                               num_images=10)
  np.testing.assert_array_equal(again.images,
                                loaded["mnist_m", "val"].images[:10])
  big = pipeline.load_domain("digits", split="val", data_dir=cache_dir,
                             height=32, width=40, num_images=3)
  chex.assert_shape(big.images, (3, 32, 40, 3))


def test_mnist_m_blend_is_abs_difference():
  rng = np.random.default_rng(0)
  digits_ = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
  colour = np.array([200, 30, 120], np.uint8)
  background = np.broadcast_to(colour, (40, 50, 3)).copy()
  out = digits.blend_onto_patches(digits_, np.random.default_rng(1),
                                  [background])
  expected = np.abs(colour.astype(int)[None, None, None]
                    - digits_.astype(int)[..., None])
  np.testing.assert_array_equal(out, expected.astype(np.uint8))


def test_pipeline_batches_image_labels():
  images = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3),
                                             dtype=np.uint8)
  labels = np.arange(5, dtype=np.uint8)
  batch = next(pipeline.train_batches(images, labels, batch_size=4, seed=0,
                                      flip=True))
  chex.assert_shape(batch["label"], (4,))
  np.testing.assert_array_equal(batch["label"], labels[batch["index"]])
  last = list(pipeline.eval_batches(images, labels, batch_size=4))[-1]
  np.testing.assert_array_equal(last["label"], [4, 255, 255, 255])
  with pytest.raises(ValueError, match="labels shape"):
    next(pipeline.train_batches(images, labels[:4], batch_size=2, seed=0))


@pytest.mark.parametrize("name,size,fmap", [
    ("small_cnn", 28, (7, 7, 64)), ("resnet_tiny", 64, (2, 2, 256)),
    ("resnet50", 224, (7, 7, 2048))])
def test_classifier_shapes(name, size, fmap):
  model = models_lib.create_classifier(name, 10, bottleneck_dim=32)
  x = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  out = jax.eval_shape(lambda v: model.apply(v, x), variables)
  chex.assert_shape(out["features"], (2,) + fmap)
  chex.assert_shape(out["bottleneck"], (2, 32))
  chex.assert_shape(out["logits"], (2, 10))
  # BatchNorm only in the ResNets.
  assert ("batch_stats" in variables) == name.startswith("resnet")


def test_summarize_confusion_and_masked_confusion():
  confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 4]])
  result = classification_task.summarize_confusion(confusion, "abc")
  assert result["accuracy"] == pytest.approx(7 / 10)
  assert result["per_class_accuracy"] == {"a": 0.75, "b": None,
                                          "c": pytest.approx(4 / 6)}
  assert result["mean_class_accuracy"] == pytest.approx((0.75 + 4 / 6) / 2)

  def predict(state, images):
    del state
    return jax.nn.one_hot(images[:, 0, 0, 0].astype(jnp.int32), 3)

  fn = classification_task.make_confusion_fn(predict, 3)
  images = jnp.zeros((4, 2, 2, 3)).at[:, 0, 0, 0].set(
      jnp.array([0, 2, 1, 1]))
  cm = fn(None, {"image": images, "label": jnp.array([0, 1, 1, 2]),
                 "mask": jnp.array([True, True, True, False])})
  np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 1], [0, 0, 0]])


def _tiny_config(method, cache_dir):
  config = classification_common.apply_variant(
      classification_common.get_base_config(), "tiny")
  config.method = method
  config.source.data_dir = cache_dir
  config.target.data_dir = cache_dir
  return config


@pytest.mark.parametrize("method", ["source_only_cls", "oracle_cls", "dann"])
def test_shared_loop_trains_classification(tmp_path, cache_dir, method):
  summary = methods.train_and_evaluate(_tiny_config(method, cache_dir),
                                       str(tmp_path))
  assert summary["method"] == method and summary["steps"] == 4
  target = summary["target"]
  assert 0.0 <= target["accuracy"] <= 1.0
  assert target["num_images"] == 16
  assert len(target["per_class_accuracy"]) == 10
  assert os.path.isdir(tmp_path / "checkpoints" / "4")
  for path in summary["files"]["pictures"].values():
    assert os.path.getsize(path) > 1000


def test_config_task_mismatch_is_a_config_error(cache_dir):
  config = _tiny_config("adaptsegnet", cache_dir)
  with pytest.raises(train_loop.ConfigError, match="classification method"):
    train_loop.validate_config(config, methods.get_method(config.method))


def test_tada_cli_end_to_end_and_resume(tmp_path, cache_dir):
  workdir = str(tmp_path / "run")
  # The CLI in this process (one device, as a CPU user gets).
  cmd = ["--config=experiments/configs/tada.py:tiny",
         f"--config.source.data_dir={cache_dir}",
         f"--config.target.data_dir={cache_dir}", f"--workdir={workdir}"]
  proc = inprocess_cli.run("tada", *cmd)
  assert proc.returncode == 0, proc.stderr
  assert "tada: target accuracy" in proc.stdout
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["config"]["task"] == "classification"
  pictures = summary["files"]["pictures"]
  assert os.path.getsize(pictures["local_attention"]) > 1000
  lines = [json.loads(l) for l in open(os.path.join(workdir,
                                                    "metrics.jsonl"))]
  logged = [l for l in lines if "train/local_attention" in l]
  assert [l["step"] for l in logged] == [2, 4]
  assert all(0.3 <= l["train/local_attention"] <= 1.0 for l in logged)
  proc = inprocess_cli.run("tada", *cmd, "--config.num_steps=6")
  assert proc.returncode == 0, proc.stderr
  assert "Resuming from checkpoint step 4" in proc.stdout
