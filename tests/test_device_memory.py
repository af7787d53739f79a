"""Sizes that fit devices: auto evaluation batch and the start-up check.

CPU reports no device memory, so ``auto`` must give today's CPU batch
(``config.eval.host_batch_size``) and the start-up check must not compile
anything; a ``bytes_limit`` injected as an argument stands in for a GPU's.
"""

import jax
import pytest

from experiments.configs import source_only as source_only_cfg
from jaxda import methods
from jaxda import parallel
from jaxda.tasks import splits
from jaxda.train import loop as train_loop


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("device_memory")
  c = source_only_cfg.get_config("tiny")
  c.source.data_dir = c.target.data_dir = str(tmp / "cache")
  return train_loop.setup(c, str(tmp / "run"),
                          methods.get_method("source_only"))


def test_auto_eval_batch_on_cpu_is_the_host_batch(run):
  assert run.config.eval.batch_size == splits.AUTO
  assert parallel.device_memory_bytes(run.mesh) is None  # CPU
  assert splits.eval_batch_size(run) == 8  # the tiny config's, as before
  assert source_only_cfg.get_config("").eval.host_batch_size == 32
  explicit = run.config.copy_and_resolve_references()
  explicit.eval.batch_size = 20  # an explicit value: rounded to the devices
  assert splits.eval_batch_size(
      type(run)(**{**run.__dict__, "config": explicit})) == 16


def test_fitting_batch_size_is_the_largest_that_fits():
  compiles = []

  def cost(batch):
    compiles.append(batch)
    return 1000 + 100 * batch

  # 1000 + 100 * b <= 5000 -> b <= 40 -> 5 per device on 8 devices.
  assert splits.fitting_batch_size(cost, 8, 5000) == 40
  assert len(compiles) <= 4
  assert splits.fitting_batch_size(cost, 8, 10**9, max_per_device=64) == 512
  assert splits.fitting_batch_size(cost, 8, 10) == 8  # one per device
  assert splits.fitting_batch_size(lambda b: None, 8, 10**9) is None


def test_auto_eval_batch_fits_an_injected_device_limit(run):
  n = run.mesh.devices.size
  size = splits.eval_image_size(run)
  cost = splits.inference_bytes_fn(run, size)
  # A device whose budget holds 3 images per device, not 64: compiles at
  # 1 and 2 per device give the estimate, 3 (memoised) confirms it.
  limit = int(cost(3 * n) / splits.AUTO_MEMORY_FRACTION) + 1
  got = splits.eval_batch_size(run, bytes_limit=limit)
  assert got % n == 0 and 2 * n <= got <= 3 * n, got
  assert cost(got) <= splits.AUTO_MEMORY_FRACTION * limit
  # (A large device's cap: test_fitting_batch_size_is_the_largest_that_fits.)


def test_start_up_check_names_what_to_set(run, monkeypatch):
  # Abstract shapes are enough: the check lowers and compiles, never runs.
  monkeypatch.setattr(parallel, "init_replicated",
                      lambda init, mesh: jax.eval_shape(init))
  state = train_loop.create_state(run)
  step_jit = train_loop.compile_step(run)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       next(train_loop.paired_batches(run, 0)))
  rng = jax.eval_shape(lambda: jax.random.key(0))
  # CPU reports no limit: nothing is compiled (step_jit is never touched).
  train_loop.check_step_memory(run, None, state, batch, rng)
  with pytest.raises(train_loop.ConfigError) as e:
    train_loop.check_step_memory(run, step_jit, state, batch, rng,
                                 bytes_limit=1 << 20)
  message = str(e.value)
  assert "\n" not in message
  for setting in ("--config.batch_size", "compute_dtype=bfloat16",
                  "remat=True", "height/width"):
    assert setting in message
  # Same step and shapes: no second compile (drivers call run_steps often).
  train_loop.check_step_memory(run, step_jit, state, batch, rng,
                               bytes_limit=1 << 40)
