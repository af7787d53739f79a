"""Kernels: voting densification and the losses vs NumPy and PyTorch.

Run:

  python -m benchmarks.kernels_bench --out DIR

* Voting: `benchmarks.densify_bench.bench_densify` (jaxda kernel vs the
  NumPy implementations, identical labels checked there), at 2x256x512x19.
* Losses, forward and gradient w.r.t. the logits, on (B, H, W, C) =
  (2, 256, 512, 19) float32 with 1/8 of the labels ignored:
  `losses.softmax_cross_entropy` vs NumPy (log-softmax + gather) and
  `torch.nn.functional.cross_entropy(ignore_index=255)` (NCHW, as the
  originals call it); `losses.weighted_self_information` (ADVENT's map) vs
  NumPy and PyTorch; the BCE discriminator loss on a (2, 8, 16, 1) map.
* Roofline: NumPy copy bandwidth (read + write); each kernel's "streamed"
  bytes are its compulsory traffic (inputs read once, outputs written
  once), so GB/s / copy GB/s is the fraction of the memory bound reached.

Each variant: one warm-up, ``--repeats`` timed calls, interleaved by round.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import densify_bench
from benchmarks import paper_step
from jaxda import losses
from jaxda.types import IGNORE_LABEL


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _numpy_ce(logits, labels):
  valid = labels != IGNORE_LABEL
  m = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
  picked = np.take_along_axis(logits, np.where(valid, labels, 0)[..., None],
                              -1)[..., 0]
  return float(np.sum((lse - picked) * valid) / max(valid.sum(), 1))


def _numpy_entropy_map(probs):
  c = probs.shape[-1]
  return -probs * np.log2(probs + 1e-30) / np.log2(c)


def loss_variants(batch=2, height=256, width=512, classes=19, seed=0):
  """{name: (fn, streamed_bytes)}; every fn blocks until its result."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, height, width, classes)).astype(np.float32)
  labels = rng.integers(0, classes, (batch, height, width)).astype(np.int32)
  labels[:, :height // 8] = IGNORE_LABEL
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  d_out = rng.normal(size=(batch, 8, 16, 1)).astype(np.float32)
  lg, lb, pr = jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(probs)
  do = jnp.asarray(d_out)
  n = logits.nbytes + labels.nbytes
  out = {}
  ce = jax.jit(lambda x, y: losses.softmax_cross_entropy(logits=x, labels=y))
  ce_grad = jax.jit(jax.value_and_grad(
      lambda x, y: losses.softmax_cross_entropy(logits=x, labels=y)))
  ent = jax.jit(losses.weighted_self_information)
  bce = jax.jit(lambda a, b: losses.discriminator_loss(
      d_out_source=a, d_out_target=b))
  out["ce/jaxda"] = (lambda: jax.block_until_ready(ce(lg, lb)), n)
  out["ce/numpy"] = (lambda: _numpy_ce(logits, labels), n)
  out["ce+grad/jaxda"] = (lambda: jax.block_until_ready(ce_grad(lg, lb)),
                          n + logits.nbytes)
  out["entropy_map/jaxda"] = (lambda: jax.block_until_ready(ent(pr)),
                              2 * probs.nbytes)
  out["entropy_map/numpy"] = (lambda: _numpy_entropy_map(probs),
                              2 * probs.nbytes)
  out["bce_disc/jaxda"] = (lambda: jax.block_until_ready(bce(do, do)),
                           2 * d_out.nbytes)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
    tl = torch.from_numpy(np.ascontiguousarray(logits.transpose(0, 3, 1, 2)))
    tlab = torch.from_numpy(labels.astype(np.int64))
    tp = torch.from_numpy(probs)
    td = torch.from_numpy(d_out)

    def torch_ce_grad():
      x = tl.detach().requires_grad_()
      loss = F.cross_entropy(x, tlab, ignore_index=IGNORE_LABEL)
      loss.backward()
      return loss

    def torch_bce():
      return 0.5 * (F.binary_cross_entropy_with_logits(td, torch.zeros_like(td))
                    + F.binary_cross_entropy_with_logits(
                        td, torch.ones_like(td)))

    out["ce/torch"] = (
        lambda: F.cross_entropy(tl, tlab, ignore_index=IGNORE_LABEL),
        n + labels.nbytes)
    out["ce+grad/torch"] = (torch_ce_grad, n + logits.nbytes)
    out["entropy_map/torch"] = (
        lambda: -tp * torch.log2(tp + 1e-30) / np.log2(classes),
        2 * probs.nbytes)
    out["bce_disc/torch"] = (torch_bce, 2 * d_out.nbytes)
  except ImportError:
    pass
  return out


def bench_losses(repeats: int, copy_bw: float) -> dict:
  variants = loss_variants()
  names = list(variants)
  for name in names:
    variants[name][0]()
  times = {n: [] for n in names}
  for r in range(repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      t0 = time.perf_counter()
      variants[name][0]()
      times[name].append(time.perf_counter() - t0)
  report = {}
  for name in names:
    med = statistics.median(times[name])
    gbs = variants[name][1] / med / 1e9
    report[name] = {"median_ms": med * 1e3, "times_s": times[name],
                    "streamed_bytes": variants[name][1], "gb_per_s": gbs,
                    "fraction_of_copy": gbs * 1e9 / copy_bw}
  return report


def run(repeats: int = 10, densify_repeats: int = 5) -> dict:
  copy_bw, copy_times = densify_bench.copy_bandwidth(repeats=5)
  args = densify_bench.parse_args(
      ["--out", "/dev/null", "--repeats", str(densify_repeats),
       "--skip-thresholds", "--skip-class-loop"])
  densify = densify_bench.bench_densify(args, copy_bw)
  return {"machine": paper_step.machine_info(),
          "copy_gb_per_s": copy_bw / 1e9, "copy_times_s": copy_times,
          "densify": densify, "losses": bench_losses(repeats, copy_bw)}


def print_table(report: dict) -> None:
  print(f"copy bandwidth {report['copy_gb_per_s']:.1f} GB/s (roofline)")
  print(f"{'kernel':<22} {'median ms':>10} {'GB/s':>7} {'of copy':>8}")
  for name, r in report["losses"].items():
    print(f"{name:<22} {r['median_ms']:>10.2f} {r['gb_per_s']:>7.1f}"
          f" {100 * r['fraction_of_copy']:>7.1f}%")
  d = report["densify"]
  for name, r in d["results"].items():
    extra = ""
    if name == "jax_kernel":
      extra = (f" {r['streamed_gb_per_s']:>7.1f}"
               f" {100 * r['streamed_fraction_of_copy_bandwidth']:>7.1f}%")
    print(f"{'densify/' + name:<22} {r['median_s'] * 1e3:>10.2f}{extra}")
  print(f"densify labels identical to NumPy: {d['identical']}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--densify-repeats", type=int, default=5)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  report = run(args.repeats, args.densify_repeats)
  report["args"] = vars(args)
  paper_step.write_report(args.out, "kernels.json", report, print_table)
  return report


if __name__ == "__main__":
  main()
