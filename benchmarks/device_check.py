"""One command that measures what a lent GPU/TPU should tell us (issue 20).

  python -m benchmarks.device_check --out DIR            # on the device
  python -m benchmarks.device_check --out DIR --smoke    # CPU, < 3 min

Sections, each written to DIR/device_check.json as soon as it is done (a
section that fails records its error and the rest still run):

1. ``machine``: backend, device kind and count, `device.memory_stats()`.
2. ``lowering``: the AdaptSegNet step lowered for this platform: convs and
   dots (under 'auto' a cuda/tpu step must be XLA convs, no dot chains).
3. ``step``: the AdaptSegNet step (paper model, batch 1 per domain,
   512×1024; smoke: the tiny model at 32×64) in fp32, bf16 and bf16+remat:
   trace/lower/compile time, median of ``--repeats`` (>= 10) steps after a
   warm-up, XLA's memory analysis and the device's peak bytes in use
   (where the backend reports it).
4. ``pseudo_labels``: the TPLD pseudo-label pass vs a forward-only pass
   over the same images (`benchmarks.pseudo_label_bench`).
5. ``input_pipeline``: images/s of the host pipeline (decode-free: the
   in-memory batcher plus augmentation) vs the step's images/s.
6. ``main_job``: ``--main-steps`` (200; smoke: 4) steps of the AdaptSegNet
   entry point, wall time and steps/s.
7. ``mit_paper_memory`` (last; not under ``--smoke``): the HRDA and
   MIC(HRDA) paper steps (MiT-B5, real depths, per-loss backward, MiT
   remat) compiled for this device, XLA's buffer assignment against the
   papers' 24 GB (on XLA:CPU: HRDA 8.38 GiB after a 62 min compile,
   MIC(HRDA) 8.51 GiB from its buffer-assignment dump, its compile needing
   more than a 23 GB host; `benchmarks.mit_memory_fit --full` is the same
   measurement).

Not here yet: the PyTorch reference on the same device
(`benchmarks.train_step_bench` runs it on the CPU only); the result says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from jaxda import host_memory

host_memory.keep_freed_memory()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from benchmarks import lower_steps
from benchmarks import paper_step
from jaxda import parallel
# pylint: enable=g-import-not-at-top,wrong-import-position

METHOD = "adaptsegnet"


def _log(message: str) -> None:
  print(f"[device_check] {message}", file=sys.stderr, flush=True)


def machine() -> dict:
  devices = jax.devices()
  stats = None
  try:
    stats = devices[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    pass
  return {"backend": jax.default_backend(),
          "device_kind": devices[0].device_kind,
          "device_count": len(devices), "memory_stats": stats,
          "jax": jax.__version__, "host": paper_step.machine_info()}


def lowering(args) -> dict:
  platform = lower_steps.running_platform()
  return lower_steps.lower_method(METHOD, (platform, "cuda", "tpu"),
                                  tiny=args.smoke, height=32, width=64)


def _peak_device_bytes():
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return None
  return stats.get("peak_bytes_in_use")


def step(args, dtype: str, remat: bool) -> dict:
  """Compile and step time, memory of one AdaptSegNet step configuration."""
  config = paper_step.paper_config(METHOD, "", args.height, args.width,
                                   dtype, remat, None)
  config.batch_size = 1
  if args.smoke:
    config.model.name = "deeplabv2_tiny"
    config.adversarial.ndf = 8
  state, step_jit, _, method, mesh = paper_step.build(
      config, 19, 64 if not args.smoke else 32, 0)
  batch = parallel.shard_batch(paper_step.random_batch(
      method, 1, args.height, args.width, 19, 0), mesh)
  rng = jax.random.key(0)
  compiled, compile_times = paper_step.compile_timed(step_jit, state, batch,
                                                     rng)
  times = []
  for i in range(args.repeats + 1):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    if i:  # the first call is the warm-up
      times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  host = parallel.to_host(metrics)
  return {"dtype": dtype, "remat": remat, "model": config.model.name,
          "size": [args.height, args.width], "compile": compile_times,
          "times_s": times, "median_s": median,
          "images_per_s": 2 / median,  # one source + one target image
          "memory_analysis": paper_step.memory_stats(compiled),
          "peak_device_bytes": _peak_device_bytes(),
          "loss_finite": bool(all(np.all(np.isfinite(v))
                                  for v in host.values()))}


def pseudo_labels(args) -> dict:
  from benchmarks import pseudo_label_bench  # pylint: disable=g-import-not-at-top
  model = "" if args.smoke else "deeplabv2_resnet101"
  return pseudo_label_bench.run(num_images=8 if args.smoke else 200,
                                repeats=1 if args.smoke else 5, model=model)


def input_pipeline(args, step_images_per_s: float | None) -> dict:
  """Host batches/s of the in-memory pipeline at the step's image size."""
  from jaxda.data import pipeline  # pylint: disable=g-import-not-at-top
  n = 16 if args.smoke else 64
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (n, args.height, args.width, 3), np.uint8)
  labels = rng.integers(0, 19, (n, args.height, args.width), np.uint8)
  batches = pipeline.train_batches(images, labels, batch_size=1, seed=0,
                                   start_step=0, flip=True, mode="imagenet")
  count = 4 * n
  t0 = time.perf_counter()
  for _ in range(count):
    next(batches)
  rate = count / (time.perf_counter() - t0)
  out = {"images_per_s": rate, "images": count,
         "note": "in-memory arrays: no file decoding or resizing (issue 20"
                 " item 4's benchmarks.input_pipeline measures those)"}
  if step_images_per_s:
    out["step_images_per_s"] = step_images_per_s
    out["loader_over_step"] = rate / step_images_per_s
  return out


def main_job(args) -> dict:
  steps = 4 if args.smoke else args.main_steps
  variant = "tiny" if args.smoke else "paper"
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, "-m", f"experiments.{METHOD}",
           f"--config=experiments/configs/{METHOD}.py:{variant}",
           f"--workdir={workdir}", f"--config.num_steps={steps}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          cwd=os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__))))
    wall = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:"
                       f" {proc.stderr.strip().splitlines()[-1:]}")
  return {"command": " ".join(cmd), "returncode": proc.returncode,
          "wall_s": wall, "steps": steps, "steps_per_s_incl_setup":
          steps / wall, "stderr_tail": proc.stderr[-2000:]}


def mit_paper_memory(args, budget_gib: float = 24.0) -> dict:
  """Per MiT-B5 HRDA paper step: bytes of one device while it runs."""
  if args.smoke:
    return {"skipped": "a MiT-B5 paper-size compile; not under --smoke"}
  from benchmarks import mit_memory_fit  # pylint: disable=g-import-not-at-top
  steps = {}
  for spec in ("daformer:hrda", "mic:hrda"):  # mit_memory_fit's specs
    point = mit_memory_fit.full_point(spec, budget_gib)
    steps[spec] = point
    _log(f"{spec}: {point['gib']} GiB (compile {point['compile_s']} s)")
  return {"budget_gib": budget_gib, "steps": steps}


def run(args) -> dict:
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "device_check.json")
  report = {"smoke": args.smoke, "args": vars(args), "sections": {},
            "torch_reference": "not run: benchmarks.train_step_bench runs"
                               " PyTorch on the CPU only; a cuDNN"
                               " (channels-last) port is left to do"}

  def section(name, fn, *a):
    _log(f"{name} ...")
    t0 = time.perf_counter()
    try:
      result = {"ok": True, **_jsonable(fn(*a))}
    except Exception as e:  # pylint: disable=broad-except
      result = {"ok": False, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-3000:]}
    result["section_s"] = time.perf_counter() - t0
    report["sections"][name] = result
    with open(path, "w") as f:
      json.dump(report, f, indent=1, default=str)
    _log(f"{name}: {'ok' if result['ok'] else result['error']}"
         f" ({result['section_s']:.1f} s)")
    return result

  report["device"] = section("machine", machine).get("device_kind")
  section("lowering", lambda: {"steps": lowering(args)})
  rate = None
  for dtype, remat in (("float32", False), ("bfloat16", False),
                       ("bfloat16", True)):
    name = f"step_{dtype}{'_remat' if remat else ''}"
    r = section(name, step, args, dtype, remat)
    if r["ok"] and rate is None:
      rate = r["images_per_s"]
  section("pseudo_labels", pseudo_labels, args)
  section("input_pipeline", input_pipeline, args, rate)
  section("main_job", main_job, args)
  section("mit_paper_memory", mit_paper_memory, args)
  report["complete"] = True
  with open(path, "w") as f:
    json.dump(report, f, indent=1, default=str)
  return report


def _jsonable(x):
  return json.loads(json.dumps(x, default=str))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.environ.get("OUT", ""))
  parser.add_argument("--smoke", action="store_true",
                      help="tiny model, small images, few steps (CPU)")
  parser.add_argument("--height", type=int, default=0)
  parser.add_argument("--width", type=int, default=0)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--main-steps", type=int, default=200)
  args = parser.parse_args(argv)
  if not args.out:
    parser.error("--out (or $OUT) is required")
  args.height = args.height or (32 if args.smoke else 512)
  args.width = args.width or (64 if args.smoke else 1024)
  if args.smoke:
    args.repeats = min(args.repeats, 3)
  report = run(args)
  failed = [n for n, s in report["sections"].items() if not s["ok"]]
  for name, s in report["sections"].items():
    summary = {k: s[k] for k in ("median_s", "images_per_s", "wall_s",
                                 "ratio_phase1") if k in s}
    print(f"{name:24s} {'ok' if s['ok'] else 'FAIL'} {summary}")
  print(f"device: {report['device']}; wrote"
        f" {os.path.join(args.out, 'device_check.json')}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
