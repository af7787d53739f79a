"""Benchmark of TPLD voting densification and CBST threshold estimation.

Run (small defaults, a minute or so on a laptop CPU):

  python -m benchmarks.densify_bench --out /tmp/densify_bench

Paper-scale threshold pass (100 Cityscapes-size maps, generated batch by
batch; the exact form then holds ~50 MB of confidences, the histogram 156 kB):

  python -m benchmarks.densify_bench --out DIR --maps 100

Part 1 times `jaxda.methods.self_training.densify.densify` (jitted) in its
default implementation (`--impl auto`: 'shifted', the candidate-only window sum,
for small windows and top_k) as `jax_kernel`, beside the other one
('reduce_window': per iteration one separable pair of `reduce_window`s over
all classes of the whole batch), against NumPy implementations of the same rule, written here, all in
float32, with their labels compared:

* `numpy_vectorized` (the reference): all classes and images at once,
  candidates by a stable argsort, votes from the (B, H, W, C) ratios,
  window as zero padding + window² shifted sums, candidate reads by
  `take_along_axis`. No Python loop over pixels or classes.
* `numpy_same_algorithm`: NumPy given every algorithmic choice of the
  timed kernel (top-k by k argmax passes, votes from a (label, own-ratio)
  map pair; for 'reduce_window' (B, C, H, W) class planes and separable
  shifted sums, for 'shifted' the candidate-only window sum): how much of
  the speed-up is XLA rather than the algorithm.
* `numpy_class_loop` (skip with --skip-class-loop): pools one class plane
  at a time.

Implementations are timed interleaved (one call of each per repeat), so
load from other processes on a shared machine hits them alike; the report
gives per-implementation medians, the ratio of medians and the median of
the per-repeat ratios, and the minor page faults per call (XLA's temporary
buffer is one allocation; above glibc's 32 MiB mmap threshold it is mapped
and faulted in afresh on every call). Throughput is megapixels × classes
per second per call (`num_iters` iterations included). Two bandwidths for
the kernel, each also as a fraction of the machine's copy bandwidth (NumPy
copy of a 256 MiB array, read + write bytes, the STREAM convention):
"nominal" counts, per iteration, one read of the (B, H, W, C) float32
probabilities plus one read and one write of the int32 label map; "streamed"
is the traffic the kernel actually moves (`kernel_traffic_bytes`).

Part 2 runs one thresholds pass (CRST semantics, subsample 4) over `--maps`
synthetic softmax maps: the exact form (`class_confidences` per batch on the
host + `thresholds_from_confidences`) against the streaming histogram
(`update_threshold_histogram` per batch on device +
`thresholds_from_histogram`). Map generation is not timed. Memory: for the
exact form the tracemalloc peak during the pass minus the input batch (i.e.
the confidence lists + transients); for the streaming form the histogram
bytes plus XLA's temporary buffer size for one update call.

Every repeat and the medians go to DIR/densify_bench.json.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import time
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np

from jaxda.methods.self_training import densify as voting
from jaxda.methods.self_training import thresholds as cbst
from jaxda.types import IGNORE_LABEL as IGNORE


# ---------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------


def _synthetic_probs(key, batch, height, width, num_classes, block=16):
  """Float32 softmax maps with piecewise-constant 'objects' plus noise.

  Per-block logit scales vary from flat to very peaked, so confidences span
  [1/C, 1] with many values near 1 like a trained network's.
  """
  k1, k2, k3 = jax.random.split(key, 3)
  bh, bw = -(-height // block), -(-width // block)
  logits = jax.random.normal(k1, (batch, bh, bw, num_classes))
  scale = jnp.exp(jax.random.uniform(k2, (batch, bh, bw, 1), minval=0.5,
                                     maxval=3.5))
  logits = jnp.repeat(jnp.repeat(logits * scale, block, 1), block, 2)
  logits = logits[:, :height, :width]
  logits = logits + 0.7 * jax.random.normal(k3, logits.shape)
  return jax.nn.softmax(logits, axis=-1).astype(jnp.float32)


_synthetic_probs_jit = jax.jit(_synthetic_probs, static_argnums=(1, 2, 3, 4))


# ---------------------------------------------------------------------------
# NumPy implementations of the voting rule (float32, as the kernel)
# ---------------------------------------------------------------------------


def _candidates(r, top_k):
  order = np.argsort(-r, axis=-1, kind="stable")[..., :top_k]
  return order, np.take_along_axis(r, order, axis=-1)


def _decide(labels, pooled_cand, r_cand, cand, alpha, combine):
  if combine == "convex":
    score = np.float32(alpha) * r_cand + np.float32(1 - alpha) * pooled_cand
  else:
    score = r_cand + np.float32(alpha) * pooled_cand
  best = np.argmax(score, axis=-1)
  best_score = np.take_along_axis(score, best[..., None], -1)[..., 0]
  best_class = np.take_along_axis(cand, best[..., None], -1)[..., 0]
  assign = (labels == IGNORE) & (best_score > 1)
  return np.where(assign, best_class, labels).astype(np.int32)


def _shifted_pool(values, window, pooling, axes=(1, 2)):
  """Zero-padded window pool over `axes` (H, W) via window² shifted slices."""
  half = window // 2
  pad = [(0, 0)] * values.ndim
  pad[axes[0]] = pad[axes[1]] = (half, half)
  padded = np.pad(values, pad)
  h, w = values.shape[axes[0]], values.shape[axes[1]]
  out = np.zeros_like(values)
  for di in range(window):
    for dj in range(window):
      index = [slice(None)] * values.ndim
      index[axes[0]] = slice(di, di + h)
      index[axes[1]] = slice(dj, dj + w)
      if pooling == "max":
        np.maximum(out, padded[tuple(index)], out=out)
      else:
        out += padded[tuple(index)]
  if pooling in ("mean", "count"):
    out /= np.float32(window * window)
  return out


def numpy_densify_vectorized(probs, labels, thresholds, *, window, alpha,
                             num_iters, pooling, combine, top_k):
  """All classes and images at once; no Python loop over pixels/classes."""
  r = probs / thresholds.astype(np.float32)
  cand, r_cand = _candidates(r, top_k)
  labels = labels.astype(np.int32)
  class_ids = np.arange(r.shape[-1])
  for _ in range(num_iters):
    is_k = labels[..., None] == class_ids
    votes = (is_k.astype(np.float32) if pooling == "count"
             else np.where(is_k, r, np.float32(0)))
    pooled = _shifted_pool(votes, window, pooling)
    pooled_cand = np.take_along_axis(pooled, cand, axis=-1)
    labels = _decide(labels, pooled_cand, r_cand, cand, alpha, combine)
  return labels


def numpy_densify_class_loop(probs, labels, thresholds, *, window, alpha,
                             num_iters, pooling, combine, top_k):
  """Same rule, pooling one (B, H, W) class plane at a time."""
  r = probs / thresholds.astype(np.float32)
  cand, r_cand = _candidates(r, top_k)
  labels = labels.astype(np.int32)
  for _ in range(num_iters):
    pooled = np.empty_like(r)
    for k in range(r.shape[-1]):
      is_k = labels == k
      votes = (is_k.astype(np.float32) if pooling == "count"
               else np.where(is_k, r[..., k], np.float32(0)))
      pooled[..., k] = _shifted_pool(votes, window, pooling)
    pooled_cand = np.take_along_axis(pooled, cand, axis=-1)
    labels = _decide(labels, pooled_cand, r_cand, cand, alpha, combine)
  return labels


def _pool_planes_shifted(planes, window, pooling):
  """(B, C, H, W) zero-padded window pool, separable: W pass, then H pass."""
  half = window // 2
  height, width = planes.shape[2:]
  accumulate = np.maximum if pooling == "max" else np.add
  padded = np.pad(planes, [(0, 0), (0, 0), (0, 0), (half, half)])
  out = padded[..., :width].copy()
  for d in range(1, window):
    accumulate(out, padded[..., d:d + width], out=out)
  padded = np.pad(out, [(0, 0), (0, 0), (half, half), (0, 0)])
  out = padded[:, :, :height].copy()
  for d in range(1, window):
    accumulate(out, padded[:, :, d:d + height], out=out)
  return out


def _pool_candidates_shifted(labels, own, cands, window, pooling):
  """Candidate-only window pool: Σ/max over offsets of matching votes."""
  half = window // 2
  height, width = labels.shape[1:]
  pad = [(0, 0), (half, half), (half, half)]
  padded_labels = np.pad(labels, pad, constant_values=-1)
  padded_own = np.pad(own, pad)
  pooled = [np.zeros(labels.shape, np.float32) for _ in cands]
  for dy in range(window):
    for dx in range(window):
      lab = padded_labels[:, dy:dy + height, dx:dx + width]
      val = padded_own[:, dy:dy + height, dx:dx + width]
      for out, k in zip(pooled, cands):
        match = lab == k
        vote = (match.astype(np.float32) if pooling == "count"
                else np.where(match, val, np.float32(0)))
        if pooling == "max":
          np.maximum(out, vote, out=out)
        else:
          out += vote
  return pooled


def numpy_densify_same_algorithm(probs, labels, thresholds, *, window, alpha,
                                 num_iters, pooling, combine, top_k,
                                 impl="reduce_window"):
  """The kernel's algorithm in NumPy (see the module docstring)."""
  r = probs / thresholds.astype(np.float32)
  num_classes = r.shape[-1]
  masked = r.copy()
  cands, r_cands = [], []
  for j in range(top_k):  # first max = lower class index on ties
    pick = np.argmax(masked, axis=-1)[..., None]
    cands.append(pick[..., 0])
    r_cands.append(np.take_along_axis(masked, pick, axis=-1)[..., 0])
    if j + 1 < top_k:
      np.put_along_axis(masked, pick, -np.inf, axis=-1)
  labels = labels.astype(np.int32)
  own = np.take_along_axis(
      r, np.clip(labels, 0, num_classes - 1)[..., None], axis=-1)[..., 0]
  planes = np.arange(num_classes, dtype=np.int32)[:, None, None]
  batch, height, width = labels.shape
  b_idx = np.arange(batch)[:, None, None]
  h_idx = np.arange(height)[:, None]
  w_idx = np.arange(width)
  for _ in range(num_iters):
    if impl == "shifted":
      pooled_cands = _pool_candidates_shifted(labels, own, cands, window,
                                              pooling)
    else:
      is_k = labels[:, None] == planes
      votes = (is_k.astype(np.float32) if pooling == "count"
               else np.where(is_k, own[:, None], np.float32(0)))
      pooled = _pool_planes_shifted(votes, window, pooling)
      pooled_cands = [pooled[b_idx, k, h_idx, w_idx] for k in cands]
    best_c = best_s = best_r = None
    for k, r_k, p_k in zip(cands, r_cands, pooled_cands):
      if pooling in ("mean", "count"):
        p_k = p_k / np.float32(window * window)
      if combine == "convex":
        s = np.float32(alpha) * r_k + np.float32(1 - alpha) * p_k
      else:
        s = r_k + np.float32(alpha) * p_k
      if best_s is None:
        best_c, best_s, best_r = k, s, r_k
      else:
        better = s > best_s
        best_c = np.where(better, k, best_c)
        best_r = np.where(better, r_k, best_r)
        best_s = np.where(better, s, best_s)
    assign = (labels == IGNORE) & (best_s > 1)
    labels = np.where(assign, best_c, labels).astype(np.int32)
    own = np.where(assign, best_r, own)
  return labels


# ---------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------


def _time(fn, repeats, warmup):
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def copy_bandwidth(num_bytes=256 << 20, repeats=5):
  """Median NumPy copy bandwidth, read + write bytes per second."""
  src = np.ones(num_bytes // 4, np.float32)
  dst = np.empty_like(src)
  times = _time(lambda: np.copyto(dst, src), repeats, warmup=1)
  return 2 * src.nbytes / statistics.median(times), times


def machine_info():
  return {
      "platform": platform.platform(),
      "processor": platform.processor(),
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "cpus_usable": len(os.sched_getaffinity(0))
                     if hasattr(os, "sched_getaffinity") else None,
      "jax": jax.__version__,
      "numpy": np.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


# ---------------------------------------------------------------------------
# Part 1: densification throughput
# ---------------------------------------------------------------------------


def kernel_traffic_bytes(shape, num_iters, top_k, window,
                         impl="reduce_window"):
  """Bytes `densify` streams per call (float32 / int32, 4 bytes each).

  A model of the kernel for top_k <= 4 (argmax candidates). Prologue:
  `top_k` argmax/max passes over the (B, H, W, C) probabilities, the
  own-label read, `2 top_k + 1` (B, H, W) maps written. Per iteration of
  'reduce_window': V written, two 1-D reduce_window passes (read + write
  each; none for window 1), then the decision reads the label and own-ratio
  maps, the candidate maps and one pooled value per candidate, and writes
  two maps. Per iteration of 'shifted': one fusion reads the (padded)
  label and own-ratio maps (the window's offsets hit cache) and the
  `2 top_k` candidate maps, and writes two maps.
  """
  full = 4 * int(np.prod(shape))
  plane = 4 * int(np.prod(shape[:-1]))
  prologue = top_k * full + 2 * plane + (2 * top_k + 1) * plane
  if impl == "shifted":
    per_iter = (2 + 2 * top_k) * plane + 2 * plane
  else:
    passes = 2 if window > 1 else 0
    per_iter = (full + passes * 2 * full
                + (2 + 2 * top_k) * plane + top_k * plane + 2 * plane)
  return prologue + num_iters * per_iter


def _minor_faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench_densify(args, copy_bw):
  shape = (args.batch, args.height, args.width, args.classes)
  probs_dev = _synthetic_probs_jit(jax.random.key(args.seed), *shape)
  probs = np.asarray(probs_dev)
  thresholds = cbst.class_thresholds(probs, args.portion)
  labels = np.asarray(cbst.select(probs, thresholds))
  rule = dict(window=args.window, alpha=args.alpha, num_iters=args.num_iters,
              pooling=args.pooling, combine=args.combine, top_k=args.top_k)
  thr_dev = jnp.asarray(thresholds)
  labels_dev = jnp.asarray(labels)
  kernel_impl = args.impl
  if kernel_impl == "auto":
    kernel_impl = ("shifted" if args.window * args.top_k <= 2 * args.classes
                   else "reduce_window")
  compiled = voting.densify.lower(
      probs_dev, labels_dev, thr_dev, impl=kernel_impl, **rule).compile()
  analysis = compiled.memory_analysis()
  temp_bytes = (int(analysis.temp_size_in_bytes) if analysis is not None
                else None)

  # "jax_kernel" is the implementation `densify` picks by default ('auto');
  # the other JAX implementation is timed beside it.
  other_impl = "reduce_window" if kernel_impl == "shifted" else "shifted"
  impls = {
      "jax_kernel": lambda: voting.densify(
          probs_dev, labels_dev, thr_dev, impl=kernel_impl, **rule),
      f"jax_{other_impl}": lambda: voting.densify(
          probs_dev, labels_dev, thr_dev, impl=other_impl, **rule),
      "numpy_vectorized": lambda: numpy_densify_vectorized(
          probs, labels, thresholds, **rule),
      "numpy_same_algorithm": lambda: numpy_densify_same_algorithm(
          probs, labels, thresholds, impl=kernel_impl, **rule),
  }
  if not args.skip_class_loop:
    impls["numpy_class_loop"] = lambda: numpy_densify_class_loop(
        probs, labels, thresholds, **rule)

  outputs = {name: np.asarray(fn()) for name, fn in impls.items()}
  for _ in range(args.warmup):
    for fn in impls.values():
      jax.block_until_ready(fn())
  # Interleaved: every repeat times each implementation once.
  times = {name: [] for name in impls}
  faults = {name: [] for name in impls}
  for _ in range(args.repeats):
    for name, fn in impls.items():
      before = _minor_faults()
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
      faults[name].append(_minor_faults() - before)

  pixels_classes = float(np.prod(shape))
  results = {}
  for name in impls:
    med = statistics.median(times[name])
    results[name] = {
        "times_s": times[name],
        "median_s": med,
        "mpix_classes_per_s": pixels_classes / med / 1e6,
        "minor_faults_per_call": statistics.median(faults[name]),
    }
  kernel = results["jax_kernel"]
  nominal = args.num_iters * (probs.nbytes + 2 * labels.size * 4)
  streamed = kernel_traffic_bytes(shape, args.num_iters, args.top_k,
                                  args.window, kernel_impl)
  for key, num_bytes in (("nominal", nominal), ("streamed", streamed)):
    kernel[f"{key}_bytes_per_call"] = num_bytes
    kernel[f"{key}_gb_per_s"] = num_bytes / kernel["median_s"] / 1e9
    kernel[f"{key}_fraction_of_copy_bandwidth"] = (
        num_bytes / kernel["median_s"] / copy_bw)
  kernel["xla_temp_bytes"] = temp_bytes
  speedup = {}
  for name in impls:
    if name == "jax_kernel":
      continue
    speedup[name] = {
        "ratio_of_medians": results[name]["median_s"] / kernel["median_s"],
        "median_of_paired_ratios": statistics.median(
            t / k for t, k in zip(times[name], times["jax_kernel"])),
    }
  reference = outputs["numpy_vectorized"]
  agreement = {name: int(np.sum(out != reference))
               for name, out in outputs.items()}
  return {
      "shape_bhwc": list(shape),
      "rule": rule,
      "kernel_impl": kernel_impl,
      "density_before": float(np.mean(labels != IGNORE)),
      "density_after": float(np.mean(reference != IGNORE)),
      "mismatched_pixels_vs_numpy_vectorized": agreement,
      "identical": all(v == 0 for v in agreement.values()),
      "results": results,
      "kernel_speedup_same_run": speedup,
  }


# ---------------------------------------------------------------------------
# Part 2: thresholds, exact vs streaming
# ---------------------------------------------------------------------------


def _batches(args):
  """Deterministic (key, batch size) list for the thresholds pass."""
  out = []
  for i, start in enumerate(range(0, args.maps, args.map_batch)):
    size = min(args.map_batch, args.maps - start)
    out.append((jax.random.fold_in(jax.random.key(args.seed + 1), i), size))
  return out


def _exact_pass(args):
  tracemalloc.start()
  lists = [[] for _ in range(args.classes)]
  elapsed, peak = 0.0, 0
  try:
    for key, size in _batches(args):
      batch = np.array(_synthetic_probs_jit(
          key, size, args.map_height, args.map_width, args.classes))
      base, _ = tracemalloc.get_traced_memory()
      tracemalloc.reset_peak()
      start = time.perf_counter()
      for c, vals in enumerate(cbst.class_confidences(
          batch, subsample=args.subsample)):
        lists[c].append(vals)
      elapsed += time.perf_counter() - start
      peak = max(peak, tracemalloc.get_traced_memory()[1] - batch.nbytes)
      del batch
    tracemalloc.reset_peak()
    start = time.perf_counter()
    merged = [np.concatenate(x) for x in lists]
    thresholds = cbst.thresholds_from_confidences(
        merged, args.portion)
    elapsed += time.perf_counter() - start
    peak = max(peak, tracemalloc.get_traced_memory()[1])
    held = sum(x.nbytes for x in merged)
  finally:
    tracemalloc.stop()
  return thresholds, elapsed, peak, held


def _streaming_pass(args):
  hist = cbst.init_threshold_histogram(args.classes, args.num_bins)
  elapsed = 0.0
  for key, size in _batches(args):
    batch = jax.block_until_ready(_synthetic_probs_jit(
        key, size, args.map_height, args.map_width, args.classes))
    start = time.perf_counter()
    hist = jax.block_until_ready(cbst.update_threshold_histogram(
        hist, batch, subsample=args.subsample))
    elapsed += time.perf_counter() - start
  start = time.perf_counter()
  thresholds = cbst.thresholds_from_histogram(hist, args.portion)
  elapsed += time.perf_counter() - start
  return thresholds, elapsed, hist


def bench_thresholds(args):
  # Compile the update for every batch size used, outside the timings.
  hist = cbst.init_threshold_histogram(args.classes, args.num_bins)
  temp_bytes = 0
  for size in sorted({size for _, size in _batches(args)}):
    spec = jax.ShapeDtypeStruct(
        (size, args.map_height, args.map_width, args.classes), jnp.float32)
    compiled = cbst.update_threshold_histogram.lower(
        hist, spec, subsample=args.subsample).compile()
    analysis = compiled.memory_analysis()
    if analysis is not None:
      temp_bytes = max(temp_bytes, int(analysis.temp_size_in_bytes))
    _synthetic_probs_jit(jax.random.key(0), size, args.map_height,
                         args.map_width, args.classes)

  exact, stream = [], []
  for _ in range(args.threshold_repeats):
    thr_e, t_e, peak_e, held_e = _exact_pass(args)
    exact.append(t_e)
    thr_h, t_h, hist = _streaming_pass(args)
    stream.append(t_h)

  edges = cbst.threshold_histogram_edges(args.classes, args.num_bins)
  z = lambda p: np.log(p) - np.log1p(-np.minimum(p, 1 - 2.0**-24))
  width = (z(edges[-1]) - z(edges[0])) / args.num_bins
  gap_bins = [(z(np.float64(e)) - z(np.float64(h))) / width
              for e, h in zip(thr_e, thr_h) if e < 1.0]
  num_pixels = args.maps * args.map_height * args.map_width
  return {
      "maps": args.maps,
      "map_hwc": [args.map_height, args.map_width, args.classes],
      "map_batch": args.map_batch,
      "portion": args.portion,
      "subsample": args.subsample,
      "num_bins": args.num_bins,
      "exact": {
          "times_s": exact,
          "median_s": statistics.median(exact),
          "mpix_per_s": num_pixels / statistics.median(exact) / 1e6,
          "held_confidence_bytes": held_e,
          "tracemalloc_peak_bytes": peak_e,
      },
      "streaming": {
          "times_s": stream,
          "median_s": statistics.median(stream),
          "mpix_per_s": num_pixels / statistics.median(stream) / 1e6,
          "histogram_bytes": int(np.asarray(hist).nbytes),
          "xla_temp_bytes_per_update": temp_bytes,
      },
      "thresholds_exact": thr_e.tolist(),
      "thresholds_streaming": thr_h.tolist(),
      "max_abs_diff": float(np.max(np.abs(thr_e - thr_h))),
      "max_gap_in_bins": float(max(gap_bins)) if gap_bins else 0.0,
      "min_gap_in_bins": float(min(gap_bins)) if gap_bins else 0.0,
  }


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  g = parser.add_argument_group("densification (part 1)")
  g.add_argument("--batch", type=int, default=2)
  g.add_argument("--height", type=int, default=256)
  g.add_argument("--width", type=int, default=512)
  g.add_argument("--classes", type=int, default=19)
  g.add_argument("--window", type=int, default=3)
  g.add_argument("--alpha", type=float, default=0.7)
  g.add_argument("--num-iters", type=int, default=3)
  g.add_argument("--pooling", default="sum",
                 choices=["sum", "mean", "max", "count"])
  g.add_argument("--combine", default="convex",
                 choices=["convex", "additive"])
  g.add_argument("--top-k", type=int, default=2)
  g.add_argument("--portion", type=float, default=0.2)
  g.add_argument("--skip-class-loop", action="store_true")
  g.add_argument("--impl", default="auto",
                 choices=["auto", "reduce_window", "shifted"],
                 help="densify implementation timed as jax_kernel")
  g = parser.add_argument_group("thresholds (part 2)")
  g.add_argument("--maps", type=int, default=8,
                 help="number of maps (paper scale: 100 or more)")
  g.add_argument("--map-height", type=int, default=512)
  g.add_argument("--map-width", type=int, default=1024)
  g.add_argument("--map-batch", type=int, default=2)
  g.add_argument("--subsample", type=int, default=4)
  g.add_argument("--num-bins", type=int,
                 default=cbst.DEFAULT_NUM_BINS)
  g.add_argument("--threshold-repeats", type=int, default=3)
  g.add_argument("--skip-thresholds", action="store_true")
  return parser.parse_args(argv)


def _print_report(report):
  d = report["densify"]
  print(f"machine: {report['machine']['processor'] or 'cpu'}, "
        f"{report['machine']['cpus_usable']} usable cores, backend "
        f"{report['machine']['backend']}, jax {report['machine']['jax']}")
  print(f"copy bandwidth (read+write): {report['copy_gb_per_s']:.2f} GB/s")
  print(f"\n(1) densify {d['shape_bhwc']} (B,H,W,C), {d['rule']}, "
        f"jax_kernel = impl {d['kernel_impl']!r}")
  print(f"    density {d['density_before']:.3f} -> {d['density_after']:.3f};"
        f" identical labels: {d['identical']} "
        f"{d['mismatched_pixels_vs_numpy_vectorized']}")
  print(f"    {'implementation':<22}{'median ms':>11}{'MPix*C/s':>11}"
        f"{'faults/call':>13}")
  for name, res in d["results"].items():
    print(f"    {name:<22}{res['median_s'] * 1e3:>11.2f}"
          f"{res['mpix_classes_per_s']:>11.1f}"
          f"{res['minor_faults_per_call']:>13.0f}")
  for name, sp in d["kernel_speedup_same_run"].items():
    print(f"    kernel speed-up vs {name}: {sp['ratio_of_medians']:.2f}x "
          f"(ratio of medians), {sp['median_of_paired_ratios']:.2f}x "
          f"(median of paired repeats)")
  k = d["results"]["jax_kernel"]
  for key in ("nominal", "streamed"):
    print(f"    kernel {key} {k[f'{key}_bytes_per_call'] / 1e6:.0f} MB/call: "
          f"{k[f'{key}_gb_per_s']:.2f} GB/s = "
          f"{100 * k[f'{key}_fraction_of_copy_bandwidth']:.1f}% of copy "
          f"bandwidth")
  if k["xla_temp_bytes"] is not None:
    print(f"    kernel XLA temporary buffer {k['xla_temp_bytes'] / 2**20:.1f}"
          f" MiB")
  if "thresholds" not in report:
    return
  t = report["thresholds"]
  print(f"\n(2) thresholds, {t['maps']} maps of {t['map_hwc']} (H,W,C), "
        f"subsample {t['subsample']}, portion {t['portion']}")
  print(f"    {'form':<10}{'median s':>10}{'MPix/s':>9}{'memory':>34}")
  e, s = t["exact"], t["streaming"]
  memory_e = "lists %.1f MB, peak %.1f MB" % (
      e["held_confidence_bytes"] / 1e6, e["tracemalloc_peak_bytes"] / 1e6)
  memory_s = "hist %.3f MB, temp %.1f MB" % (
      s["histogram_bytes"] / 1e6, s["xla_temp_bytes_per_update"] / 1e6)
  print(f"    {'exact':<10}{e['median_s']:>10.3f}{e['mpix_per_s']:>9.1f}"
        f"{memory_e:>34}")
  print(f"    {'streaming':<10}{s['median_s']:>10.3f}{s['mpix_per_s']:>9.1f}"
        f"{memory_s:>34}")
  print(f"    max |λ_exact - λ_hist| = {t['max_abs_diff']:.2e}; gap in bins "
        f"[{t['min_gap_in_bins']:.3f}, {t['max_gap_in_bins']:.3f}]")


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  copy_bw, copy_times = copy_bandwidth(repeats=args.repeats)
  report = {
      "machine": machine_info(),
      "args": vars(args),
      "copy_gb_per_s": copy_bw / 1e9,
      "copy_times_s": copy_times,
      "densify": bench_densify(args, copy_bw),
  }
  if not args.skip_thresholds:
    report["thresholds"] = bench_thresholds(args)
  path = os.path.join(args.out, "densify_bench.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  _print_report(report)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
