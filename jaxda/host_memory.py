"""Host allocator policy: keep freed memory for the next step (glibc only).

XLA:CPU allocates each execution's temporaries as one large buffer when a
step starts and frees it when the step ends; glibc serves that with a fresh
``mmap`` / ``munmap``, so every step page-faults (and the kernel zeroes) its
whole working set again. The allocations come from XLA's worker threads,
whose arenas have a size limit, so all three settings below are needed.

``keep_freed_memory()`` sets, through ``mallopt``:

* ``M_ARENA_MAX = 1``: every thread allocates from the main arena, which
  grows with ``brk`` and has no size limit;
* ``M_MMAP_MAX = 0``: no allocation is served by its own ``mmap``;
* ``M_TRIM_THRESHOLD = SIZE_MAX``: freed memory at the top of the heap is
  not given back to the kernel.

The next step then reuses the heap's pages. Cost: the process keeps its peak
heap size until it exits (a training process reaches it on its first step
anyway), and threads share one arena lock.

Call it before JAX runs anything: a thread keeps the arena it got at its
first allocation. The experiment entry points, the benchmarks and the test
suite call it first. ``JAXDA_KEEP_FREED_MEMORY=0`` turns it off; a
``GLIBC_TUNABLES`` that already sets ``glibc.malloc.*`` wins over it.
Platforms: the host process's glibc allocator, whatever the JAX backend.
It pays on cpu, where XLA:CPU's step buffers live in host memory; on
cuda / rocm / tpu the device allocator holds them and only host-side arrays
(input batches) use this heap: harmless there, not measured (table:
``jaxda/models/kernels/platform.py``). Written by hand: neither JAX nor XLA
exposes an allocator setting. Measurements: benchmarks/NOTES.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV_VAR = "JAXDA_KEEP_FREED_MEMORY"

# <malloc.h> parameter numbers (stable glibc ABI).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

_applied: dict | None = None


def _libc():
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None


def keep_freed_memory() -> dict:
  """Applies the policy above once per process; returns what it did.

  Returns:
    ``{'applied': bool, 'reason': str}`` plus, when applied, the settings.
    Safe to call many times and on any platform (a no-op off glibc).
  """
  global _applied
  if _applied is not None:
    return dict(_applied)
  if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no"):
    _applied = {"applied": False, "reason": f"{ENV_VAR}=0"}
  elif "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
    _applied = {"applied": False, "reason": "GLIBC_TUNABLES sets malloc"}
  else:
    libc = _libc()
    if libc is None:
      _applied = {"applied": False, "reason": "not glibc"}
    else:
      settings = {"M_ARENA_MAX": (M_ARENA_MAX, 1),
                  "M_MMAP_MAX": (M_MMAP_MAX, 0),
                  # mallopt takes an int; glibc converts -1 to SIZE_MAX.
                  "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, -1)}
      ok = all(libc.mallopt(param, value) == 1
               for param, value in settings.values())
      _applied = {"applied": ok,
                  "reason": "mallopt" if ok else "mallopt refused",
                  **{k: v for k, (_, v) in settings.items()}}
  return dict(_applied)


def status() -> dict:
  """What ``keep_freed_memory`` did in this process (``{}`` if not called)."""
  return dict(_applied or {})
