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


def step_bytes(spec: str, depths: tuple[int, ...]) -> dict[str, Any]:
  """The cpu memory analysis of ``spec``'s paper-size step with the MiT
  stage depths replaced by ``depths``."""
  from benchmarks import lower_steps  # pylint: disable=g-import-not-at-top
  from jaxda.models import mit  # pylint: disable=g-import-not-at-top
  name, _, variant = spec.partition(":")
  config = lower_steps.load_config(name, False, 0, 0, variant, True)
  network = config.daformer.network or config.model.name
  shallow = dataclasses.replace(mit.MIT_VARIANTS[network],
                                depths=tuple(depths))
  with mock.patch.dict(mit.MIT_VARIANTS, {network: shallow}):
    out = lower_steps.lower_method(name, ("cpu",), tiny=False, height=0,
                                   width=0, variant=variant,
                                   paper_size=True, memory=True)
  (result,) = [per["cpu"] for per in out.values()][:1]
  if not result["ok"]:
    raise RuntimeError(f"{spec} {depths}: {result['error']}")
  return {"depths": list(depths), "total_bytes": result["total_bytes"],
          "compile_s": result["compile_s"], "network": network,
          "images": result["images"]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default="mic:hrda,daformer")
  parser.add_argument("--out", required=True)
  parser.add_argument("--budget_gib", type=float, default=24.0,
                      help="the device memory the verdict is against")
  args = parser.parse_args(argv)
  from benchmarks import lower_steps  # pylint: disable=g-import-not-at-top
  from jaxda.models import mit  # pylint: disable=g-import-not-at-top
  from experiments import results_files  # pylint: disable=g-import-not-at-top
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "mit_memory_fit.json")
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
    fit = [(tuple(p["depths"]), p["total_bytes"])
           for p in entry["points"][:len(FIT_DEPTHS)]]
    coef = fit_affine(fit)
    held = entry["points"][-1]
    name, _, variant = spec.partition(":")
    network = lower_steps.load_config(name, False, 0, 0, variant,
                                      True).daformer.network
    real = mit.MIT_VARIANTS[network].depths
    total = predict(coef, real)
    entry.update(
        coefficients_bytes=[float(c) for c in coef],
        held_out_error_bytes=predict(coef, held["depths"])
        - held["total_bytes"],
        predicted_depths=list(real), predicted_bytes=total,
        predicted_gib=round(total / gib, 3),
        fits_budget=bool(total <= args.budget_gib * gib))
    print(f"{spec}: {network} {real} -> {total / gib:.2f} GiB (held-out"
          f" error {entry['held_out_error_bytes'] / 2**20:+.1f} MiB)",
          flush=True)
    with open(path, "w") as f:
      json.dump(report, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
