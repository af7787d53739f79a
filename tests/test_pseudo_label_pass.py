"""The self-training labelling pass runs the network once per image.

``self_training.make_pseudo_labels`` caches pass A's output-stride logits
and redoes only upsampling + softmax in pass B. The reference here is the
pass as it was before the cache: the full evaluation predictor
(``segmentation.make_predict_jit``: forward + upsample + softmax) run again
for the labels, on every image.
"""

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import tpld as tpld_cfg
from jaxda import methods
from jaxda import parallel
from jaxda.methods.self_training import densify, thresholds
from jaxda.methods.self_training import rounds as self_training
from jaxda.tasks import segmentation
from jaxda.tasks import splits
from jaxda.train import loop as train_loop
from jaxda.types import IGNORE_LABEL


def _config(data_dir):
  c = tpld_cfg.get_config("tiny,cbst")
  c.data.num_train_images = 6
  c.data.num_val_images = 2
  c.eval.batch_size = 4  # rounded up to the 8 simulated devices
  c.model.multi_level = False
  c.self_training.voting = True  # densify on top of CBST
  c.source.data_dir = data_dir
  c.target.data_dir = data_dir
  return c


def test_labelling_pass_forwards_once_and_matches_two_pass(tmp_path,
                                                           monkeypatch):
  run = train_loop.setup(_config(str(tmp_path / "cache")),
                         str(tmp_path / "run"), methods.get_method("cbst"))
  state = train_loop.create_state(run)
  # A fresh network predicts one class everywhere; random weights of a
  # larger scale give varied, partly confident predictions.
  leaves, treedef = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  state = state.replace(params=jax.tree.unflatten(treedef, [
      x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)]))
  st = run.config.self_training

  calls = []
  real_jit_inference = parallel.jit_inference

  def counting_jit_inference(fn, mesh):
    jitted = real_jit_inference(fn, mesh)

    def call(*args):
      calls.append(args[1].shape[0])
      return jitted(*args)

    return call

  monkeypatch.setattr(parallel, "jit_inference", counting_jit_inference)
  got = self_training.make_pseudo_labels(run, state, 0, 1, None)
  monkeypatch.setattr(parallel, "jit_inference", real_jit_inference)
  # One network call per eval batch (6 images, one padded batch of 8); the
  # two-pass form made two.
  bs = splits.eval_batch_size(run)
  assert calls == [bs] * (-(-len(run.data["target_train"].images) // bs))

  # Reference: full predictor twice (thresholds, then labels).
  images = run.data["target_train"].images
  predict = segmentation.make_predict_jit(run)
  probs = []
  for batch in segmentation.eval_batches(run, run.data["target_train"]):
    out = parallel.local_rows(
        predict(state, parallel.shard_batch({"image": batch["image"]},
                                            run.mesh)["image"]), run.mesh)
    probs.append(out[batch["mask"]])
  probs = jnp.asarray(np.concatenate(probs))
  assert probs.shape[0] == len(images)
  hist = thresholds.update_threshold_histogram(
      thresholds.init_threshold_histogram(run.num_classes, st.num_bins),
      probs, subsample=st.subsample)
  portion = thresholds.target_portion(0, st.portion_init, st.portion_step,
                                      st.portion_max)
  lam = np.asarray(thresholds.thresholds_from_histogram(hist, portion),
                   np.float32)
  np.testing.assert_array_equal(got["thresholds"], lam)
  cbst = np.asarray(thresholds.select(probs, jnp.asarray(lam)))
  dense = np.asarray(densify.densify(
      probs, jnp.asarray(cbst), jnp.asarray(lam), window=st.window,
      alpha=st.alpha, num_iters=st.num_iters, pooling=st.pooling,
      combine=st.combine, top_k=st.top_k))
  np.testing.assert_array_equal(got["before"], cbst)
  np.testing.assert_array_equal(got["pl_label"], dense)
  # Not a vacuous comparison: some pixels are labelled, some ignored, and
  # voting changed some.
  assert 0 < (cbst != IGNORE_LABEL).mean() < 1
  assert (dense != cbst).any()
