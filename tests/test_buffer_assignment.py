"""benchmarks.buffer_assignment == compiled.memory_analysis(), to the byte.

The MIC(HRDA) MiT-B5 paper step's memory comes from its buffer-assignment
dump (its code generation does not fit this host). The check: a child
process compiles a step with donated and non-donated arguments, several
outputs and large temporaries, with ``--xla_dump_to``; the dump's totals
must equal ``memory_analysis()``'s fields of the same compile.
"""

import json
import os
import subprocess
import sys

from benchmarks import buffer_assignment
from tests import child_env

_PROBE = r"""
import functools, json
import jax, jax.numpy as jnp
from jaxda import parallel

@functools.partial(jax.jit, donate_argnums=(0,))
def step(params, images, weights):
  h = jnp.tanh(images @ weights)               # (64, 512) temporaries
  g = jnp.cumsum(h * h, axis=0)                # another live temporary
  loss = jnp.mean(g) + jnp.sum(params['w'] ** 2)
  new = jax.tree.map(lambda p: p - 0.1 * loss * p, params)
  return new, loss, h[:2]                      # donated, scalar, small

params = {'w': jnp.ones((256, 128)), 'b': jnp.zeros((128,))}
c = step.lower(params, jnp.ones((64, 300)), jnp.ones((300, 512))).compile()
m = c.memory_analysis()
print(json.dumps({'argument_bytes': m.argument_size_in_bytes,
                  'output_bytes': m.output_size_in_bytes,
                  'temp_bytes': m.temp_size_in_bytes,
                  'alias_bytes': m.alias_size_in_bytes,
                  'total_bytes': parallel.compiled_bytes(c)}))
"""


def test_dump_totals_equal_memory_analysis(tmp_path):
  env = child_env.child_env(JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] += (f" --xla_dump_to={tmp_path}"
                       " --xla_dump_hlo_module_re=jit_step")
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, check=True,
                       capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
  want = json.loads(out.stdout.strip().splitlines()[-1])
  dumps = [p for p in tmp_path.iterdir()
           if p.name.endswith("after_optimizations-buffer-assignment.txt")]
  assert len(dumps) == 1, sorted(p.name for p in tmp_path.iterdir())
  got = buffer_assignment.read(str(dumps[0]))
  assert want["alias_bytes"] > 0 and want["temp_bytes"] > 0  # all parts seen
  assert got == want


def test_totals_classify_allocations():
  lines = [
      "allocation 0: size 100, parameter 0, shape |f32[25]| at ShapeIndex {},"
      " maybe-live-out:",                                    # donated
      "allocation 1: size 40, parameter 1, shape |f32[10]| at ShapeIndex {}:",
      "allocation 2: size 8, maybe-live-out:",              # fresh output
      "allocation 3: size 1000, preallocated-temp:",
      "allocation 4: size 16, constant:",
      "allocation 5: size 64, thread-local:",
      " value: <1 add.2 @0> (size=100,offset=0): f32[25]{0}",
  ]
  assert buffer_assignment.totals(lines) == {
      "argument_bytes": 140, "output_bytes": 108, "temp_bytes": 1000,
      "alias_bytes": 100, "total_bytes": 140 + 108 + 1000 - 100}
