"""Runs several methods over several seeds and prints mean ± std.

  python -m experiments.compare --methods=source_only,adaptsegnet,advent,oracle \
      --seeds=0,1,2 --out=runs/compare

Each (method, seed) run goes to ``OUT/<method>_seed<seed>`` (finished runs
are reused, interrupted ones resume); the table goes to stdout and
``OUT/results.json``. Extra ``--override key=value`` pairs apply to every run
(e.g. ``--override num_steps=600``). Runs are compared by target mIoU
(segmentation), accuracy (classification) or depth δ<1.25 (anchor tasks).
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app
from absl import flags
from absl import logging

_METHODS = flags.DEFINE_list(
    "methods", ["source_only", "adaptsegnet", "advent", "oracle"],
    "Config names under experiments/configs (optionally name:variant).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_OUT = flags.DEFINE_string("out", "runs/compare", "Output directory.")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "key=value applied to every config (dotted keys).")

# The config whose run (same seed) warm-starts the methods that adapt a
# source-only model, when it is part of the comparison.
_BASE_CONFIG = "source_only"


def headline(target: dict, method: str) -> tuple[str, float]:
  """The metric a run is compared by: its task's headline (mIoU, accuracy
  or depth δ<1.25)."""
  from jaxda import methods  # pylint: disable=g-import-not-at-top
  from jaxda import tasks  # pylint: disable=g-import-not-at-top
  return tasks.get_task(methods.get_method(method).task).headline(target)


def _load_config(spec: str):
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from experiments import main  # pylint: disable=g-import-not-at-top
  name, _, variant = spec.partition(":")
  module = config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
      f"{name}_config", main.config_path(name))
  return name, module.get_config(variant)


def _apply_override(config, item: str) -> None:
  key, _, value = item.partition("=")
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  old = node[leaf]
  node[leaf] = type(old)(value) if not isinstance(old, bool) else (
      value.lower() in ("1", "true", "yes"))


def _main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from jaxda import methods  # pylint: disable=g-import-not-at-top
  results = {}
  for spec in _METHODS.value:
    for seed in _SEEDS.value:
      _, config = _load_config(spec)
      config.seed = int(seed)
      for item in _OVERRIDES.value:
        _apply_override(config, item)
      label = spec.replace(":", "-")
      base_dir = os.path.join(_OUT.value, f"{_BASE_CONFIG}_seed{seed}")
      if (methods.get_method(config.method).warm_starts_from_source_only
          and not config.model.init_checkpoint
          and _BASE_CONFIG in _METHODS.value):
        # It starts from the source-only run of the same seed (the same
        # recipe its driver would otherwise train itself).
        config.model.init_checkpoint = base_dir
      workdir = os.path.join(_OUT.value, f"{label}_seed{seed}")
      summary_path = os.path.join(workdir, "summary.json")
      if os.path.exists(summary_path):
        with open(summary_path) as f:
          summary = json.load(f)
      else:
        t0 = time.time()
        summary = methods.train_and_evaluate(config, workdir)
        summary["wall_time_s"] = time.time() - t0
      metric, value = headline(summary["target"], summary["method"])
      entry = results.setdefault(label, {"metric": metric, "values": [],
                                         "wall_time_s": [], "seeds": []})
      entry["values"].append(value)
      entry["wall_time_s"].append(summary["wall_time_s"])
      entry["seeds"].append(int(seed))
  rows = [f"{'method':<24}{'target metric %':>22}{'wall s':>10}  seeds"]
  for label, e in results.items():
    m = [100 * v for v in e["values"]]
    e["mean"] = statistics.mean(m)
    e["std"] = statistics.stdev(m) if len(m) > 1 else 0.0
    rows.append(f"{label:<24}{e['mean']:>14.2f} ± {e['std']:<5.2f}"
                f"{statistics.mean(e['wall_time_s']):>10.0f}  {e['seeds']}"
                f"  ({e['metric']})")
  table = "\n".join(rows)
  print("\n" + table)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(_OUT.value, "results.txt"), "w") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  app.run(_main)
