"""Pseudo-label pass: forward-only inference vs the full TPLD/CBST pass.

Run:

  python -m benchmarks.pseudo_label_bench --out DIR
  python -m benchmarks.pseudo_label_bench --out DIR --num-images 400

On the TPLD CPU config (`experiments/configs/tpld.py`, the embedded
synthetic target set), over the same target training images:

* ``forward``: the labelling pass's own inference, i.e. every batch of
  target images through `segmentation.make_predict_jit` (network, bilinear
  upsampling, softmax), blocked on at the end;
* ``full_phase1`` / ``full_phase2``: `self_training.make_pseudo_labels` as a
  round runs it: streaming class thresholds (pass A), then selection,
  voting densification (phase 1) or the easy/hard split (phase 2), and the
  host-side gathering (pass B).

One warm-up of each, then ``--repeats`` rounds timing each variant once in
a rotated order; medians. Parameters are random (timing does not depend on
them).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax

from benchmarks import paper_step
from experiments.configs import tpld as tpld_config
from jaxda import parallel
from jaxda.methods.self_training import rounds as self_training
from jaxda import methods
from jaxda.tasks import segmentation
from jaxda.train import loop as train_loop


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def build_run(num_images: int, data_dir: str, workdir: str, model: str = ""):
  config = tpld_config.get_config("")
  if model:  # e.g. deeplabv2_resnet101: the paper's network on CPU-size images
    config.model.name = model
  config.data.num_train_images = num_images
  config.data.num_val_images = 8
  config.num_devices = 1
  config.source.data_dir = data_dir
  config.target.data_dir = data_dir
  run = train_loop.setup(config, workdir, methods.get_method(config.method))
  return run, train_loop.create_state(run)


def forward_only(run, state) -> None:
  """Inference alone: network + upsampling + softmax over every batch."""
  predict_jit = segmentation.make_predict_jit(run)
  out = None
  # The labelling pass's batching (segmentation.eval_batches' contract).
  for batch in segmentation.eval_batches(run, run.data["target_train"]):
    image = parallel.shard_batch({"image": batch["image"]}, run.mesh)["image"]
    out = predict_jit(state, image)
  jax.block_until_ready(out)


def bench(num_images: int, repeats: int, data_dir: str,
          model: str = "") -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    run, state = build_run(num_images, data_dir, workdir, model)
    variants = {
        "forward": lambda: forward_only(run, state),
        "full_phase1": lambda: self_training.make_pseudo_labels(
            run, state, 0, 1, None),
        "full_phase2": lambda: self_training.make_pseudo_labels(
            run, state, 0, 2, None),
    }
    names = list(variants)
    for name in names:  # warm-up (compiles)
      variants[name]()
    times = {n: [] for n in names}
    for r in range(repeats):
      order = names[r % len(names):] + names[:r % len(names)]
      for name in order:
        t0 = time.perf_counter()
        variants[name]()
        times[name].append(time.perf_counter() - t0)
      _log(f"round {r + 1}/{repeats}: " + ", ".join(
          f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names))
    config = run.config
    train_loop.close(run)
  med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
  return {
      "num_images": num_images,
      "image_size": [config.data.height, config.data.width],
      "model": config.model.name,
      "eval_batch_size": config.eval.batch_size,
      "times_s": times,
      "forward_ms": med["forward"],
      "full_pass_ms": med["full_phase1"],
      "full_phase2_ms": med["full_phase2"],
      "ratio_phase1": med["full_phase1"] / med["forward"],
      "ratio_phase2": med["full_phase2"] / med["forward"],
  }


def print_table(report: dict) -> None:
  print(f"pseudo-label pass over {report['num_images']} target images"
        f" {report['image_size'][0]}x{report['image_size'][1]}"
        f" ({report['model']}):")
  print(f"  forward only        {report['forward_ms']:9.1f} ms")
  print(f"  full pass, phase 1  {report['full_pass_ms']:9.1f} ms"
        f"  ({report['ratio_phase1']:.2f}x forward)")
  print(f"  full pass, phase 2  {report['full_phase2_ms']:9.1f} ms"
        f"  ({report['ratio_phase2']:.2f}x forward)")


def run(num_images: int = 200, repeats: int = 5, data_dir: str = "",
        model: str = "") -> dict:
  if not data_dir:
    data_dir = os.path.join(tempfile.gettempdir(), "jaxda_bench_cache")
  report = bench(num_images, repeats, data_dir, model)
  report["machine"] = paper_step.machine_info()
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--num-images", type=int, default=200)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--data-dir", default="",
                      help="synthetic data cache (default: a temp folder)")
  parser.add_argument("--model", default="",
                      help="segmenter name (default: the TPLD CPU config's)")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  report = run(args.num_images, args.repeats, args.data_dir, args.model)
  report["args"] = vars(args)
  paper_step.write_report(args.out, "pseudo_label_pass.json", report,
                          print_table)
  return report


if __name__ == "__main__":
  main()
