"""AdaptSegNet train step: jaxda (float32, bfloat16) vs the PyTorch original.

Run:

  python -m benchmarks.train_step_bench --out DIR                 # 256x512
  python -m benchmarks.train_step_bench --out DIR --sizes small,256x512
  python -m benchmarks.train_step_bench --out DIR --sizes 512x1024 --repeats 3

For every size, one process, one batch, the same weights:

1. The PyTorch reference (`benchmarks/torch_reference`: `ResNetMulti`,
   two `FCDiscriminator`s, `AdaptSegNetStep` = the original script's
   iteration) is built from a fixed seed; its state dicts are converted with
   `jaxda.weights.torch_import` into the jaxda train state (so parameter
   counts must agree leaf for leaf).
2. One step each on the same batch: the generator objective, the
   segmentation, adversarial and discriminator losses are compared
   (`loss_diff`, max abs difference), and so are the parameters after the
   update (`param_diff`).
3. XLA compile time (trace, lower, compile) of the fp32 and bf16 steps.
4. Timing: warm-up, then `--repeats` rounds; each round runs one step of
   every variant in a rotated order (jaxda fp32, jaxda bf16, torch), so
   load from other processes hits all of them alike. Medians are reported.
5. Achieved GFLOP/s: `cost_analysis()` FLOPs of the fp32 step / median time,
   for every variant, against this CPU's measured float32 matmul peak (the
   faster of PyTorch's and XLA's 4096^3 matmul).

Sizes: 'small' is the CPU config's network (`deeplabv2_tiny`, ndf 32,
batch 8 of 64x128); 'HxW' is the paper network (DeepLab-v2 ResNet-101,
multi-level, 4-branch ASPP, two FC discriminators with ndf 64, batch 1).
Both frameworks run BatchNorm the same way: with running statistics
(`--bn_mode=frozen`, the default and the setting of every committed
timing) or on batch statistics (`--bn_mode=train`, what the AdaptSegNet
paper preset and the original script run). The step-0 loss and parameter
comparison says whether the two steps computed the same thing
(`parity_ok`); a timing whose parity fails compares different work.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import paper_step
from jaxda import parallel
from jaxda.weights import torch_import

NUM_CLASSES = 19
PARITY_TOL = 1e-4  # max |loss difference| of the first step, fp32


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def parse_size(spec: str) -> dict:
  """'small' or 'HxW' -> {name, height, width, batch, arch, blocks, ...}."""
  if spec == "small":
    return {"name": "small", "height": 64, "width": 128, "batch": 8,
            "model": "deeplabv2_tiny", "arch": "deeplabv2_tiny",
            "blocks": (1, 1, 1, 1), "base_width": 8, "ndf": 32}
  h, w = (int(v) for v in spec.lower().split("x"))
  return {"name": f"{h}x{w}", "height": h, "width": w, "batch": 1,
          "model": "deeplabv2_resnet101", "arch": "deeplabv2_r101",
          "blocks": (3, 4, 23, 3), "base_width": 64, "ndf": 64}


def make_config(size: dict, compute_dtype: str, conv_impl: str = "auto",
                bn_mode: str = "frozen"):
  config = paper_step.paper_config("adaptsegnet", "", size["height"],
                                   size["width"], compute_dtype, False)
  config.model.name = size["model"]
  config.model.bn_mode = bn_mode  # the torch reference reads it from here
  config.model.conv_impl = conv_impl
  config.adversarial.ndf = size["ndf"]
  config.batch_size = size["batch"]
  return config


# ---------------------------------------------------------------------------
# PyTorch side
# ---------------------------------------------------------------------------


def torch_models(size: dict, seed: int, levels=("main", "aux")):
  """The reference segmenter and discriminators, seeded."""
  # PyTorch is optional: imported only when the reference runs.
  # pylint: disable=g-import-not-at-top
  import torch
  from benchmarks.torch_reference import deeplab_v2
  from benchmarks.torch_reference import discriminator
  # pylint: enable=g-import-not-at-top
  torch.manual_seed(seed)
  model = deeplab_v2.ResNetMulti(block_counts=size["blocks"],
                                 num_classes=NUM_CLASSES,
                                 base_width=size["base_width"])
  discs = {level: discriminator.FCDiscriminator(NUM_CLASSES, ndf=size["ndf"])
           for level in levels}
  return model, discs


def torch_step(model, discs, config):
  # pylint: disable-next=g-import-not-at-top
  from benchmarks.torch_reference import adaptsegnet_step
  return adaptsegnet_step.AdaptSegNetStep(
      model, discs, learning_rate=config.optim.learning_rate,
      momentum=config.optim.momentum,
      weight_decay=config.optim.weight_decay,
      head_lr_mult=config.optim.head_lr_mult,
      learning_rate_d=config.adversarial.learning_rate,
      betas=(config.adversarial.b1, config.adversarial.b2),
      power=config.optim.power, max_iter=config.optim.schedule_steps,
      lambda_seg=config.loss.lambda_seg_aux,
      lambda_adv={"main": config.adversarial.lambda_adv_main,
                  "aux": config.adversarial.lambda_adv_aux},
      bn_mode=config.model.bn_mode, channels_last=True)


def _state_dict_np(module) -> dict:
  return {k: v.detach().float().cpu().numpy().copy()
          for k, v in module.state_dict().items()}


def jax_weights(model, discs, arch: str) -> dict:
  """Converted PyTorch weights as jaxda ``build(weights=...)`` input."""
  seg = torch_import.convert_state_dict(_state_dict_np(model), arch)
  disc_params = {
      level: torch_import.convert_state_dict(_state_dict_np(d),
                                             "fc_discriminator")["params"]
      for level, d in discs.items()}
  return {"params": seg["params"], "batch_stats": seg["batch_stats"],
          "disc_params": disc_params}


def torch_batch(batch: dict) -> tuple:
  import torch  # pylint: disable=g-import-not-at-top
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(
      np.transpose(x, (0, 3, 1, 2))))
  return (nchw(batch["source"]["image"]),
          torch.from_numpy(batch["source"]["label"].astype(np.int64)),
          nchw(batch["target"]["image"]))


def _count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _max_abs_diff(a, b) -> float:
  return float(max(np.max(np.abs(np.asarray(x, np.float64)
                                 - np.asarray(y, np.float64)))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


# ---------------------------------------------------------------------------
# Peak
# ---------------------------------------------------------------------------


def matmul_peak_gflops(n: int = 4096, repeats: int = 5) -> dict:
  """float32 (and bfloat16) n^3 matmul GFLOP/s of PyTorch and XLA, median."""
  out = {}
  x = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
  flops = 2.0 * n ** 3

  def timed(fn):
    fn()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return flops / statistics.median(times) / 1e9

  for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    a = jnp.asarray(x, dtype)
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    out[f"xla_{name}"] = timed(lambda: jax.block_until_ready(f(a)))
  try:
    import torch  # pylint: disable=g-import-not-at-top
    t = torch.from_numpy(x)
    out["torch_float32"] = timed(lambda: torch.mm(t, t))
    tb = t.bfloat16()
    out["torch_bfloat16"] = timed(lambda: torch.mm(tb, tb))
  except ImportError:
    pass
  out["float32_peak"] = max(v for k, v in out.items() if "float32" in k)
  return out


# ---------------------------------------------------------------------------
# One size
# ---------------------------------------------------------------------------


def bench_size(size: dict, *, repeats: int, warmup: int, seed: int,
               variants: tuple, with_torch: bool,
               bn_mode: str = "frozen") -> dict:
  """Equal-loss check, compile times and interleaved step timings."""
  report = {"size": [size["height"], size["width"]], "spec": size,
            "variants": list(variants), "bn_mode": bn_mode}
  levels = ("main", "aux")
  weights = model = discs = None
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count())
    model, discs = torch_models(size, seed, levels)
    weights = jax_weights(model, discs, size["arch"])
    report["torch_params"] = int(
        sum(p.numel() for p in model.parameters())
        + sum(p.numel() for d in discs.values() for p in d.parameters()))

  method = None
  steps, states, compiled = {}, {}, {}
  host_batch = None
  for name in variants:
    dtype = "bfloat16" if name.startswith("jaxda_bf16") else "float32"
    impl = name.split(":", 1)[1] if ":" in name else "auto"
    config = make_config(size, dtype, impl, bn_mode)
    state, step_jit, _, method, mesh = paper_step.build(
        config, NUM_CLASSES, 64, seed, weights=weights)
    if host_batch is None:
      host_batch = paper_step.random_batch(method, size["batch"],
                                           size["height"], size["width"],
                                           NUM_CLASSES, seed)
      batch = parallel.shard_batch(host_batch, mesh)
    rng = jax.random.key(seed)
    compiled[name], report[f"{name}_compile"] = paper_step.compile_timed(
        step_jit, state, batch, rng)
    cost = paper_step.cost_stats(compiled[name])
    report[f"{name}_gflop"] = cost.get("flops", float("nan")) / 1e9
    report[f"{name}_memory"] = paper_step.memory_stats(compiled[name])
    states[name] = state
    steps[name] = config
    _log(f"{size['name']} {name}: compiled in"
         f" {report[f'{name}_compile']['total_s']:.1f} s")
  first = variants[0]
  report["jaxda_params"] = (_count(states[first].params)
                            + _count(states[first].disc_params))
  # The model's FLOPs, as a direct convolution (PyTorch's) does them: the
  # step with XLA's conv everywhere, lowered only. Winograd variants execute
  # fewer (`{name}_gflop`); GFLOP/s columns use these model FLOPs for all.
  direct_config = make_config(size, "float32", "lax", bn_mode)
  _, direct_step, *_ = paper_step.build(direct_config, NUM_CLASSES, 64, seed,
                                        weights=weights)
  direct_cost = paper_step.cost_stats(
      direct_step.trace(states[first], batch, jax.random.key(seed)).lower())
  report["gflop"] = direct_cost.get("flops", float("nan")) / 1e9

  rng = jax.random.key(seed)
  # --- equal loss on the same weights and batch (first step of each) -------
  jax_metrics = {}
  for name in variants:
    states[name], m = compiled[name](states[name], batch, rng)
    jax_metrics[name] = {k: float(np.mean(v))
                         for k, v in parallel.to_host(m).items()}
  report["jaxda_metrics_step0"] = jax_metrics
  torch_run = None
  if with_torch:
    config = steps[first]
    torch_run = torch_step(model, discs, config)
    tb = torch_batch(host_batch)
    out = torch_run(0, *tb)
    t_metrics = {k: float(v) for k, v in out.items()}
    report["torch_metrics_step0"] = t_metrics
    keys = ("loss", "seg_loss", "ce_main", "ce_aux", "adv_main", "adv_aux",
            "disc_main", "disc_aux")
    for name in variants:
      report[f"{name}_loss_diffs"] = {
          k: abs(jax_metrics[name][k] - t_metrics[k]) for k in keys}
    report["loss_diff"] = max(report[f"{first}_loss_diffs"].values())
    # Parameters after one update, converted back through the importer.
    after = jax_weights(model, discs, size["arch"])
    report["param_diff"] = _max_abs_diff(
        parallel.to_host(states[first].params), after["params"])
    report["disc_param_diff"] = _max_abs_diff(
        parallel.to_host(states[first].disc_params), after["disc_params"])
    # Float32 rounding differs between the frameworks; anything above this
    # is a different computation (the fp32 step agrees to ~1e-7).
    report["parity_ok"] = bool(report["loss_diff"] < PARITY_TOL)
    _log(f"{size['name']}: loss diff {report['loss_diff']:.2e}, param diff"
         f" {report['param_diff']:.2e}"
         + ("" if report["parity_ok"] else
            f" -- PARITY FAILED (> {PARITY_TOL:g}): the two steps differ,"
            " so the timings below compare different work"))

  # --- timing ---------------------------------------------------------------
  def run_jax(name):
    t0 = time.perf_counter()
    states[name], m = compiled[name](states[name], batch, rng)
    jax.block_until_ready((states[name], m))
    return time.perf_counter() - t0

  step_i = [1]

  def run_torch():
    t0 = time.perf_counter()
    torch_run(step_i[0], *tb)
    step_i[0] += 1
    return time.perf_counter() - t0

  runners = {name: (lambda n=name: run_jax(n)) for name in variants}
  if with_torch:
    runners["torch"] = run_torch
  names = list(runners)
  for _ in range(warmup):
    for name in names:
      runners[name]()
  times = {name: [] for name in names}
  for r in range(repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      times[name].append(runners[name]())
    _log(f"{size['name']} round {r + 1}/{repeats}: " + ", ".join(
        f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names))
  report["times_s"] = times
  for name in names:
    report[f"{name}_ms"] = statistics.median(times[name]) * 1e3
  if with_torch:
    report["torch_ms"] = report["torch_ms"]
  if "jaxda_fp32" in runners:
    report["jaxda_ms"] = report["jaxda_fp32_ms"]
  if "jaxda_bf16" in runners:
    report["jaxda_bf16_ms"] = report["jaxda_bf16_ms"]
  for name in names:
    report[f"{name}_gflops_per_s"] = report["gflop"] / (
        report[f"{name}_ms"] / 1e3)
    if with_torch and name != "torch":
      # Per-round ratios: robust to load that changes between rounds.
      report[f"{name}_paired_speedup_vs_torch"] = statistics.median(
          t / j for t, j in zip(times["torch"], times[name]))
  return report


def print_table(results: dict) -> None:
  peak = results["peak"]["float32_peak"]
  m = results["machine"]
  print(f"machine: {m['processor'] or 'cpu'}, {m['cpus_usable']} cores,"
        f" jax {m['jax']}, torch {m.get('torch')}, fp32 matmul peak"
        f" {peak:.0f} GFLOP/s (xla {results['peak']['xla_float32']:.0f},"
        f" torch {results['peak'].get('torch_float32', float('nan')):.0f})")
  print(f"{'size':<10} {'variant':<18} {'median ms':>10} {'vs torch':>9}"
        f" {'paired':>8} {'GFLOP/s':>8} {'% peak':>7}")
  for r in results["sizes"]:
    torch_ms = r.get("torch_ms")
    for name in r["variants"] + (["torch"] if torch_ms else []):
      ms = r[f"{name}_ms"]
      speed = f"{torch_ms / ms:.2f}x" if torch_ms else "-"
      gfs = r[f"{name}_gflops_per_s"]
      paired = r.get(f"{name}_paired_speedup_vs_torch")
      paired = f"{paired:.2f}x" if paired else "-"
      print(f"{r['spec']['name']:<10} {name:<18} {ms:>10.1f} {speed:>9}"
            f" {paired:>8} {gfs:>8.1f} {100 * gfs / peak:>6.1f}%")
    if torch_ms:
      print(f"{'':<10} params jaxda {r['jaxda_params']:,} torch"
            f" {r['torch_params']:,}; loss diff {r['loss_diff']:.1e}; param"
            f" diff after step {r['param_diff']:.1e};"
            f" {r['gflop']:.1f} model GFLOP/step; BN {r['bn_mode']}"
            + ("" if r["parity_ok"] else "; PARITY FAILED"))
    for name in r["variants"]:
      c = r[f"{name}_compile"]
      print(f"{'':<10} {name} compile: trace {c['trace_s']:.1f} s, lower"
            f" {c['lower_s']:.1f} s, XLA {c['compile_s']:.1f} s;"
            f" executes {r[f'{name}_gflop']:.1f} GFLOP/step")


def machine_info() -> dict:
  info = paper_step.machine_info()
  try:
    import torch  # pylint: disable=g-import-not-at-top
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
  except ImportError:
    info["torch"] = None
  return info


def run(sizes, *, repeats=10, warmup=2, seed=0,
        variants=("jaxda_fp32", "jaxda_bf16"), with_torch=True,
        bn_mode="frozen") -> dict:
  """Benchmarks every size; returns the JSON-able results."""
  results = {"machine": machine_info(), "peak": matmul_peak_gflops(),
             "sizes": []}
  for spec in sizes:
    results["sizes"].append(bench_size(
        parse_size(spec), repeats=repeats, warmup=warmup, seed=seed,
        variants=tuple(variants), with_torch=with_torch, bn_mode=bn_mode))
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--sizes", default="256x512",
                      help="comma-separated: small, HxW (e.g. 512x1024)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--variants", default="jaxda_fp32,jaxda_bf16",
                      help="jaxda_fp32, jaxda_bf16, optionally with"
                           " ':lax' / ':dot' (config.model.conv_impl)")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--bn_mode", default="frozen", choices=("frozen", "train"),
                      help="BatchNorm in both frameworks: running statistics"
                      " (frozen, the committed timings) or batch statistics"
                      " (train, the AdaptSegNet paper preset's)")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  results = run(args.sizes.split(","), repeats=args.repeats,
                warmup=args.warmup, seed=args.seed,
                variants=args.variants.split(","),
                with_torch=not args.no_torch, bn_mode=args.bn_mode)
  results["args"] = vars(args)
  paper_step.write_report(args.out, "train_step.json", results, print_table)
  return results


if __name__ == "__main__":
  main()
