"""The host allocator policy: XLA's per-call buffers are reused, not faulted in."""

import json
import os
import platform
import subprocess
import sys

import pytest

from jaxda import host_memory

_PROBE = r"""
import json, resource, sys
from jaxda import host_memory
status = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
a = jnp.ones((65536, 256), jnp.float32)
w = jnp.full((256, 256), 1e-3, jnp.float32)
# a @ w is a 64 MiB temporary of every call (and the result another 64 MiB).
f = jax.jit(lambda a, w: jnp.tanh(a @ w) @ w)
for _ in range(2):
  jax.block_until_ready(f(a, w))
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  jax.block_until_ready(f(a, w))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 4
print(json.dumps({"status": status, "faults_per_call": faults}))
"""


def _probe(env_value: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env[host_memory.ENV_VAR] = env_value
  env.pop("GLIBC_TUNABLES", None)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, check=True,
                       capture_output=True, text=True, timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_policy_removes_the_page_faults_of_every_call():
  default = _probe("0")
  kept = _probe("1")
  assert default["status"] == {"applied": False,
                               "reason": f"{host_memory.ENV_VAR}=0"}
  assert kept["status"]["applied"] is True
  # glibc's default maps the 2 x 64 MiB afresh every call: ~32k faults.
  assert default["faults_per_call"] > 8000, default
  assert kept["faults_per_call"] < 0.1 * default["faults_per_call"], (
      default, kept)


def test_opt_out_and_glibc_tunables_win(monkeypatch):
  monkeypatch.setattr(host_memory, "_applied", None)
  monkeypatch.setenv(host_memory.ENV_VAR, "0")
  assert host_memory.keep_freed_memory()["applied"] is False
  assert host_memory.status()["reason"] == f"{host_memory.ENV_VAR}=0"
  monkeypatch.setattr(host_memory, "_applied", None)
  monkeypatch.delenv(host_memory.ENV_VAR)
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
  result = host_memory.keep_freed_memory()
  assert result == {"applied": False, "reason": "GLIBC_TUNABLES sets malloc"}
  # Asked again, the first answer stands (mallopt is called once at most).
  monkeypatch.delenv("GLIBC_TUNABLES")
  assert host_memory.keep_freed_memory() == result
