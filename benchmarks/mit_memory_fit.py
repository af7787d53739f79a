"""Device memory of the MiT-B5 paper steps from compiles of shallower MiTs.

XLA:CPU takes over half an hour to compile one MiT-B5 paper step on a
2-core machine (benchmarks/NOTES.md), so the full step's
``compiled.memory_analysis()`` is out of reach there. Every block of a MiT
stage has the same shapes, so the step's memory is affine in the stage
depths: ``bytes = a + sum_s c_s n_s``. This compiles the step (the loop's
own, via ``benchmarks.lower_steps``) at a few small depth tuples, solves for
``a`` and ``c_s``, checks the fit on a held-out depth tuple, and predicts
the real depths (MiT-B5: 3, 6, 40, 3).

  python -m benchmarks.mit_memory_fit --methods=mic:hrda,daformer --out DIR

Writes ``DIR/mit_memory_fit.json`` after every compile: per step, each
point's depths, bytes and compile seconds, the fitted coefficients, the
held-out error and the prediction in bytes and GiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any
from unittest import mock

import numpy as np

# Four stage depths at which the affine fit is solved (five unknowns), then
# one held out to check it.
FIT_DEPTHS = ((1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 1, 1), (1, 1, 2, 1),
              (1, 1, 1, 2))
HELD_OUT = (1, 1, 3, 1)


def fit_affine(points: list[tuple[tuple[int, ...], float]]) -> np.ndarray:
  """Least-squares ``[a, c_1, ..., c_S]`` of ``bytes = a + sum c_s n_s``."""
  x = np.array([[1.0, *d] for d, _ in points])
  y = np.array([b for _, b in points], dtype=np.float64)
  coef, *_ = np.linalg.lstsq(x, y, rcond=None)
  return coef


def predict(coef: np.ndarray, depths) -> float:
  return float(coef[0] + np.dot(coef[1:], depths))


def _network(spec: str) -> str:
  """The MiT variant ``spec``'s paper preset builds (e.g. 'mit_b5')."""
  from benchmarks import lower_steps  # pylint: disable=g-import-not-at-top
  name, _, variant = spec.partition(":")
  config = lower_steps.load_config(name, False, 0, 0, variant, True)
  return config.daformer.network or config.model.name


def step_bytes(spec: str, depths: tuple[int, ...]) -> dict[str, Any]:
  """The memory analysis of ``spec``'s paper-size step with the MiT stage
  depths replaced by ``depths``, compiled for this process's backend (the
  CPU here; the GPU's own buffer assignment under benchmarks.device_check)."""
  from benchmarks import lower_steps  # pylint: disable=g-import-not-at-top
  from jaxda.models import mit  # pylint: disable=g-import-not-at-top
  name, _, variant = spec.partition(":")
  network = _network(spec)
  shallow = dataclasses.replace(mit.MIT_VARIANTS[network],
                                depths=tuple(depths))
  with mock.patch.dict(mit.MIT_VARIANTS, {network: shallow}):
    platform = lower_steps.running_platform()
    out = lower_steps.lower_method(name, (platform,), tiny=False, height=0,
                                   width=0, variant=variant,
                                   paper_size=True, memory=True)
  result = next(iter(out.values()))[platform]  # the variant's first phase
  if not result["ok"]:
    raise RuntimeError(f"{spec} {depths}: {result['error']}")
  return {"depths": list(depths), "total_bytes": result["total_bytes"],
          "compile_s": result["compile_s"], "network": network,
          "images": result["images"], "platform": platform}


def summarize(spec: str, entry: dict[str, Any], budget_gib: float) -> None:
  """Adds the fit, the held-out error (when that point exists) and the
  prediction at the real depths to ``entry`` and prints them."""
  from jaxda.models import mit  # pylint: disable=g-import-not-at-top
  by_depths = {tuple(p["depths"]): p["total_bytes"] for p in entry["points"]}
  missing = [d for d in FIT_DEPTHS if d not in by_depths]
  if missing:
    raise ValueError(f"{spec}: no compile at depths {missing} yet")
  coef = fit_affine([(d, by_depths[d]) for d in FIT_DEPTHS])
  network = _network(spec)
  real = mit.MIT_VARIANTS[network].depths
  total, gib = predict(coef, real), 2.0 ** 30
  held = by_depths.get(HELD_OUT)
  entry.update(
      coefficients_bytes=[float(c) for c in coef],
      held_out_error_bytes=(None if held is None
                            else predict(coef, HELD_OUT) - held),
      predicted_depths=list(real), predicted_bytes=total,
      predicted_gib=round(total / gib, 3),
      fits_budget=bool(total <= budget_gib * gib))
  check = ("no held-out point" if held is None else
           f"held-out error {entry['held_out_error_bytes'] / 2**20:+.1f} MiB")
  print(f"{spec}: {network} {real} -> {total / gib:.2f} GiB ({check})",
        flush=True)


def full_point(spec: str, budget_gib: float) -> dict[str, Any]:
  """``step_bytes`` of ``spec`` at its network's real MiT depths, with its
  GiB and whether it fits ``budget_gib`` (for steps not affine in the
  depths, e.g. with model.remat; also the device check's last section)."""
  from jaxda.models import mit  # pylint: disable=g-import-not-at-top
  point = step_bytes(spec, mit.MIT_VARIANTS[_network(spec)].depths)
  gib = 2.0 ** 30
  point["gib"] = round(point["total_bytes"] / gib, 3)
  point["fits_budget"] = bool(point["total_bytes"] <= budget_gib * gib)
  return point


def _full(args) -> int:
  """Compiles every step of ``args.methods`` at its real MiT depths."""
  from experiments import results_files  # pylint: disable=g-import-not-at-top
  path = os.path.join(args.out, "mit_memory_full.json")
  report: dict[str, Any] = {"provenance": results_files.provenance(),
                            "budget_gib": args.budget_gib, "steps": {}}
  for spec in args.methods.split(","):
    point = full_point(spec, args.budget_gib)
    report["steps"][spec] = point
    print(f"{spec} at {tuple(point['depths'])}: {point['gib']:.2f} GiB"
          f" (compile {point['compile_s']} s)", flush=True)
    with open(path, "w") as f:
      json.dump(report, f, indent=2)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default="mic:hrda,daformer")
  parser.add_argument("--out", required=True)
  parser.add_argument("--budget_gib", type=float, default=24.0,
                      help="the device memory the verdict is against")
  parser.add_argument("--fit_only", action="store_true",
                      help="compile nothing: fit the points already in"
                      " DIR/mit_memory_fit.json (e.g. of a stopped run)")
  parser.add_argument("--full", action="store_true",
                      help="no fit: compile each step at its network's real"
                      " depths (slow; for steps whose memory is not affine"
                      " in the depths, e.g. with model.remat) into"
                      " DIR/mit_memory_full.json")
  args = parser.parse_args(argv)
  from experiments import results_files  # pylint: disable=g-import-not-at-top
  os.makedirs(args.out, exist_ok=True)
  if args.full:
    return _full(args)
  path = os.path.join(args.out, "mit_memory_fit.json")
  if args.fit_only:
    with open(path) as f:
      report = json.load(f)
    for spec, entry in report["steps"].items():
      try:
        summarize(spec, entry, report["budget_gib"])
      except ValueError as e:
        print(e, flush=True)
    with open(path, "w") as f:
      json.dump(report, f, indent=2)
    return 0
  report: dict[str, Any] = {"provenance": results_files.provenance(),
                            "budget_gib": args.budget_gib, "steps": {}}
  gib = 2.0 ** 30
  for spec in args.methods.split(","):
    entry = report["steps"].setdefault(spec, {"points": []})
    for depths in (*FIT_DEPTHS, HELD_OUT):
      point = step_bytes(spec, depths)
      entry["points"].append(point)
      print(f"{spec} depths {depths}: {point['total_bytes'] / gib:.3f} GiB"
            f" (compile {point['compile_s']} s)", flush=True)
      with open(path, "w") as f:
        json.dump(report, f, indent=2)
    summarize(spec, entry, args.budget_gib)
    with open(path, "w") as f:
      json.dump(report, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
