"""Devices and sharding: the only module that knows about meshes.

jaxda is data parallel: parameters and optimiser state are replicated, the
batch is split along its leading axis over the mesh axis ``'data'``, and the
train step is one ``jax.jit`` whose in/out shardings say so. Under ``jit`` a
mean over the (global) batch is already a cross-device mean, so losses never
take an ``axis_name`` and BatchNorm sees the global batch.

Several processes (hosts) run the same program on their own share of the
data (``initialize_distributed``, ``process_shard``, ``shard_batch``); the
global batch and every reduction span all of them (second half of this
module).

The sharding APIs changed three times between JAX 0.8 and 0.10 (``pmap`` in
maintenance mode, ``device_put_replicated`` removed, ``with mesh`` deprecated
for ``jax.set_mesh``), which is why all of it lives here.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxda import types

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """Returns a 1-D data-parallel mesh over the first ``num_devices`` devices.

  ``AxisType.Auto`` because Linen modules (BatchNorm, dropout) fail sharding
  type checks on the ``Explicit`` axes that ``jax.make_mesh`` defaults to.
  """
  n = jax.device_count() if num_devices is None else int(num_devices)
  if n < 1 or n > jax.device_count():
    raise ValueError(
        f"num_devices={n} but {jax.device_count()} devices are visible; set"
        " config.num_devices to a value in [1, device_count] or -1 for all.")
  return jax.make_mesh(
      (n,), (DATA_AXIS,),
      axis_types=(jax.sharding.AxisType.Auto,),
      devices=jax.devices()[:n])


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding that keeps a full copy of an array on every device."""
  return NamedSharding(mesh, P())


def init_replicated(init_fn: Callable[[], Any],
                    mesh: jax.sharding.Mesh) -> Any:
  """Runs ``init_fn()`` (parameter init) once, every output replicated.

  On CPU the program is compiled at XLA backend optimisation level 0: it
  runs once, and its dozens of unrolled threefry draws are slow to optimise
  (tiny DeepLab init: 9.2 s at the default level, 3.0 s at 0). Running it
  eagerly is slower still (24 s: one compile per op shape). The values can
  differ from an optimised build's in the last bit (no fused multiply-add in
  ``uniform``'s scaling); they are the same from run to run.
  """
  lowered = jax.jit(init_fn, out_shardings=replicated(mesh)).lower()
  options = ({"xla_backend_optimization_level": 0}
             if jax.default_backend() == "cpu" else None)
  return lowered.compile(compiler_options=options)()


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places every leaf of ``tree`` on all devices of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh) -> None:
  """Raises a clear error if the batch cannot be split evenly."""
  n = mesh.devices.size
  if global_batch_size % n:
    raise ValueError(
        f"batch size {global_batch_size} is not divisible by the {n} devices of"
        f" the mesh; set --config.batch_size to a multiple of {n} or"
        f" --config.num_devices to a divisor of {global_batch_size}.")


def local_batch_size(global_batch_size: int) -> int:
  """The share of the global batch that this process loads."""
  if global_batch_size % jax.process_count():
    raise ValueError(
        f"batch size {global_batch_size} is not divisible by the"
        f" {jax.process_count()} processes.")
  return global_batch_size // jax.process_count()


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Turns this process's NumPy batch into global arrays split over ``mesh``.

  Args:
    batch: pytree of host arrays whose leading axis is the per-process batch.
    mesh: the data mesh.

  Returns:
    The same pytree of ``jax.Array`` with leading axis = global batch, sharded
    along ``'data'``.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch)


def jit_step(step_fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """Compiles ``step_fn(state, batch, rng) -> (state, metrics)`` for ``mesh``.

  State and rng are replicated, the batch is split along ``'data'``, the old
  state is donated (its buffers are reused for the new one) and the metrics
  come back replicated, so reading them on the host needs no gather.
  """
  repl, data = replicated(mesh), batch_sharded(mesh)
  return jax.jit(
      step_fn,
      in_shardings=(repl, data, repl),
      out_shardings=(repl, repl),
      donate_argnums=(0,))


def jit_inference(fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """Compiles ``fn(state, batch) -> outputs`` with batch-sharded outputs."""
  repl, data = replicated(mesh), batch_sharded(mesh)
  return jax.jit(fn, in_shardings=(repl, data), out_shardings=data)


def device_memory_bytes(mesh: jax.sharding.Mesh) -> int | None:
  """The smallest ``bytes_limit`` over the mesh's devices, or None where the
  backend reports no memory statistics (CPU): what a batch must fit in."""
  limits = []
  for device in mesh.devices.flat:
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None  # Backends without the statistics raise or return None.
    if not stats or not stats.get("bytes_limit"):
      return None
    limits.append(int(stats["bytes_limit"]))
  return min(limits) if limits else None


def compiled_bytes(compiled) -> int | None:
  """Per-device bytes a compiled function needs (arguments + outputs +
  temporaries - donated aliases), from ``memory_analysis()``; None where
  the backend does not say."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes
             + m.temp_size_in_bytes - m.alias_size_in_bytes)


def to_host(tree: Any) -> Any:
  """Fetches a pytree of (possibly sharded) arrays to host NumPy arrays.

  Only addressable data is fetched; for a replicated or fully addressable
  array that is the whole array.
  """
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def is_main_process() -> bool:
  """True on the process that writes logs, pictures and summaries."""
  return jax.process_index() == 0


# --------------------------------------------------------------------------
# Multi-process (multi-host) runs
# --------------------------------------------------------------------------
#
# Every process runs the same program on its own share of the data: training
# batches, evaluation and pseudo-labelling passes read only the contiguous
# slice ``shard_for_process`` gives it, and each jitted step sees the
# global batch (``shard_batch``). Host-side results that every process needs
# (pseudo-labels, image confidences) are gathered with ``process_allgather``;
# everything else (metrics, confusion matrices, threshold histograms) comes
# out of a jitted reduction replicated on every process.

# Environment variables read when the config leaves a field empty. JAX itself
# reads JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS; the other two are
# ours, named in the same style.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"


def distributed_args(dist: Any, environ: Any = None) -> dict[str, Any] | None:
  """The ``jax.distributed.initialize`` arguments of a config, or None.

  Args:
    dist: ``config.distributed`` (coordinator_address, num_processes,
      process_id, local_device_ids, initialization_timeout).
    environ: mapping read for empty fields (default ``os.environ``).

  Returns:
    None for a single-process run (``num_processes`` 0 or 1, no coordinator
    address in the config or environment); else the keyword arguments, with
    None where JAX should auto-detect (``num_processes = -1``: TPU pod,
    SLURM, Open MPI).
  """
  environ = os.environ if environ is None else environ
  address = dist.coordinator_address or environ.get(ENV_COORDINATOR) or None
  num = int(dist.num_processes or environ.get(ENV_NUM_PROCESSES) or 0)
  pid = int(dist.process_id)
  if pid < 0 and environ.get(ENV_PROCESS_ID):
    pid = int(environ[ENV_PROCESS_ID])
  ids = str(dist.local_device_ids or environ.get(ENV_LOCAL_DEVICE_IDS) or "")
  if num == 0 and address is not None:
    raise ValueError(
        f"config.distributed: coordinator address {address!r} given but no"
        " process count; set --config.distributed.num_processes (or"
        f" {ENV_NUM_PROCESSES}), or -1 to let JAX detect the cluster")
  if num in (0, 1):
    return None
  if num < -1:
    raise ValueError("config.distributed.num_processes must be -1 (auto),"
                     f" 0 (environment), or >= 1; got {num}")
  return {
      "coordinator_address": address,
      "num_processes": None if num == -1 else num,
      "process_id": None if pid < 0 else pid,
      "local_device_ids": ([int(i) for i in ids.split(",")] if ids
                           else None),
      "initialization_timeout": int(dist.initialization_timeout),
  }


def initialize_distributed(config: Any) -> bool:
  """Joins a multi-process run if the config or environment asks for one.

  Call once, before any other JAX call (entry points do it first). A
  no-op for single-process runs and when JAX is already initialised. On
  CPU the cross-process collectives are Gloo's (XLA's default in JAX 0.10,
  set explicitly here so an older default of none cannot leave processes
  computing alone).

  Args:
    config: a run config; reads ``config.distributed`` if it exists.

  Returns:
    True if this call initialised ``jax.distributed``.
  """
  dist = config.get("distributed") if hasattr(config, "get") else None
  if dist is None:
    return False
  kwargs = distributed_args(dist)
  if kwargs is None or jax.distributed.is_initialized():
    return False
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return True


def shard_for_process(n: int, process_index: int,
                      process_count: int) -> slice:
  """The contiguous slice of ``n`` examples owned by one host process.

  Shards differ in size by at most one and together cover range(n) once,
  like ``tfds.even_splits``.

  Args:
    n: number of examples.
    process_index: this process, in [0, process_count).
    process_count: number of processes.

  Returns:
    slice(start, stop).
  """
  if process_count < 1 or not 0 <= process_index < process_count or n < 0:
    raise ValueError(f"bad shard request: n={n}, process_index="
                     f"{process_index}, process_count={process_count}")
  return slice(n * process_index // process_count,
               n * (process_index + 1) // process_count)


def process_shard(n: int) -> slice:
  """The contiguous rows of an ``n``-row split this process reads."""
  return shard_for_process(n, jax.process_index(), jax.process_count())


def process_seed(seed: int) -> int:
  """A data-order seed per process: ``seed`` itself in a single process.

  ``seed * P + p`` keeps single-process runs bit-identical to before and
  gives the P processes (which shuffle different shards) distinct flip and
  permutation streams.
  """
  return int(seed) * jax.process_count() + jax.process_index()


def max_over_processes(value: int) -> int:
  """The largest of one integer per process (every process gets it)."""
  if jax.process_count() == 1:
    return int(value)
  gathered = multihost_utils.process_allgather(np.asarray(value, np.int64))
  return int(np.max(gathered))


def sum_over_processes(x: np.ndarray) -> np.ndarray:
  """Elementwise sum of one host array per process (e.g. histograms)."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)


def gather_process_rows(rows: np.ndarray, n: int) -> np.ndarray:
  """Concatenates every process's ``process_shard(n)`` rows, in order.

  Args:
    rows: (len(process_shard(n)), ...) this process's rows of an n-row
      array.
    n: total rows.

  Returns:
    (n, ...) the whole array, on every process; each row comes from exactly
    the process that owns it.
  """
  rows = np.asarray(rows)
  mine = process_shard(n)
  if len(rows) != mine.stop - mine.start:
    raise ValueError(f"process {jax.process_index()} holds {len(rows)} rows"
                     f" but owns {mine.stop - mine.start} of {n}")
  count = jax.process_count()
  if count == 1:
    return rows
  shards = [shard_for_process(n, p, count) for p in range(count)]
  longest = max(s.stop - s.start for s in shards)
  # process_allgather needs one shape everywhere: pad to the longest shard.
  padded = np.zeros((longest,) + rows.shape[1:], rows.dtype)
  padded[:len(rows)] = rows
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return np.concatenate([gathered[p, :s.stop - s.start]
                         for p, s in enumerate(shards)])


def local_rows(x: jax.Array, mesh: jax.sharding.Mesh) -> np.ndarray:
  """This process's rows of a batch-sharded global array, on the host.

  The inverse of ``shard_batch`` for one process: what it put in, it gets
  back, in order. ``np.asarray`` cannot fetch an array that spans other
  processes' devices.
  """
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, P(DATA_AXIS)))


def process_eval_batches(images: np.ndarray, labels: np.ndarray | None, *,
                         global_batch_size: int, mode: str,
                         make_batches: Callable, offset: int = 0) -> Any:
  """In-order eval batches of this process's rows, as many on every process.

  Each process passes only the rows it owns (``process_shard``); batches
  hold ``global_batch_size / P`` rows; shorter processes add fully masked
  batches so all of them run the same number of global steps (a jitted
  step is a collective: a process that stopped early would hang the
  others). ``index`` is shifted by ``offset`` (the shard's first row), so it
  names the row of the whole split; padding rows have ``mask`` False.

  ``make_batches(images, labels, batch_size=, mode=)`` builds this
  process's batches (``data.pipeline.eval_batches``; full-resolution
  evaluation passes one whose labels keep their own size). It is an
  argument because this module imports no data code.

  Yields:
    dicts as ``make_batches``: 'image' (B/P, H, W, 3), 'label' if given,
    'index' (B/P,), 'mask' (B/P,).
  """
  bs = local_batch_size(global_batch_size)
  steps = max_over_processes(-(-len(images) // bs))
  done = 0
  if len(images):
    for batch in make_batches(images, labels, batch_size=bs, mode=mode):
      batch["index"] = np.where(batch["mask"], batch["index"] + offset, -1)
      done += 1
      yield batch
  h, w = images.shape[1:3]
  for _ in range(done, steps):
    batch = {"image": np.zeros((bs, h, w, 3), np.float32)}
    if labels is not None:
      batch["label"] = np.full((bs,) + labels.shape[1:],
                               types.IGNORE_LABEL, np.int32)
    batch["index"] = np.full((bs,), -1, np.int32)
    batch["mask"] = np.zeros((bs,), bool)
    yield batch
