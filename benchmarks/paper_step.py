"""Compile time, step time, memory and FLOPs of one paper-scale train step.

Run (paper size: DeepLab-v2 ResNet-101, multi-level, two FC discriminators
with ndf 64, batch 1 per domain, 512x1024 source and target images):

  python -m benchmarks.paper_step --out DIR
  python -m benchmarks.paper_step --out DIR --height 128 --width 256  # quick

The configuration is the method's ``paper`` preset
(``experiments/configs/<method>.py``) with the image size overridden; the
models, optimisers, train state and jitted step are built directly the way
``jaxda.train.loop.setup`` builds them (same frozen-parameter regexes), but on
random float32 images and random labels (a few rows set to 255, ignored)
instead of a dataset. Parameters are initialised at a small spatial size
(the networks are fully convolutional, so parameter shapes do not depend on
it); the parameters are random, not pretrained, which changes no timing.

Measured on one device (the first of the default backend):

1. XLA compile time of ``jaxda.parallel.jit_step(step)``: trace, lower and
   compile timed separately (``jit(...).trace(...).lower().compile()``).
2. Step time: one warm-up call, then the median of ``--repeats`` calls, each
   followed by ``jax.block_until_ready`` (the state is donated and rebound).
3. ``compiled.memory_analysis()`` (temp / argument / output / alias bytes)
   and ``compiled.cost_analysis()`` FLOPs and bytes accessed, plus the
   process's peak resident memory after each phase.
4. Parameter counts (segmenter total / trained / frozen / heads,
   discriminators, BatchNorm statistics, optimiser state).

Every repeat and the machine info go to DIR/paper_step.json.
"""

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxda import host_memory
from jaxda import models as models_lib
from jaxda import optim
from jaxda import parallel
from jaxda import state as state_lib
from jaxda.methods import base
from jaxda.methods import get_method
from jaxda.models import forward
from jaxda.types import IGNORE_LABEL

# method -> (config module under experiments/configs, extra variant). Methods
# that need pseudo labels (CBST, CRST, TPLD) have a different batch contract
# and are left out.
_CONFIGS = {
    "adaptsegnet": ("adaptsegnet", ""),
    "advent": ("advent", ""),
    "minent": ("advent", "minent"),
    "source_only": ("source_only", ""),
    "oracle": ("oracle", ""),
}


# ---------------------------------------------------------------------------
# Building the step
# ---------------------------------------------------------------------------


def paper_config(method: str, variant: str, height: int, width: int,
                 compute_dtype: str | None = None, remat: bool | None = None,
                 conv_impl: str | None = None, bn_mode: str | None = None):
  """The method's ``paper`` preset (plus ``variant``) at ``height x width``.

  ``compute_dtype`` / ``remat`` / ``conv_impl`` / ``bn_mode`` override
  ``config.model``'s switches.
  """
  module, extra = _CONFIGS[method]
  variants = ",".join(v for v in ("paper", extra, variant) if v)
  config = importlib.import_module(
      f"experiments.configs.{module}").get_config(variants)
  config.data.height = height
  config.data.width = width
  if compute_dtype is not None:
    config.model.compute_dtype = compute_dtype
  if remat is not None:
    config.model.remat = remat
  if conv_impl is not None:
    config.model.conv_impl = conv_impl
  if bn_mode is not None:
    config.model.bn_mode = bn_mode
  return config


def frozen_regexes(config) -> list[str]:
  """Parameter-path regexes never updated, as the segmentation task has them."""
  return models_lib.segmenter_frozen_regexes(config)


def build(config, num_classes: int, init_size: int, seed: int,
          weights: dict | None = None):
  """Models, optimisers, replicated train state and the jitted step.

  Args:
    config: a ``paper_config``.
    num_classes: classes C.
    init_size: spatial size of the init dummy input.
    seed: parameter init seed.
    weights: optional ``{'params', 'batch_stats', 'disc_params'}`` used
      instead of the random init (e.g. converted PyTorch weights).

  Returns:
    ``(state, step_jit, labels_fn, method, mesh)``.
  """
  method = get_method(config.method)
  precision = forward.precision_options(config)
  segmenter = models_lib.create_segmenter(
      config.model.name, num_classes, multi_level=config.model.multi_level,
      aspp_branches_used=config.model.aspp_branches_used,
      remat=config.model.remat,
      remat_impl=config.model.get("remat_impl", "gated"), **precision)
  sched = config.optim.schedule_steps
  schedule_steps = config.num_steps if sched in (-1, None) else sched
  disc = disc_tx = None
  levels = ()
  if method.discriminator_inputs != "none":
    disc = models_lib.create_discriminator(config.adversarial.ndf).clone(
        **precision)
    disc_tx = optim.make_discriminator_tx(
        learning_rate=config.adversarial.learning_rate,
        schedule_steps=schedule_steps, b1=config.adversarial.b1,
        b2=config.adversarial.b2, power=config.optim.power)
    levels = base.output_levels(config)
  tx, labels_fn = optim.make_segmenter_tx(
      learning_rate=config.optim.learning_rate,
      schedule_steps=schedule_steps, momentum=config.optim.momentum,
      weight_decay=config.optim.weight_decay, power=config.optim.power,
      head_regexes=(models_lib.head_param_regex,),
      head_lr_mult=config.optim.head_lr_mult,
      frozen_regexes=frozen_regexes(config),
      optimizer=config.optim.optimizer)
  mesh = parallel.make_mesh(1)
  seg_key, disc_key = jax.random.split(jax.random.key(seed))

  def init():
    # Parameter shapes do not depend on the spatial size: init small.
    variables = segmenter.init(
        seg_key, jnp.zeros((1, init_size, init_size, 3), jnp.float32))
    disc_params = {
        level: disc.init(
            jax.random.fold_in(disc_key, i),
            jnp.zeros((1, init_size, init_size, num_classes)))["params"]
        for i, level in enumerate(levels)}
    if weights is not None:
      variables = {"params": weights["params"],
                   "batch_stats": weights["batch_stats"]}
      disc_params = weights["disc_params"]
    return state_lib.TrainState.create(
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}), tx=tx,
        disc_params=disc_params, disc_tx=disc_tx)

  state = jax.jit(init, out_shardings=parallel.replicated(mesh))()
  step = method.make_step(base.Models(segmenter, disc), config, tx, disc_tx)
  return state, parallel.jit_step(step, mesh), labels_fn, method, mesh


def random_batch(method, batch_size: int, height: int, width: int,
                 num_classes: int, seed: int) -> dict:
  """Random float32 images (B, H, W, 3) and int32 labels (B, H, W).

  The first eighth of the rows of every label map is 255 (ignored).
  """
  rng = np.random.default_rng(seed)

  def domain(with_label):
    d = {"image": rng.normal(size=(batch_size, height, width, 3))
                     .astype(np.float32)}
    if with_label:
      labels = rng.integers(0, num_classes, (batch_size, height, width))
      labels[:, :max(1, height // 8)] = IGNORE_LABEL
      d["label"] = labels.astype(np.int32)
    return d

  batch = {"source": domain(True)}
  if method.uses_target_images:
    batch["target"] = domain(method.target_labels == "ground_truth")
  return batch


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _size(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                 if hasattr(x, "dtype")))


def parameter_counts(state, labels_fn) -> dict:
  """Element counts of the state's parts (trained / frozen via the labels)."""
  labels = labels_fn(state.params)
  trained = jax.tree.leaves(jax.tree.map(
      lambda lab, p: np.size(p) if lab == optim.TRAIN else 0,
      labels, state.params))
  heads = jax.tree.leaves(optim.path_mask(state.params,
                                          [models_lib.head_param_regex]))
  sizes = [np.size(p) for p in jax.tree.leaves(state.params)]
  counts = {
      "segmenter": _size(state.params),
      "segmenter_trained": int(sum(trained)),
      "segmenter_frozen": _size(state.params) - int(sum(trained)),
      "segmenter_heads": int(sum(s for s, h in zip(sizes, heads) if h)),
      "batch_stats": _size(state.batch_stats),
      "discriminators": {k: _size(v) for k, v in state.disc_params.items()},
      "discriminators_total": _size(state.disc_params),
      "optimizer_state": _size(state.opt_state),
      "disc_optimizer_state": _size(state.disc_opt_state),
  }
  counts["state_bytes"] = _bytes(state)
  return counts


def _peak_rss_bytes() -> int:
  # ru_maxrss is in kilobytes on Linux, bytes on macOS.
  scale = 1 if sys.platform == "darwin" else 1024
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def memory_stats(compiled) -> dict:
  """Every ``*_in_bytes`` field of ``compiled.memory_analysis()``."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  return {name: int(getattr(stats, name)) for name in dir(stats)
          if name.endswith("_in_bytes")}


def xla_total_bytes(mem: dict) -> int:
  """Buffers live during the call: arguments + outputs - donated + temps."""
  return (mem["argument_size_in_bytes"] + mem["output_size_in_bytes"]
          - mem["alias_size_in_bytes"] + mem["temp_size_in_bytes"])


def cost_stats(compiled) -> dict:
  """FLOPs, transcendentals and bytes accessed of ``cost_analysis()``."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per module
    cost = cost[0] if cost else None
  if not cost:
    return {}
  return {k: float(cost[k]) for k in
          ("flops", "transcendentals", "bytes accessed") if k in cost}


def compile_timed(step_jit, state, batch, rng) -> tuple:
  """AOT-compiles ``step_jit``; returns (compiled, {trace/lower/compile/total_s})."""
  t0 = time.perf_counter()
  traced = step_jit.trace(state, batch, rng)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  return compiled, {"trace_s": t1 - t0, "lower_s": t2 - t1,
                    "compile_s": t3 - t2, "total_s": t3 - t0}


def write_report(out_dir: str, filename: str, report: dict,
                 print_table) -> str:
  """Writes ``report`` as JSON under ``out_dir``, prints its table."""
  path = os.path.join(out_dir, filename)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, default=str)
  print_table(report)
  print(f"wrote {path}")
  return path


def _cpu_model() -> tuple[str, list[str]]:
  """CPU model name and its matrix/vector flags from /proc/cpuinfo (Linux).

  `platform.processor()` is empty on many Linux machines, and the shared
  CI/bench machines differ (an AMX Xeon and an AVX-512-BF16 EPYC have very
  different bf16 speeds), so the report names the CPU.
  """
  name, flags = "", []
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
          name = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = sorted(v for v in value.split()
                         if v.startswith(("amx", "avx512_bf16", "avx512f")))
  except OSError:
    pass
  return name, flags


def machine_info() -> dict:
  cpu_model, cpu_flags = _cpu_model()
  return {
      "platform": platform.platform(),
      "processor": platform.processor() or cpu_model,
      "cpu_model": cpu_model,
      "cpu_flags": cpu_flags,
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "cpus_usable": (len(os.sched_getaffinity(0))
                      if hasattr(os, "sched_getaffinity") else None),
      "load_average_at_start": (list(os.getloadavg())
                                if hasattr(os, "getloadavg") else None),
      "niceness": os.nice(0) if hasattr(os, "nice") else None,
      "jax": jax.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "numpy": np.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "host_memory": host_memory.status(),
  }


def bench(args, save=lambda report: None) -> dict:
  """Builds the step, compiles it, runs it; returns the report dict.

  ``save(report)`` is called after every phase and every repeat, so a run
  stopped early (a paper-size step takes minutes on a laptop CPU) still
  leaves its compile time, memory and FLOPs on disk.
  """
  config = paper_config(args.method, args.variant, args.height, args.width,
                        args.compute_dtype, args.remat, args.conv_impl,
                        args.bn_mode)
  parallel.check_batch_size(args.batch_size, parallel.make_mesh(1))
  report = {"machine": machine_info(), "args": vars(args),
            "config": config.to_dict(), "complete": False,
            "rss_peak_bytes": {}}

  t0 = time.perf_counter()
  state, step_jit, labels_fn, method, mesh = build(
      config, args.num_classes, args.init_size, args.seed)
  jax.block_until_ready(state)
  report["init_s"] = time.perf_counter() - t0
  report["params"] = parameter_counts(state, labels_fn)
  report["rss_peak_bytes"]["after_init"] = _peak_rss_bytes()
  _log(f"state built in {report['init_s']:.1f} s; compiling")

  batch = parallel.shard_batch(
      random_batch(method, args.batch_size, args.height, args.width,
                   args.num_classes, args.seed), mesh)
  rng = jax.random.key(args.seed)

  compiled, report["compile"] = compile_timed(step_jit, state, batch, rng)
  report["rss_peak_bytes"]["after_compile"] = _peak_rss_bytes()
  report["memory_analysis"] = memory_stats(compiled)
  if report["memory_analysis"]:
    report["memory_analysis"]["total_live_bytes"] = xla_total_bytes(
        report["memory_analysis"])
  report["cost_analysis"] = cost_stats(compiled)
  report["step"] = {"warmup_s": None, "times_s": []}
  save(report)
  _log(f"compiled in {report['compile']['total_s']:.1f} s; running 1 +"
       f" {args.repeats} steps")

  def run_once():
    nonlocal state
    start = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - start, metrics

  warmup_s, metrics = run_once()
  report["step"]["warmup_s"] = warmup_s
  report["rss_peak_bytes"]["after_warmup"] = _peak_rss_bytes()
  save(report)
  _log(f"warm-up step {warmup_s:.2f} s")
  times = report["step"]["times_s"]
  for i in range(args.repeats):
    t, metrics = run_once()
    times.append(t)
    save(report)
    _log(f"repeat {i + 1}/{args.repeats}: {t:.2f} s")
  median = statistics.median(times) if times else warmup_s
  report["step"].update(median_s=median, min_s=min(times or [warmup_s]))
  flops = report["cost_analysis"].get("flops")
  if flops:
    report["step"]["achieved_gflops_per_s"] = flops / median / 1e9
  report["rss_peak_bytes"]["after_steps"] = _peak_rss_bytes()
  host = parallel.to_host(metrics)
  report["last_metrics"] = {k: float(np.mean(v)) for k, v in host.items()}
  report["metrics_finite"] = bool(all(np.all(np.isfinite(v))
                                      for v in host.values()))
  report["final_step"] = int(parallel.to_host(state.step))
  report["complete"] = True
  return report


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--method", default="adaptsegnet",
                      choices=sorted(_CONFIGS))
  parser.add_argument("--variant", default="",
                      help="extra config presets after 'paper', e.g."
                           " 'faithful' or 'single_ls' (adaptsegnet)")
  parser.add_argument("--height", type=int, default=512)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--batch-size", type=int, default=1,
                      help="images per domain (paper: 1)")
  parser.add_argument("--num-classes", type=int, default=19,
                      help="19 = the Cityscapes label set of GTA5->Cityscapes")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--init-size", type=int, default=64,
                      help="spatial size of the parameter-init dummy input")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--compute-dtype", default="float32",
                      choices=("float32", "bfloat16"),
                      help="config.model.compute_dtype")
  parser.add_argument("--conv-impl", default=None,
                      choices=("auto", "lax", "dot"),
                      help="config.model.conv_impl (default: the config's)")
  parser.add_argument("--bn-mode", default=None,
                      choices=("frozen", "train", "source"),
                      help="config.model.bn_mode (default: the preset's;"
                      " AdaptSegNet's paper preset trains BN, 'train')")
  parser.add_argument("--remat", action="store_true",
                      help="config.model.remat (recompute backbone blocks)")
  parser.add_argument("--memory-only", action="store_true",
                      help="only compile, for every compute_dtype x remat"
                           " combination, and report memory_analysis()")
  return parser.parse_args(argv)


def _mb(x) -> str:
  return f"{x / 2**20:,.1f} MiB"


def print_report(report) -> None:
  m, a = report["machine"], report["args"]
  p, c, s = report["params"], report["compile"], report["step"]
  mem, cost = report["memory_analysis"], report["cost_analysis"]
  cfg = report["config"]
  print(f"machine: {m['processor'] or 'cpu'}, {m['cpus_usable']} usable of"
        f" {m['cpu_count']} cores, backend {m['backend']}, jax {m['jax']},"
        f" load {m['load_average_at_start']}")
  print(f"{a['method']} paper step: {cfg['model']['name']},"
        f" multi_level={cfg['model']['multi_level']},"
        f" bn_mode={cfg['model']['bn_mode']}, ndf {cfg['adversarial']['ndf']},"
        f" batch {a['batch_size']} x {a['height']}x{a['width']},"
        f" {a['num_classes']} classes")
  rows = [
      ("params: segmenter", f"{p['segmenter']:,}"),
      ("  trained / frozen",
       f"{p['segmenter_trained']:,} / {p['segmenter_frozen']:,}"),
      ("  ASPP heads (10x LR)", f"{p['segmenter_heads']:,}"),
      ("params: discriminators",
       ", ".join(f"{k} {v:,}" for k, v in p["discriminators"].items())
       or "none"),
      ("BN statistics", f"{p['batch_stats']:,}"),
      ("optimiser state (seg / D)",
       f"{p['optimizer_state']:,} / {p['disc_optimizer_state']:,}"),
      ("train state", _mb(p["state_bytes"])),
      ("trace", f"{c['trace_s']:.2f} s"),
      ("lower", f"{c['lower_s']:.2f} s"),
      ("XLA compile", f"{c['compile_s']:.2f} s"),
      ("step warm-up", f"{s['warmup_s']:.3f} s"),
      (f"step median of {len(s['times_s'])}",
       f"{s['median_s']:.3f} s  (all: "
       + ", ".join(f"{t:.3f}" for t in s["times_s"]) + ")"),
  ]
  for name in ("temp", "argument", "output", "alias", "generated_code"):
    key = f"{name}_size_in_bytes"
    if key in mem:
      rows.append((f"XLA {name}", _mb(mem[key])))
  if "total_live_bytes" in mem:
    rows.append(("XLA arg + out - alias + temp", _mb(mem["total_live_bytes"])))
  if "flops" in cost:
    rows.append(("XLA FLOPs / step", f"{cost['flops'] / 1e12:.3f} TFLOP"))
  if "bytes accessed" in cost:
    rows.append(("XLA bytes accessed",
                 f"{cost['bytes accessed'] / 1e9:.2f} GB"))
  if "achieved_gflops_per_s" in s:
    rows.append(("achieved", f"{s['achieved_gflops_per_s']:.1f} GFLOP/s"))
  for phase, value in report["rss_peak_bytes"].items():
    rows.append((f"peak RSS {phase}", _mb(value)))
  rows.append(("metrics finite", str(report["metrics_finite"])))
  width = max(len(r[0]) for r in rows)
  for name, value in rows:
    print(f"  {name:<{width}}  {value}")


SWITCHES = (("float32", False), ("float32", True), ("bfloat16", False),
            ("bfloat16", True))


def memory_table(args, save=lambda report: None) -> dict:
  """Compiles the step for every (compute_dtype, remat); XLA memory each.

  Nothing runs: ``compiled.memory_analysis()`` is XLA's buffer assignment,
  the same numbers a run would allocate (arguments + outputs - donated +
  temporaries), so the paper-size table takes minutes, not hours.

  Returns:
    ``{'machine', 'args', 'switches': [{compute_dtype, remat, compile_s,
    memory_analysis, cost_analysis}], 'ratio_bf16_remat_vs_fp32'}``.
  """
  report = {"machine": machine_info(), "args": vars(args), "switches": []}
  for dtype, remat in SWITCHES:
    config = paper_config(args.method, args.variant, args.height, args.width,
                          dtype, remat, args.conv_impl, args.bn_mode)
    t0 = time.perf_counter()
    state, step_jit, _, method, mesh = build(
        config, args.num_classes, args.init_size, args.seed)
    batch = parallel.shard_batch(
        random_batch(method, args.batch_size, args.height, args.width,
                     args.num_classes, args.seed), mesh)
    compiled = step_jit.lower(state, batch, jax.random.key(0)).compile()
    mem = memory_stats(compiled)
    mem["total_live_bytes"] = xla_total_bytes(mem)
    report["switches"].append({
        "compute_dtype": dtype, "remat": remat,
        "compile_s": time.perf_counter() - t0, "memory_analysis": mem,
        "cost_analysis": cost_stats(compiled)})
    _log(f"{dtype} remat={remat}: temp {_mb(mem['temp_size_in_bytes'])},"
         f" live {_mb(mem['total_live_bytes'])}")
    del state, step_jit, compiled
    save(report)
  live = {(r["compute_dtype"], r["remat"]):
          r["memory_analysis"]["total_live_bytes"] for r in report["switches"]}
  report["ratio_bf16_remat_vs_fp32"] = (
      live[("bfloat16", True)] / live[("float32", False)])
  return report


def print_memory_table(report) -> None:
  a = report["args"]
  print(f"{a['method']} step, {a['batch_size']} x {a['height']}x{a['width']},"
        " XLA memory_analysis (MiB):")
  print(f"  {'compute':<9} {'remat':<6} {'temp':>10} {'args':>10}"
        f" {'live total':>11} {'vs fp32':>8}")
  base = report["switches"][0]["memory_analysis"]["total_live_bytes"]
  for r in report["switches"]:
    m = r["memory_analysis"]
    print(f"  {r['compute_dtype']:<9} {str(r['remat']):<6}"
          f" {m['temp_size_in_bytes'] / 2**20:>10.1f}"
          f" {m['argument_size_in_bytes'] / 2**20:>10.1f}"
          f" {m['total_live_bytes'] / 2**20:>11.1f}"
          f" {m['total_live_bytes'] / base:>8.2f}")


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.memory_only:
    path = os.path.join(args.out, "paper_memory.json")
    save = lambda r: _write_json(path, r)
    report = memory_table(args, save)
    save(report)
    print_memory_table(report)
    print(f"wrote {path}")
    return report
  path = os.path.join(args.out, "paper_step.json")
  save = lambda r: _write_json(path, r)
  report = bench(args, save)
  save(report)
  print_report(report)
  print(f"wrote {path}")
  return report


def _write_json(path: str, report: dict) -> None:
  # Write-then-rename: a run killed mid-write keeps the previous snapshot.
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, default=str)
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  main()
