"""Scale-out: two processes on 127.0.0.1, gradient accumulation, topologies.

The two-process test starts ``tests/multiprocess_worker.py`` twice (2 CPU
devices each, ``jax.distributed`` over loopback, Gloo collectives) and once
as a one-process reference (4 CPU devices, the same global batches), all
three at once, and compares what they wrote. Children that do not finish in
``TIMEOUT_S`` are killed and the test fails with their stderr.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import child_env

from experiments.configs import adaptsegnet as adaptsegnet_cfg
from jaxda import checkpoint as checkpoint_lib
from jaxda import models
from jaxda import optim
from jaxda import parallel
from jaxda import state as state_lib
from jaxda.methods import base
from jaxda.methods import get_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")
# A hang (a process stuck in a collective) fails the test after this; a
# healthy run takes ~60 s on 2 idle cores. JAX's own heartbeat (100 s) also
# ends the others when one process dies.
TIMEOUT_S = int(os.environ.get("JAXDA_MULTIPROCESS_TIMEOUT_S", "240"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(args, num_devices, log_prefix):
  """Starts one worker; its output goes to files (a full pipe would block
  it, and a blocked process stalls the collectives of the others)."""
  # conftest asks for 8 devices; each child sets its own count.
  env = child_env.child_env(num_devices)
  env["JAX_PLATFORMS"] = "cpu"
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
              "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS"):
    env.pop(key, None)
  with open(f"{log_prefix}.out", "w") as out, \
      open(f"{log_prefix}.err", "w") as err:
    proc = subprocess.Popen(
        [sys.executable, WORKER] + [str(a) for a in args], cwd=ROOT, env=env,
        stdout=out, stderr=err)
  return proc, log_prefix


def _wait_all(procs):
  """Waits for every child; kills all and fails on timeout or error.

  Returns:
    Each child's stdout.
  """
  deadline = time.monotonic() + TIMEOUT_S
  failed = []
  for name, (proc, _) in procs:
    try:
      proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      failed.append(f"{name} timed out after {TIMEOUT_S} s")
  for name, (proc, log) in procs:
    if proc.poll() is None:
      proc.kill()  # Only our own children, by handle.
      proc.wait()
    if proc.returncode:
      with open(f"{log}.err") as f:
        failed.append(f"{name} exited {proc.returncode}:\n"
                      + f.read()[-3000:])
  if failed:
    pytest.fail("\n\n".join(failed))
  outputs = []
  for _, (_, log) in procs:
    with open(f"{log}.out") as f:
      outputs.append(f.read())
  return outputs


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """Runs the two workers and the reference once; returns their dirs."""
  base_dir = tmp_path_factory.mktemp("multiprocess")
  out, ref_out = base_dir / "out", base_dir / "ref_out"
  work, ref_work = base_dir / "work", base_dir / "ref_work"
  for d in (out, ref_out, work, ref_work):
    d.mkdir()
  port = _free_port()
  procs = [(f"process {i}", _launch([out, work, port, 2, i], 2,
                                    base_dir / f"process_{i}"))
           for i in range(2)]
  procs.append(("reference", _launch([ref_out, ref_work, 0, 0, 0], 4,
                                     base_dir / "reference")))
  stdout = _wait_all(procs)
  load = lambda p: dict(np.load(p))
  return {"p0": load(out / "process_0.npz"), "p1": load(out / "process_1.npz"),
          "ref": load(ref_out / "process_0.npz"), "work": work,
          "stdout": stdout}


def _params(npz):
  return {k: v for k, v in npz.items() if k.startswith("['params']")}


def test_two_processes_train_like_one(two_process_run):
  p0, p1, ref = (two_process_run[k] for k in ("p0", "p1", "ref"))
  params = _params(p0)
  assert params and params.keys() == _params(ref).keys()
  init = lambda k: p0["['init']" + k[len("['params']"):]]
  diff_sq = update_sq = 0.0
  for k, v in params.items():
    # Replicas agree bit for bit.
    np.testing.assert_array_equal(v, p1[k], err_msg=k)
    # The one-process run agrees up to summation order, compared on what
    # training changed. Why not ulps: the cross-device sums (BN batch means,
    # gradients) run in another order in-process than through Gloo, and a
    # ReLU whose input lies within that rounding of 0 (measured: one of 2,880
    # layer2 bn2 outputs at 9e-7) flips its gate, which moves that layer's
    # and every earlier layer's gradient by ~3% of the step (a 1-ulp random
    # perturbation of the weights in a single process does the same). A real
    # fault (a process's gradient or statistics missing, sum instead of mean,
    # wrong shards) changes the step by tens of percent.
    update, ref_update = v - init(k), ref[k] - init(k)
    leaf_diff = float(np.linalg.norm(update - ref_update))
    leaf_norm = float(np.linalg.norm(ref_update))
    assert leaf_diff <= 0.05 * leaf_norm + 1e-9, (k, leaf_diff, leaf_norm)
    diff_sq += leaf_diff ** 2
    update_sq += leaf_norm ** 2
  # Measured on a Zen 4 CPU: 7e-4 overall, 4e-3 in the worst leaf.
  assert diff_sq ** 0.5 <= 1e-2 * update_sq ** 0.5, (diff_sq, update_sq)
  # Training moved the parameters (the comparison is not vacuous).
  assert update_sq ** 0.5 > 1e-2, update_sq
  # Evaluation saw each of the 6 target val images once, across processes.
  assert int(p0["num_val_images"]) == int(ref["num_val_images"]) == 6
  np.testing.assert_allclose(p0["miou"], ref["miou"], atol=1e-6)


def test_sharded_pseudo_labels_cover_each_image_once(two_process_run):
  p0, p1, ref = (two_process_run[k] for k in ("p0", "p1", "ref"))
  # Process 0 labelled images 0..3, process 1 images 4..8: each once.
  assert p0["before_rows"].shape[0] == 4 and p1["before_rows"].shape[0] == 5
  np.testing.assert_array_equal(
      np.concatenate([p0["before_rows"], p1["before_rows"]]),
      ref["before_rows"])
  np.testing.assert_allclose(p0["thresholds"], ref["thresholds"], rtol=1e-6)
  for key in ("pl_label", "is_easy"):
    assert p0[key].shape[0] == 9
    np.testing.assert_array_equal(p0[key], ref[key], err_msg=key)
    np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
  np.testing.assert_allclose(p0["pl_weight"], ref["pl_weight"], rtol=1e-5,
                             atol=1e-6)


def test_only_process_zero_writes(two_process_run):
  work = two_process_run["work"]
  with open(work / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == [1, 2]  # logged once each, not once per process
  assert sum("target/miou" in r for r in records) == 1
  with open(work / "summary.json") as f:
    summary = json.load(f)
  assert summary["devices"] == {"count": 4, "platform": "cpu",
                                "processes": 2}
  out0, out1 = two_process_run["stdout"][:2]
  assert "target mIoU" in out0 and "target mIoU" not in out1
  # Orbax checkpoints written by both processes: complete and readable here,
  # by one process with another device count (8).
  weights = checkpoint_lib.load_weights(str(work))
  assert weights["step"] == 2
  flat = jax.tree_util.tree_flatten_with_path(weights["params"])[0]
  p0 = two_process_run["p0"]
  for k, v in flat:
    np.testing.assert_array_equal(
        np.asarray(v), p0["['params']" + jax.tree_util.keystr(k)])


# --------------------------------------------------------------------------
# Configuration of jax.distributed
# --------------------------------------------------------------------------


def _dist(**kw):
  d = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=0, process_id=-1,
      local_device_ids="", initialization_timeout=300))
  d.update(kw)
  return d


def test_distributed_args_from_config_and_environment():
  assert parallel.distributed_args(_dist(), {}) is None
  assert parallel.distributed_args(_dist(num_processes=1), {}) is None
  args = parallel.distributed_args(
      _dist(coordinator_address="10.0.0.1:1234", num_processes=4,
            process_id=2, local_device_ids="0,1"), {})
  assert args == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                  "process_id": 2, "local_device_ids": [0, 1],
                  "initialization_timeout": 300}
  env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "3",
         "JAX_PROCESS_ID": "1"}
  args = parallel.distributed_args(_dist(), env)
  assert (args["coordinator_address"], args["num_processes"],
          args["process_id"], args["local_device_ids"]) == ("h:9", 3, 1, None)
  # The config wins over the environment.
  assert parallel.distributed_args(_dist(process_id=0), env)["process_id"] == 0
  # -1: JAX detects everything it is not told (TPU pod, SLURM).
  auto = parallel.distributed_args(_dist(num_processes=-1), {})
  assert auto["num_processes"] is None and auto["coordinator_address"] is None
  with pytest.raises(ValueError, match="num_processes"):
    parallel.distributed_args(_dist(coordinator_address="h:1"), {})


# --------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------

NUM_CLASSES, H, W = 4, 32, 32


def _accum_setup(ks):
  """AdaptSegNet states and jitted steps, one per accumulation count."""
  config = adaptsegnet_cfg.get_config("tiny")
  config.model.bn_mode = "frozen"  # BN statistics do not depend on the batch
  config.model.multi_level = False
  seg = models.create_segmenter(config.model.name, NUM_CLASSES,
                                multi_level=False)
  disc = models.create_discriminator(8)
  variables = jax.jit(seg.init)(jax.random.key(0), jnp.zeros((1, H, W, 3)))
  disc_params = {"main": disc.init(
      jax.random.key(1), jnp.zeros((1, H, W, NUM_CLASSES)))["params"]}
  out = []
  for k in ks:
    tx, _ = optim.make_segmenter_tx(
        learning_rate=0.05, schedule_steps=10,
        head_regexes=(models.head_param_regex,),
        frozen_regexes=(models.batchnorm_param_regex,))
    disc_tx = optim.make_discriminator_tx(learning_rate=1e-2,
                                          schedule_steps=10)
    tx, disc_tx = optim.accumulate(tx, k), optim.accumulate(disc_tx, k)
    state = state_lib.TrainState.create(
        params=variables["params"], batch_stats=variables["batch_stats"],
        tx=tx, disc_params=disc_params, disc_tx=disc_tx)
    step = get_method("adaptsegnet").make_step(base.Models(seg, disc),
                                               config, tx, disc_tx)
    out += [state, jax.jit(step)]
  return out


def _random_batch(rng, b):
  def dom():
    labels = rng.integers(0, NUM_CLASSES, (b, H, W)).astype(np.int32)
    labels[:, :3] = 255
    return {"image": rng.normal(size=(b, H, W, 3)).astype(np.float32),
            "label": labels}
  return {"source": dom(), "target": dom()}


def test_grad_accumulation_equals_the_larger_batch(tmp_path):
  k, b = 2, 2
  big = _random_batch(np.random.default_rng(0), k * b)
  micro = [jax.tree.map(lambda x, i=i: x[i * b:(i + 1) * b], big)
           for i in range(k)]
  state_big, step_big, state_acc, step_acc = _accum_setup((1, k))
  rng = jax.random.key(0)
  want, _ = step_big(state_big, big, rng)
  got = state_acc
  for i, batch in enumerate(micro):
    got, _ = step_acc(got, batch, rng)
    if i < k - 1:  # No update before the k-th micro-batch.
      for a, c in zip(jax.tree.leaves(got.params),
                      jax.tree.leaves(state_acc.params)):
        np.testing.assert_array_equal(a, c)
  init = jax.tree.leaves(state_big.params)
  for name, w_tree, g_tree in (("params", want.params, got.params),
                               ("disc", want.disc_params, got.disc_params)):
    changed = 0
    for w, g, i0 in zip(jax.tree.leaves(w_tree), jax.tree.leaves(g_tree),
                        init if name == "params" else
                        jax.tree.leaves(state_big.disc_params)):
      # Adam's first step is ~lr * g / |g|: where g ~ 0 it turns float
      # summation-order noise into up to ~1% of a step (lr 1e-2).
      atol = 2e-6 if name == "params" else 1e-4
      np.testing.assert_allclose(g, w, rtol=2e-4, atol=atol, err_msg=name)
      changed += int(not np.allclose(w, i0))
    assert changed, name  # the update did something
  # The accumulating state (mid-accumulation) checkpoints and restores.
  mid, _ = step_acc(state_acc, micro[0], rng)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, mid)
  ckpt.wait()
  restored, step = ckpt.restore(jax.tree.map(jnp.zeros_like, mid))
  assert step == 1
  for a, c in zip(jax.tree.leaves(restored), jax.tree.leaves(mid)):
    np.testing.assert_array_equal(a, c)
  ckpt.close()


# --------------------------------------------------------------------------
# Checkpoints across device counts
# --------------------------------------------------------------------------


def _small_state(seed):
  rng = np.random.default_rng(seed)
  params = {"conv": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(
      np.float32)}, "head": {"bias": rng.normal(size=(8,)).astype(
          np.float32)}}
  tx = optim.accumulate(optax.chain(optax.add_decayed_weights(1e-3),
                                    optax.sgd(0.1, momentum=0.9)), 2)
  state = state_lib.TrainState.create(params=params, batch_stats={}, tx=tx)
  # One update so the optimiser state holds non-zero values too.
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                             jnp.float32), params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state, step=jnp.int32(1))


def test_checkpoint_restores_on_other_device_counts(tmp_path):
  assert jax.device_count() >= 8  # conftest's simulated devices
  saved = parallel.replicate(_small_state(0), parallel.make_mesh(8))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, saved)
  ckpt.close()
  for n in (1, 2):
    mesh = parallel.make_mesh(n)
    # The target: another state on n devices (different values).
    target = parallel.replicate(_small_state(1), mesh)
    reader = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
    restored, step = reader.restore(target)
    reader.close()
    assert step == 1
    for a, c in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
      assert a.sharding.num_devices == n
      np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
