"""Checkpoints: round trip, NaN refusal, corrupt-checkpoint fallback."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxda import checkpoint
from jaxda import state as state_lib


def _state(value=1.0):
  tx = optax.sgd(0.1, momentum=0.9)
  return state_lib.TrainState.create(
      params={"w": jnp.full((3, 2), value), "b": jnp.arange(2.0)},
      batch_stats={"mean": jnp.zeros(2)}, tx=tx)


def test_round_trip_and_latest(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), max_to_keep=3)
  for step, v in ((2, 1.0), (4, 2.0)):
    ckpt.save(step, _state(v).replace(step=jnp.int32(step)))
  ckpt.wait()
  assert ckpt.all_steps() == [2, 4]
  restored, step = ckpt.restore(_state(0.0))
  assert step == 4 and int(restored.step) == 4
  np.testing.assert_array_equal(restored.params["w"], 2.0)
  ckpt.close()


def test_refuses_nan_state_and_keeps_previous(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  ckpt.save(1, _state(1.0))
  ckpt.wait()
  with pytest.raises(checkpoint.CheckpointError, match="NaN/Inf"):
    ckpt.save(2, _state(float("nan")))
  ckpt.wait()
  assert ckpt.all_steps() == [1]
  restored, step = ckpt.restore(_state(0.0))
  assert step == 1
  np.testing.assert_array_equal(restored.params["w"], 1.0)
  ckpt.close()


def test_corrupt_latest_falls_back_to_previous(tmp_path):
  directory = str(tmp_path / "c")
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
  ckpt.save(1, _state(1.0))
  ckpt.save(2, _state(2.0))
  ckpt.close()
  # Truncate every data file of step 2 (a disk that filled up, a bad copy).
  for root, _, files in os.walk(os.path.join(directory, "2")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
  restored, step = ckpt.restore(_state(0.0))
  assert step == 1
  np.testing.assert_array_equal(restored.params["w"], 1.0)
  ckpt.close()


def test_no_readable_checkpoint_is_clear(tmp_path):
  directory = str(tmp_path / "c")
  ckpt = checkpoint.Checkpointer(directory)
  ckpt.save(3, _state(1.0))
  ckpt.close()
  shutil.rmtree(os.path.join(directory, "3"))
  os.makedirs(os.path.join(directory, "3"))
  ckpt = checkpoint.Checkpointer(directory)
  with pytest.raises(checkpoint.CheckpointError):
    ckpt.restore(_state(0.0), step=3)
  ckpt.close()


def test_unwritable_workdir_is_clear(tmp_path):
  if os.geteuid() == 0:
    # root ignores permissions; use a path under a regular file instead.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="cannot create"):
      checkpoint.Checkpointer(str(blocker / "c"))
  else:
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    with pytest.raises(checkpoint.CheckpointError):
      checkpoint.Checkpointer(str(ro / "c"))


def test_load_weights_reads_params_of_another_run(tmp_path):
  directory = str(tmp_path / "run" / "checkpoints")
  ckpt = checkpoint.Checkpointer(directory)
  ckpt.save(7, _state(3.0))
  ckpt.close()
  weights = checkpoint.load_weights(str(tmp_path / "run"))
  assert weights["step"] == 7
  np.testing.assert_array_equal(weights["params"]["w"], 3.0)
  # A relative path (a user's --config.model.init_checkpoint=runs/x).
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    assert checkpoint.load_weights("run")["step"] == 7
  finally:
    os.chdir(cwd)
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.load_weights(str(tmp_path / "missing"))


def test_disk_full_while_saving_is_clear_and_keeps_previous(tmp_path,
                                                            monkeypatch):
  import errno  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / "c")
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
  ckpt.save(1, _state(1.0))
  ckpt.wait()

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  # Simulated ENOSPC from the storage layer, synchronously and from the
  # asynchronous commit.
  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(checkpoint.CheckpointError,
                     match="No space left.*earlier checkpoints are intact"):
    ckpt.save(2, _state(2.0))
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished",
                      full_disk)
  with pytest.raises(checkpoint.CheckpointError, match="free disk space"):
    ckpt.wait()
  monkeypatch.undo()
  ckpt.close()
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
  restored, step = ckpt.restore(_state(0.0))
  assert step == 1
  np.testing.assert_array_equal(restored.params["w"], 1.0)
  ckpt.close()


def test_write_killed_midway_leaves_previous_checkpoint_in_use(tmp_path):
  # SIGKILL during a save leaves Orbax's temporary directory (the atomic
  # rename to "<step>" never happened) with partial files in it.
  directory = str(tmp_path / "c")
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
  ckpt.save(4, _state(4.0))
  ckpt.close()
  partial = os.path.join(directory, "8.orbax-checkpoint-tmp-1795000000000")
  shutil.copytree(os.path.join(directory, "4"), partial)
  for root, _, files in os.walk(partial):
    for name in files[: len(files) // 2 + 1]:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0partial")
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
  assert ckpt.latest_step() == 4
  restored, step = ckpt.restore(_state(0.0))
  assert step == 4
  np.testing.assert_array_equal(restored.params["w"], 4.0)
  # The next save of that step succeeds despite the leftover.
  ckpt.save(8, _state(8.0))
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8]
  restored, step = ckpt.restore(_state(0.0))
  assert step == 8
  np.testing.assert_array_equal(restored.params["w"], 8.0)
  ckpt.close()
