"""The environment of a test's child process (a CLI run, a worker).

Every test process compiles with ``COMPILE_FLAGS`` (conftest sets them for
the pytest processes): the tests' programs are tiny, so XLA's LLVM
optimisation costs more than it saves. Measured on the 2-core CI machine:
the adaptsegnet sharded-step test 47.8 s -> 28.8 s and the TPLD pipeline
test 65 s -> 44 s (tests/README.md). The compiled programs compute the same
operations (no fast-math), so numerics tests keep their tolerances.
"""

from __future__ import annotations

import os

# LLVM -O0 for the CPU backend: compile time, not run time, dominates here.
COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(num_devices: int | None = None) -> str:
  """XLA_FLAGS for ``num_devices`` simulated CPU devices (None: one)."""
  flags = [COMPILE_FLAGS]
  if num_devices is not None:
    flags.insert(0, f"--xla_force_host_platform_device_count={num_devices}")
  return " ".join(flags)


def child_env(num_devices: int | None = None, **overrides: str) -> dict:
  """``os.environ`` with XLA_FLAGS for ``num_devices`` and ``overrides``.

  None devices: one CPU device, what a CPU user gets.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(num_devices)
  env.update(overrides)
  return env
