"""Test set-up: 8 simulated CPU devices and one XLA compilation cache.

Both are environment variables, set before JAX initialises (hence here), so
the CLI subprocesses the tests start inherit them too.

* ``--xla_force_host_platform_device_count=8``: sharding tests run on any
  machine; plus ``child_env.COMPILE_FLAGS`` (LLVM -O0: tiny programs,
  compile time dominates). Child processes get theirs from
  ``child_env.child_env``.
* ``JAX_COMPILATION_CACHE_DIR``: many tests compile the same tiny programs
  (every entry point's resume run, the reliability tests' reference and
  killed runs, both xdist workers). A fresh directory per test session,
  shared by the workers and every subprocess, lets the second compile of a
  program be a read. On the 2-core CI machine a tiny CLI run goes from 36 s
  to 15 s on a hit. The session removes the directory at the end. Setting
  the variable yourself (e.g. to a lasting directory) overrides this.
"""

import os
import shutil
import tempfile

import child_env  # pylint: disable=g-import-not-at-top,wrong-import-position

os.environ.setdefault("XLA_FLAGS", child_env.xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The controller runs this first and the xdist workers inherit the variable,
# so only the process that made the directory removes it.
_MADE_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _MADE_CACHE_DIR = tempfile.mkdtemp(prefix="jaxda-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _MADE_CACHE_DIR
# Cache everything but trivial programs (the default skips < 1 s compiles,
# most of the tiny models' programs).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# A size bound turns on JAX's LRU mode, which takes a file lock around each
# read and write: two processes compiling the same program at once must not
# read each other's half-written entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

# Same allocator policy as the entry points (before JAX starts its threads).
from jaxda import host_memory  # pylint: disable=g-import-not-at-top,wrong-import-position

host_memory.keep_freed_memory()


def pytest_unconfigure(config):
  del config
  if _MADE_CACHE_DIR:
    shutil.rmtree(_MADE_CACHE_DIR, ignore_errors=True)


# ---------------------------------------------------------------------------
# One data cache per test run, shared by both xdist workers.
# ---------------------------------------------------------------------------

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def shared_data_cache(tmp_path_factory):
  """One embedded-data cache for the whole run, both xdist workers.

  ``getbasetemp().parent`` is the directory both workers' base temps live
  in. The generators write each file to a temporary name and rename it, so
  two workers filling the cache at once is safe without a lock.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  path = root / "shared_data_cache"
  path.mkdir(parents=True, exist_ok=True)
  return str(path)


# ---------------------------------------------------------------------------
# xdist scheduling (setup.cfg runs `--dist loadgroup`).
# ---------------------------------------------------------------------------

# Tests that share a module-scoped fixture run on one worker, so the
# fixture is built once: {(test file, fixture): xdist group}.
_FIXTURE_GROUPS = {
    ("test_reliability.py", "reference"): "reliability_reference",
    ("test_multiprocess.py", "two_process_run"): "two_process_run",
    ("test_performance_switches.py", "fp32_step"): "tiny_steps",
    ("test_performance_switches.py", "frozen_bn_step"): "tiny_steps",
    ("test_data.py", "scenes"): "scenes",
}
# Whole files on one worker: their in-process CLI runs compile the same
# programs, which the worker then keeps in memory.
_FILE_GROUPS = {"test_end_to_end.py": "end_to_end"}
# The longest chains go first, so they start at once and on different
# workers; everything else fills in around them. Entries with "::" match
# test ids (a prefix is enough), the others xdist groups.
_FIRST = ("test_reliability.py::test_sigkill_across_a_tpld_round_boundary",
          "reliability_reference", "two_process_run", "end_to_end",
          "test_lowering.py::test_every_method_lowers_for_cuda_and_tpu",
          "test_anchor.py::test_cli_two_phases_resume_across_boundary",
          "test_gam.py::test_cli_tiny_end_to_end",
          "test_daformer_method.py::test_cli_tiny_runs_and_resumes",
          "test_real_datasets.py::test_train_gta5_to_cityscapes_layout",
          "test_multiprocess.py::test_grad_accumulation_equals_the_larger",
          "test_methods.py::test_step_runs_and_sharded_equals_single_device",
          "tiny_steps")


# tryfirst: xdist's worker hook turns the xdist_group markers into node-id
# suffixes (what loadgroup schedules by); it is registered after this
# conftest, so without tryfirst it runs first and sees no marker, and each
# group's module fixture is built once per worker.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  del config
  def group_of(item):
    name = os.path.basename(str(item.fspath))
    group = _FILE_GROUPS.get(name)
    for fixture in getattr(item, "fixturenames", ()):
      group = _FIXTURE_GROUPS.get((name, fixture), group)
    return group
  for item in items:
    group = group_of(item)
    if group:
      item.add_marker(pytest.mark.xdist_group(group))
  def rank(item):
    group = group_of(item)
    for i, key in enumerate(_FIRST):
      if key == group or ("::" in key and key in item.nodeid):
        return i
    return len(_FIRST)
  items.sort(key=rank)  # stable: collection order within a rank
