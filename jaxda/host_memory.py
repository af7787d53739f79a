"""Host allocator policy: keep freed memory for the next step (glibc only).

Why: XLA:CPU allocates every execution's temporaries (one buffer, ~2 GB for
the 256x512 AdaptSegNet step) when the step starts and frees them when it
ends. glibc serves an allocation that large with a fresh ``mmap`` and
returns it with ``munmap``, so every step page-faults its whole working set
again: the kernel zeroes each 4 KiB page on first touch. Measured on a
2-core AMD EPYC (benchmarks/NOTES.md): 600,000 page faults and 2 s of
kernel time per 11.5 s step; PyTorch's step 300,000. The allocations come
from XLA's worker threads, whose glibc arenas cannot hold them (64 MiB heaps),
so raising the mmap threshold alone does nothing: all three settings below
are needed.

``keep_freed_memory()`` sets, through ``mallopt``:

* ``M_ARENA_MAX = 1``: every thread allocates from the main arena, which
  grows with ``brk`` and has no size limit;
* ``M_MMAP_MAX = 0``: no allocation is served by its own ``mmap``;
* ``M_TRIM_THRESHOLD = SIZE_MAX``: freed memory at the top of the heap is
  not given back to the kernel.

The next step then reuses the heap's pages: the 256x512 step measured 0
faults per step (a small 64 MiB probe, while its heap was still settling,
between 0.25 and 25,000 per call against 33,000 without). Cost: the process
keeps its peak heap size until it exits (a training process reaches it on
its first step anyway), and threads share one arena lock.

Call it before JAX runs anything: a thread keeps the arena it got at its
first allocation (called after JAX's CPU client existed, a probe's faults
fell 4x instead of 20x). The experiment entry points, the benchmarks and the
test suite call it first. ``JAXDA_KEEP_FREED_MEMORY=0`` turns it off; a
``GLIBC_TUNABLES`` that already sets ``glibc.malloc.*`` wins over it.
Written by hand: neither JAX nor XLA exposes an allocator setting.
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
