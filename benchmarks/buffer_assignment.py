"""A compiled step's device bytes from XLA's buffer-assignment dump.

XLA writes ``<module>.<backend>_after_optimizations-buffer-assignment.txt``
(with ``XLA_FLAGS=--xla_dump_to=DIR``) as soon as buffers are assigned,
before code generation. For a step whose code generation exhausts the
host (the MIC(HRDA) MiT-B5 paper step on a 23 GB machine), the dump
still gives what ``compiled.memory_analysis()`` would: arguments +
outputs + temporaries - donated aliases (``jaxda.parallel.compiled_bytes``),
equal to the byte (``tests/test_buffer_assignment.py``).

  python -m benchmarks.buffer_assignment DIR/module_*.jit_step.cpu_after_optimizations-buffer-assignment.txt[.gz]
"""

from __future__ import annotations

import gzip
import json
import re
import sys

# "allocation 12: size 4096, parameter 3, shape |f32[1024]| at ShapeIndex {}, maybe-live-out:"
_ALLOCATION = re.compile(r"allocation \d+: size (\d+), (.*)")


def totals(lines) -> dict[str, int]:
  """Byte counts of one buffer assignment, as ``memory_analysis()`` names
  them: ``argument`` (parameter allocations), ``output`` (maybe-live-out
  allocations), ``temp`` (the preallocated temporary block), ``alias``
  (parameters that are also outputs, i.e. donated) and ``total``."""
  arg = out = temp = alias = 0
  for line in lines:
    m = _ALLOCATION.match(line)
    if not m:
      continue
    size, rest = int(m.group(1)), m.group(2).rstrip()
    is_param = rest.startswith("parameter ")
    live_out = rest.endswith("maybe-live-out:")
    arg += size if is_param else 0
    out += size if live_out else 0
    alias += size if is_param and live_out else 0
    temp += size if rest.startswith("preallocated-temp") else 0
  return {"argument_bytes": arg, "output_bytes": out, "temp_bytes": temp,
          "alias_bytes": alias, "total_bytes": arg + out + temp - alias}


def read(path: str) -> dict[str, int]:
  """``totals`` of a dump file (plain or gzip)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return totals(f)


def main(argv=None) -> int:
  paths = (argv if argv is not None else sys.argv[1:])
  if not paths:
    print("usage: python -m benchmarks.buffer_assignment DUMP.txt[.gz] ...",
          file=sys.stderr)
    return 2
  for path in paths:
    result = read(path)
    result["total_gib"] = round(result["total_bytes"] / 2 ** 30, 3)
    print(json.dumps({"file": path, **result}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
