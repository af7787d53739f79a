"""One process of the multi-process test (``tests/test_multiprocess.py``).

Run as ``python tests/multiprocess_worker.py OUT_DIR WORKDIR PORT NUM PID``:
joins ``jax.distributed`` on 127.0.0.1:PORT through ``config.distributed``
(CPU devices, Gloo collectives), then, on the tiny TPLD config,

1. labels the target train split once (phase-2 pass: thresholds, voting,
   image confidences, easy/hard split),
2. trains a few CBST/TPLD phase-1 steps on those labels (Orbax checkpoints
   written from every process),
3. evaluates and finishes (pictures, summary) through the shared loop,

and writes ``OUT_DIR/process_<PID>.npz`` with the parameters, the labels and
the rows this process contributed to them. ``NUM = 0`` is the one-process
reference: no ``jax.distributed``, and each global batch is built here as
the concatenation of what the two processes' shards give (the documented
contract: process p of P shuffles its contiguous shard with seed
``s * P + p``). XLA_FLAGS (device count) must be set by the caller.
"""

import os
import sys

# Importable from a checkout without installing (python tests/...py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from experiments.configs import tpld as tpld_cfg  # pylint: disable=g-import-not-at-top
from jaxda import methods  # pylint: disable=g-import-not-at-top
from jaxda import parallel  # pylint: disable=g-import-not-at-top
from jaxda.methods.self_training import rounds as self_training  # pylint: disable=g-import-not-at-top
from jaxda.train import loop as train_loop  # pylint: disable=g-import-not-at-top
from jaxda.data import pipeline  # pylint: disable=g-import-not-at-top
from jaxda.methods.self_training import steps as st_steps  # pylint: disable=g-import-not-at-top

NUM_STEPS = 2


def tiny_config():
  """The config both the 2-process run and the 1-process reference use."""
  # TPLD's labelling pass on a CBST config (no discriminator to compile).
  c = tpld_cfg.get_config("tiny,cbst")
  # 9 images: shards of 4 and 5, so process 0 runs one fully padded
  # labelling batch to keep in step with process 1.
  c.data.num_train_images = 9
  c.data.num_val_images = 6
  c.batch_size = 4
  c.eval.batch_size = 4
  c.num_steps = NUM_STEPS
  # A small LR: summation-order noise (4 devices of 1 process vs 2 x 2)
  # is not amplified by a diverging run, so a tight tolerance holds.
  c.optim.learning_rate = 2e-3
  c.log_every = 1
  c.checkpoint_every = 1
  c.eval.num_pictures = 1
  c.self_training.num_pictures = 0
  c.self_training.report_precision = False
  c.model.multi_level = False  # a smaller program to compile
  return c


def _extras(data, rows, num_classes):
  extras = {k: data[k][rows] for k in ("pl_label", "pl_weight", "is_easy")}
  extras["thresholds"] = np.broadcast_to(
      data["thresholds"], (len(extras["is_easy"]), num_classes)).copy()
  return extras


def process_batches(run, data):
  """What the loop gives this process: its shard's stream."""
  mine = parallel.process_shard(len(data["pl_label"]))
  return train_loop.paired_batches(
      run, 0, target_extras=_extras(data, mine, run.num_classes))


def reference_batches(run, data, num_processes=2):
  """Global batches of a ``num_processes`` run, built in one process."""
  config = run.config
  streams = []
  for p in range(num_processes):
    per_role = {}
    for role, seed in (("source", config.seed * 2 + 1),
                       ("target", config.seed * 2 + 2)):
      domain = run.data[f"{role}_train"]
      rows = parallel.shard_for_process(len(domain.images), p, num_processes)
      per_role[role] = pipeline.train_batches(
          domain.images[rows],
          None if domain.labels is None else domain.labels[rows],
          batch_size=config.batch_size // num_processes,
          seed=seed * num_processes + p, flip=config.data.flip,
          mode=config.data.normalization,
          extras=(_extras(data, rows, run.num_classes) if role == "target"
                  else None))
    streams.append(per_role)
  while True:
    parts = [{r: next(it) for r, it in s.items()} for s in streams]
    yield {r: {k: np.concatenate([part[r][k] for part in parts])
               for k in parts[0][r]} for r in parts[0]}


def label_and_train(run, batches_fn):
  """Pseudo-labels (phase 2) then trains; returns (state, labels dict)."""
  state = train_loop.create_state(run)
  init = flat({"init": state.params}, "")
  data = self_training.make_pseudo_labels(run, state, 0, 2, None)
  step = train_loop.compile_step(run, st_steps.make_phase1_step(
      run.models, run.config, run.tx, run.disc_tx))
  state = train_loop.run_steps(run, state, step, batches_fn(run, data), 0,
                               run.config.num_steps)
  return state, data, init


def flat(tree, prefix):
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_flatten_with_path(parallel.to_host(tree))[0]
  return {prefix + jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def main(argv):
  out_dir, workdir, port, num, pid = argv[1:6]
  config = tiny_config()
  if int(num):
    config.distributed.coordinator_address = f"127.0.0.1:{port}"
    config.distributed.num_processes = int(num)
    config.distributed.process_id = int(pid)
    config.distributed.initialization_timeout = 60
    assert parallel.initialize_distributed(config)

  contributed = []
  gather = parallel.gather_process_rows

  def recording_gather(rows, n):
    contributed.append(np.asarray(rows))
    return gather(rows, n)

  parallel.gather_process_rows = recording_gather
  run = train_loop.setup(config, workdir, methods.get_method(config.method))
  try:
    state, data, init = label_and_train(
        run, process_batches if int(num) else reference_batches)
    result = train_loop.evaluate_target(run, state, config.num_steps)
    train_loop.finish(run, state, result)
  finally:
    train_loop.close(run)
  np.savez(
      os.path.join(out_dir, f"process_{pid}.npz"),
      thresholds=data["thresholds"], pl_label=data["pl_label"],
      pl_weight=data["pl_weight"], is_easy=data["is_easy"],
      before_rows=contributed[0], miou=result["miou"],
      num_val_images=result["num_images"],
      **init, **flat({"params": state.params}, ""))


if __name__ == "__main__":
  main(sys.argv)
