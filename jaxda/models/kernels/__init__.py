"""jaxda.models.kernels: hand-written kernels measured on XLA:CPU.

Which platform each applies to: `platform.py` (one table).
"""
