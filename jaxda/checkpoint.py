"""Orbax checkpoints: atomic saves, resume, and never a bad state on disk.

Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-write leaves the previous checkpoints intact. On top of
that this module refuses to save a state with NaN/Inf leaves and, on restore,
falls back to the newest checkpoint that actually loads.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxda import state as state_lib


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read."""


class Checkpointer:
  """Saves and restores a ``TrainState`` under ``directory``.

  Args:
    directory: where step directories go (created if missing).
    max_to_keep: how many recent checkpoints to keep.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    try:
      os.makedirs(self.directory, exist_ok=True)
    except OSError as e:
      raise CheckpointError(
          f"cannot create checkpoint directory {self.directory}: {e}; choose a"
          " writable --workdir") from e
    if not os.access(self.directory, os.W_OK):
      raise CheckpointError(
          f"checkpoint directory {self.directory} is not writable; choose a"
          " writable --workdir or fix its permissions")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves ``state`` at ``step`` unless it holds NaN/Inf values.

    Returns:
      True if a checkpoint was written.

    Raises:
      CheckpointError: the state is not finite (nothing is written, earlier
        checkpoints stay) or the write failed.
    """
    if not bool(jax.device_get(state_lib.all_finite(state))):
      raise CheckpointError(
          f"refusing to checkpoint step {step}: the state holds NaN/Inf"
          f" values; the last good checkpoint in {self.directory} is kept")
    if step in self._manager.all_steps():
      return False
    try:
      return self._manager.save(step, args=ocp.args.StandardSave(state),
                                force=force)
    except OSError as e:
      raise CheckpointError(
          f"writing checkpoint {step} to {self.directory} failed ({e}); earlier"
          " checkpoints are intact; free disk space and rerun to resume") from e

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, int]:
    """Restores the newest readable checkpoint into the structure of ``target``.

    The arrays are placed with ``target``'s shardings, not the saved ones,
    so a checkpoint written on N devices by P processes restores on any
    other device or process count (Orbax reads each device's slice).

    Args:
      target: a state with the right structure, shapes, dtypes and shardings.
      step: a specific step; default the newest that loads.

    Returns:
      ``(state, step)``.

    Raises:
      CheckpointError: no checkpoint loads.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    steps = [step] if step is not None else self.all_steps()[::-1]
    errors = []
    for s in steps:
      try:
        restored = self._manager.restore(
            s, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # pylint: disable=broad-except
        # A partial or corrupt directory: say so and try the previous one.
        logging.warning("checkpoint %d in %s is unreadable (%s); trying an"
                        " earlier one", s, self.directory, e)
        errors.append(f"step {s}: {type(e).__name__}: {e}")
        continue
      if not bool(jax.device_get(state_lib.all_finite(restored))):
        errors.append(f"step {s}: holds NaN/Inf")
        continue
      return restored, int(s)
    raise CheckpointError(
        f"no readable checkpoint in {self.directory}: " + "; ".join(errors))

  def wait(self) -> None:
    """Blocks until pending asynchronous writes are on disk.

    Raises:
      CheckpointError: an asynchronous write failed (e.g. disk full).
    """
    try:
      self._manager.wait_until_finished()
    except OSError as e:
      raise CheckpointError(
          f"writing a checkpoint to {self.directory} failed ({e}); earlier"
          " checkpoints are intact; free disk space and rerun to resume") from e

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def load_weights(path: str) -> dict[str, Any]:
  """Reads ``params`` and ``batch_stats`` of another run (warm starts).

  Used when a method starts from another run (TPLD from a source-only run,
  GAM from a source model). ``path`` may be a run's workdir or its
  ``checkpoints`` directory; the newest readable checkpoint is used. The
  tree is restored without a target structure, so the other run may have
  had different optimisers or discriminators.

  Returns:
    ``{'params': ..., 'batch_stats': ..., 'step': int}`` of host arrays.
  """
  path = os.path.abspath(path)  # Orbax reads absolute paths only.
  directory = path
  if os.path.isdir(os.path.join(path, "checkpoints")):
    directory = os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(
        f"init checkpoint {path} does not exist; point the config at the"
        " workdir of a finished run (or leave it empty to train one first)")
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers=ocp.StandardCheckpointHandler())
  # Every array onto this process's first device, whatever mesh (device or
  # process count) wrote it: Orbax refuses a target-less restore across
  # topologies.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    errors = []
    for step in sorted(manager.all_steps())[::-1]:
      try:
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            manager.item_metadata(step))
        raw = manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f"step {step}: {type(e).__name__}: {e}")
        continue
      return {"params": raw["params"],
              "batch_stats": raw.get("batch_stats") or {}, "step": int(step)}
  finally:
    manager.close()
  raise CheckpointError(
      f"no readable checkpoint in {directory}"
      + (": " + "; ".join(errors) if errors else ""))
