"""Runs every benchmark and writes DIR/results.json.

  python -m benchmarks.run_all --out DIR
  python -m benchmarks.run_all --out DIR --sizes small,256x512,512x1024
  python -m benchmarks.run_all --out DIR --quick      # small sizes only

``results.json`` holds, besides every script's full report:

  {"train_step": {"size": [H, W], "jaxda_ms", "torch_ms", "jaxda_bf16_ms",
                  "jaxda_params", "torch_params", "loss_diff", "gflop",
                  "peak_gflops", ...},            # the --headline size
   "train_step_sizes": [...],                   # every size
   "pseudo_label_pass": {"forward_ms", "full_pass_ms", ...},
   "kernels": {...}, "paper_memory": {...} (with --paper-memory),
   "machine": {...}}

The same scripts run unchanged on a GPU backend (XLA picks the device);
there ``peak_gflops`` is the measured float32 matmul rate of that device.
"""

import argparse
import json
import os
import sys

from benchmarks import kernels_bench
from benchmarks import paper_step
from benchmarks import pseudo_label_bench
from benchmarks import train_step_bench


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--sizes", default="small,256x512",
                      help="train-step sizes: small, HxW")
  parser.add_argument("--headline", default="256x512",
                      help="the size reported under 'train_step'")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--quick", action="store_true",
                      help="small sizes and few repeats (a smoke run)")
  parser.add_argument("--paper-memory", action="store_true",
                      help="also compile the 512x1024 R101 step for every"
                           " bf16/remat switch (minutes per compile)")
  args = parser.parse_args(argv)
  if args.quick:
    args.sizes, args.headline, args.repeats = "small", "small", 3
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "results.json")
  results = {"machine": train_step_bench.machine_info(), "args": vars(args)}

  def save():
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, default=str)
    os.replace(path + ".tmp", path)

  _log("== train step")
  steps = train_step_bench.run(args.sizes.split(","), repeats=args.repeats)
  results["train_step_sizes"] = steps["sizes"]
  results["peak"] = steps["peak"]
  headline = next((r for r in steps["sizes"]
                   if r["spec"]["name"] == args.headline), steps["sizes"][0])
  results["train_step"] = dict(
      {k: v for k, v in headline.items() if k != "times_s"},
      peak_gflops=steps["peak"]["float32_peak"])
  save()
  train_step_bench.print_table(steps)

  _log("== pseudo-label pass")
  results["pseudo_label_pass"] = pseudo_label_bench.run(
      num_images=64 if args.quick else 200,
      repeats=3 if args.quick else 5)
  save()
  pseudo_label_bench.print_table(results["pseudo_label_pass"])

  _log("== kernels")
  results["kernels"] = kernels_bench.run(
      repeats=3 if args.quick else 10, densify_repeats=3 if args.quick else 5)
  save()
  kernels_bench.print_table(results["kernels"])

  if args.paper_memory:
    _log("== paper-scale memory per switch")
    mem_args = paper_step.parse_args(["--out", args.out, "--memory-only"])
    results["paper_memory"] = paper_step.memory_table(mem_args)
    save()
    paper_step.print_memory_table(results["paper_memory"])
  print(f"wrote {path}")
  return results


if __name__ == "__main__":
  main()
