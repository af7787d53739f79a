"""Test set-up: 8 simulated CPU devices and one XLA compilation cache.

Both are environment variables, set before JAX initialises (hence here), so
the CLI subprocesses the tests start inherit them too.

* ``--xla_force_host_platform_device_count=8``: sharding tests run on any
  machine.
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

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
