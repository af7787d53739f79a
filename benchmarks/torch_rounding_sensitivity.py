"""PyTorch against itself: how far float32 rounding alone moves one AdaptSegNet step.

  python -m benchmarks.torch_rounding_sensitivity --sizes 256x512 \
      --out benchmarks/results/DATE/torch_rounding_sensitivity.json

Why: the step benchmark's jaxda-vs-PyTorch parity is 1e-7 with running
BatchNorm statistics but 1e-3 on the parameters with batch statistics at
256x512. Whether that is a different computation or rounding amplified by
the batch-statistics backward is decided by the same number for PyTorch
against itself: one step from the same weights and batch, (a) with 2
threads, (b) with 1 thread (another summation order), (c) with 2 threads
and the source image scaled by (1 + 1e-7). Per BatchNorm mode it reports
the largest loss and parameter differences of (b) and (c) against (a), and
the largest segmenter update of (a) for scale; segmenter and
discriminator parameters are reported apart, as the step benchmark does.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import numpy as np

from benchmarks import train_step_bench as bench


def _step(model0, discs0, config, images, labels, target, threads):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  model, discs = copy.deepcopy(model0), copy.deepcopy(discs0)
  metrics = bench.torch_step(model, discs, config)(0, images, labels, target)
  params = {k: v.detach().clone() for k, v in model.named_parameters()}
  disc = {f"{level}.{k}": v.detach().clone()
          for level, d in discs.items() for k, v in d.named_parameters()}
  return {k: float(v) for k, v in metrics.items()}, params, disc


def _max_diff(a: dict, b: dict) -> tuple[float, str]:
  diffs = {k: float((a[k] - b[k]).abs().max()) for k in a}
  worst = max(diffs, key=diffs.get)
  return diffs[worst], worst


def sensitivity(spec: str, bn_mode: str, seed: int = 0) -> dict:
  """Loss / parameter differences of runs (b) and (c) against run (a)."""
  import torch  # pylint: disable=g-import-not-at-top
  size = bench.parse_size(spec)
  config = bench.make_config(size, "float32", "auto", bn_mode)
  model0, discs0 = bench.torch_models(size, seed)
  start = {k: v.detach().clone() for k, v in model0.named_parameters()}
  rng = np.random.default_rng(seed)
  b, h, w = size["batch"], size["height"], size["width"]
  images = torch.from_numpy(rng.normal(size=(b, 3, h, w)).astype(np.float32))
  labels = torch.from_numpy(
      rng.integers(0, bench.NUM_CLASSES, size=(b, h, w)).astype(np.int64))
  target = torch.from_numpy(rng.normal(size=(b, 3, h, w)).astype(np.float32))
  threads = os.cpu_count() or 1
  la, pa, da = _step(model0, discs0, config, images, labels, target, threads)
  lb, pb, db = _step(model0, discs0, config, images, labels, target, 1)
  lc, pc, dc = _step(model0, discs0, config, images * (1 + 1e-7), labels,
                     target, threads)
  update = {k: float((pa[k] - start[k]).abs().max()) for k in start}
  worst_update = max(update, key=update.get)
  out = {"size": spec, "bn_mode": bn_mode, "seed": seed, "threads": threads,
         "max_update": update[worst_update], "max_update_param": worst_update}
  runs = {"one_thread": (lb, pb, db), "input_1e-7": (lc, pc, dc)}
  for tag, (lx, px, dx) in runs.items():
    diff, worst = _max_diff(pa, px)
    out[tag] = {"loss_diff": max(abs(la[k] - lx[k]) for k in la),
                "param_diff": diff, "param_diff_at": worst,
                "update_of_that_param": update[worst],
                "disc_param_diff": _max_diff(da, dx)[0]}
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="small,256x512")
  parser.add_argument("--bn_modes", default="frozen,train")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  rows = [sensitivity(s, m) for s in args.sizes.split(",")
          for m in args.bn_modes.split(",")]
  report = {"machine": bench.machine_info(), "rows": rows}
  for r in rows:
    print(f"{r['size']} {r['bn_mode']}: 1 thread vs {r['threads']}: loss"
          f" {r['one_thread']['loss_diff']:.1e}, params"
          f" {r['one_thread']['param_diff']:.1e} (D"
          f" {r['one_thread']['disc_param_diff']:.1e}); input x(1+1e-7): loss"
          f" {r['input_1e-7']['loss_diff']:.1e}, params"
          f" {r['input_1e-7']['param_diff']:.1e} (D"
          f" {r['input_1e-7']['disc_param_diff']:.1e}); largest update"
          f" {r['max_update']:.1e} ({r['max_update_param']})")
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
