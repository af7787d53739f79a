"""Devices and sharding: the only module that knows about meshes.

jaxda is data parallel: parameters and optimiser state are replicated, the
batch is split along its leading axis over the mesh axis ``'data'``, and the
train step is one ``jax.jit`` whose in/out shardings say so. Under ``jit`` a
mean over the (global) batch is already a cross-device mean, so losses never
take an ``axis_name`` and BatchNorm sees the global batch.

The sharding APIs changed three times between JAX 0.8 and 0.10 (``pmap`` in
maintenance mode, ``device_put_replicated`` removed, ``with mesh`` deprecated
for ``jax.set_mesh``), which is why all of it lives here.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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


def to_host(tree: Any) -> Any:
  """Fetches a pytree of (possibly sharded) arrays to host NumPy arrays.

  Only addressable data is fetched; for a replicated or fully addressable
  array that is the whole array.
  """
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def is_main_process() -> bool:
  """True on the process that writes logs, pictures and summaries."""
  return jax.process_index() == 0
