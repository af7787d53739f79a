"""Which platform each hand-written kernel trick applies to, in one table.

Every trick in `jaxda.models.kernels` (and `jaxda.host_memory`) was measured
on XLA:CPU only (benchmarks/NOTES.md). On GPU and TPU nothing has been
measured yet, so there the code runs XLA's own ops (cuDNN / the MXU's
convolution emitter), the "fastest measured choice" until a measurement on
that platform says otherwise.

The choice is made when the step is *lowered*, not when it is traced:
`per_platform` stages every rule's branch with `lax.platform_dependent`,
so one traced step lowers correctly for each of `jit(f).trace(...).lower(
lowering_platforms=(p,))` (which `jax.default_backend()` at trace time
cannot see). Lowered for one platform only the matching branch is emitted
and XLA inlines it: the CPU program is the one the CPU rules alone give.

RULES (platform -> what runs; a platform not listed takes 'default'):

=====================  ===========================  ======================
trick                  cpu                          cuda / rocm / tpu
=====================  ===========================  ======================
conv ``impl='auto'``   `conv.choose_impl` CPU       'lax' (XLA's conv) for
                       rules: 1×1 as matmul,        every conv
                       Winograd / taps / patches /
                       space-to-depth dot forms
explicit ``impl=``     as asked                     as asked (plain JAX,
('lax' 'dot' 'taps'                                 lowers everywhere;
'winograd')                                         for measuring)
`fusion.fusion_        runtime ``lax.cond``         identity
boundary`              (a real fusion boundary)
`matmul.weight_        bf16: x^T pinned row-major   plain ``dot_general``
gradient`              by a layout constraint
`remat.gated_remat`    all platforms (a data dependency, not a
/ `remat.after`        scheduling hint; memory measured on CPU only)
`host_memory`          the host process's glibc     same host process; the
                       allocator (XLA:CPU step      device allocator holds
                       buffers live there)          step buffers: not
                                                    measured, harmless
=====================  ===========================  ======================
"""

from collections.abc import Callable
from typing import Any

from jax import lax

# Platforms `lax.platform_dependent` names and this package has a rule for.
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')

# Platforms whose kernel rules were measured (benchmarks/NOTES.md).
MEASURED = ('cpu',)

# How a conv with impl='auto' runs, per platform (see the table above).
# 'cpu_rules' means `conv.choose_impl`'s measured XLA:CPU rules; 'lax' is
# XLA's own convolution.
CONV_AUTO = {'cpu': 'cpu_rules', 'cuda': 'lax', 'rocm': 'lax', 'tpu': 'lax'}
CONV_AUTO_DEFAULT = 'lax'

# Explicit `conv_impl`s a platform cannot run: platform -> {impl: what to
# set instead}. Empty: every form is plain JAX and lowers for cpu, cuda and
# tpu (tests/test_lowering.py checks it).
CONV_UNSUPPORTED: dict[str, dict[str, str]] = {}

# The CPU-only tricks besides convs: name -> platforms they apply to.
CPU_ONLY = {
    'fusion.fusion_boundary': ('cpu',),
    'matmul.weight_gradient layout constraint': ('cpu',),
    'conv auto dot forms (Winograd, taps, patches, space_to_depth, 1x1 '
    'matmul)': ('cpu',),
}


def conv_auto_rule(platform: str) -> str:
  """'cpu_rules' or 'lax': how 'auto' convs run on `platform`."""
  return CONV_AUTO.get(platform, CONV_AUTO_DEFAULT)


def check_conv_impl(impl: str, platform: str) -> None:
  """Raises a one-line ValueError if `platform` cannot run `impl`."""
  instead = CONV_UNSUPPORTED.get(platform, {}).get(impl)
  if instead is not None:
    raise ValueError(
        f"conv impl {impl!r} does not run on {platform}; set"
        f" config.model.conv_impl={instead!r}")


def per_platform(branches: dict[str, Callable[..., Any]],
                 default: Callable[..., Any], *args: Any) -> Any:
  """``branches[p](*args)`` on platform p, ``default(*args)`` elsewhere.

  Staged with `lax.platform_dependent`, resolved at lowering. Branches that
  are the same callable are emitted once; if every branch is `default`, no
  conditional is staged at all.

  Args:
    branches: platform name ('cpu', 'cuda', 'rocm', 'tpu') -> function.
    default: function for every other platform.
    *args: arrays (pytrees) passed to the chosen function.
  """
  distinct = {p: f for p, f in branches.items() if f is not default}
  if not distinct:
    return default(*args)
  return lax.platform_dependent(*args, default=default, **distinct)
