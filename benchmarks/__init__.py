"""Benchmark scripts (``python -m benchmarks.<name> --out DIR``).

Importing the package applies jaxda's host allocator policy
(``jaxda.host_memory``) before any script touches JAX, as the experiment
entry points do, so both the jaxda and the PyTorch side of a comparison run
with it; ``JAXDA_KEEP_FREED_MEMORY=0`` measures glibc's default. Every
report records which was in force (``machine.host_memory``).
"""

from jaxda import host_memory

host_memory.keep_freed_memory()
