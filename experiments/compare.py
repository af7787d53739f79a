"""Runs several methods over several seeds and prints mean ± std.

  python -m experiments.compare --methods=source_only,adaptsegnet,advent,oracle \
      --seeds=0,1,2 --out=runs/compare

Each (method, [shift,] seed) run goes to ``OUT/<method>[_<shift>]_seed<seed>``
(finished runs are reused, interrupted ones resume) with a
``provenance.json`` (commit, dirty tree, date, machine). The table goes to
stdout and to ``OUT/table.json`` + ``OUT/table.md`` (per method and shift:
mean ± std over seeds, the gain over the ``--baseline`` (default: the
first method) of the same shift and seed; per run: value, wall time, commit, config diff against the method's
default). ``OUT/.gitignore`` keeps only those result files, so
``results/<benchmark>/`` can be committed as it is
(``experiments/results_files.py``). ``--shifts=default,weather`` runs each
method on those target shifts. Extra ``--override key=value`` pairs apply to
every run (e.g. ``--override num_steps=600``); ``--only_finished`` tables
the finished runs and trains nothing. Runs are compared by target
mIoU (segmentation), accuracy (classification) or depth δ<1.25 (anchor
tasks). A user mistake (unknown method, bad override, bad config, a linked
base run with no checkpoint) ends in one line naming the run and exit code
2; finished runs stay and are reused on the next call.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

from experiments import results_files

_METHODS = flags.DEFINE_list(
    "methods", ["source_only", "adaptsegnet", "advent", "oracle"],
    "Config names under experiments/configs (optionally name:variant;"
    " several variants joined by '+', e.g. tpld:tiny+adapted_base).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_OUT = flags.DEFINE_string("out", "runs/compare", "Output directory.")
_SHIFTS = flags.DEFINE_list(
    "shifts", [], "Target shifts (config.target.shift) to run each method on;"
    " empty: the configs' own.")
_BASELINE = flags.DEFINE_string(
    "baseline", "", "Label (method spec) the gains are measured against;"
    " empty: the first of --methods.")
_ONLY_FINISHED = flags.DEFINE_bool(
    "only_finished", False, "Table the finished runs only (train nothing);"
    " the missing ones are listed. For re-writing a table after runs made by"
    " several invocations.")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "key=value applied to every config (dotted keys).")

# The config whose run (same seed) warm-starts the methods that adapt a
# source-only model, when it is part of the comparison.
_BASE_CONFIG = "source_only"


def _task(method: str):
  from jaxda import methods  # pylint: disable=g-import-not-at-top
  from jaxda import tasks  # pylint: disable=g-import-not-at-top
  return tasks.get_task(methods.get_method(method).task)


def headline(target: dict, method: str) -> tuple[str, float]:
  """The metric a run is compared by: its task's headline (mIoU, accuracy,
  depth δ<1.25 or normals within 22.5°)."""
  return _task(method).headline(target)


def table_metrics(target: dict, method: str) -> dict[str, float]:
  """The task's further table columns (angles, abs-rel; {} for none)."""
  fn = _task(method).table_metrics
  return fn(target) if fn is not None else {}


class _RunError(Exception):
  """A user error in one run, with the run's name (printed in one line)."""


def _load_config(spec: str):
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from experiments import main  # pylint: disable=g-import-not-at-top
  name, _, variant = spec.partition(":")
  variant = variant.replace("+", ",")  # --methods is itself comma-separated
  if not os.path.exists(main.config_path(name)):
    # Every module under configs/ but the shared ones is an entry point's.
    known = sorted(
        f[:-3] for f in os.listdir(os.path.dirname(main.config_path(name)))
        if f.endswith(".py") and f[0] != "_" and "common" not in f)
    raise _RunError(f"unknown method '{name}' in --methods; known:"
                    f" {', '.join(known)}")
  module = config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
      f"{name}_config", main.config_path(name))
  return name, module.get_config(variant)


def _apply_override(config, item: str) -> None:
  key, _, value = item.partition("=")
  *parents, leaf = key.split(".")
  node = config
  try:
    for p in parents:
      node = node[p]
    old = node[leaf]
    node[leaf] = type(old)(value) if not isinstance(old, bool) else (
        value.lower() in ("1", "true", "yes"))
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    why = " ".join(str(e.args[0] if e.args else e).split())
    if isinstance(e, (KeyError, AttributeError)):
      why = f"no config key {key!r}" + (
          "; did you mean " + why.split("Did you mean ")[1].split()[0]
          if "Did you mean " in why else "")
    raise _RunError(f"bad --override {item!r} ({why}); keys and types are"
                    " those of experiments/configs/*.py") from None


def _train(config, workdir: str) -> dict:
  """The entry points' path: config checks first (one-line errors before
  anything trains), then the method's driver or the loop."""
  from jaxda import methods  # pylint: disable=g-import-not-at-top
  from jaxda.train import loop  # pylint: disable=g-import-not-at-top
  loop.validate_config(config, methods.get_method(config.method))
  return methods.train_and_evaluate(config, workdir)


def _run_one(spec: str, seed: str, shift: str | None):
  """Trains (or reuses) one run; returns its table row (None: not run and
  ``--only_finished``)."""
  from jaxda import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxda import methods  # pylint: disable=g-import-not-at-top
  from experiments import main  # pylint: disable=g-import-not-at-top
  name, config = _load_config(spec)
  _, default = _load_config(name)
  config.seed = int(seed)
  if shift is not None:
    config.target.shift = shift
  for item in _OVERRIDES.value:
    _apply_override(config, item)
  label = spec.replace(":", "-")
  where = f"_{shift}" if shift is not None else ""
  # Self-training may start from another base (self_training.base_method:
  # 'adaptsegnet' under the adapted_base variant); GAM from source-only.
  base_name = (config.self_training.get("base_method", _BASE_CONFIG)
               if "self_training" in config else _BASE_CONFIG)
  base_dir = os.path.join(_OUT.value, f"{base_name}{where}_seed{seed}")
  linked_base = (methods.get_method(config.method).warm_starts_from_source_only
                 and not config.model.init_checkpoint
                 and base_name in _METHODS.value)
  if linked_base:
    # It starts from the base method's run of the same seed (its default
    # config is the recipe the driver would otherwise train itself: 1200
    # steps, lr 0.02 poly, for source-only and AdaptSegNet alike).
    config.model.init_checkpoint = base_dir
  workdir = os.path.join(_OUT.value, f"{label}{where}_seed{seed}")
  summary_path = os.path.join(workdir, "summary.json")
  provenance_path = os.path.join(workdir, "provenance.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
  elif _ONLY_FINISHED.value:
    return None
  else:
    # The code state when the run starts (a commit made while it trains
    # is not the code it ran).
    started = results_files.provenance()
    t0 = time.time()
    try:
      summary = _train(config, workdir)
    except main.user_errors() as e:
      hint = ""
      if linked_base and isinstance(e, checkpoint.CheckpointError):
        hint = (f" ({label} warm-starts from the {base_name} run of seed"
                f" {seed}, {base_dir}; a committed results directory keeps"
                " summaries, not checkpoints: move that run away to retrain"
                " it, or pass --override model.init_checkpoint=PATH)")
      raise _RunError(f"{label}{where.replace('_', ' on ')} seed {seed}:"
                      f" {e}{hint}") from None
    # The whole run's time (a driver's base model and rounds included).
    with open(provenance_path, "w") as f:
      json.dump({**started, "wall_time_s": round(time.time() - t0, 2)}, f,
                indent=2)
  provenance = {}
  if os.path.exists(provenance_path):
    with open(provenance_path) as f:
      provenance = json.load(f)
  metric, value = headline(summary["target"], summary["method"])
  return {"label": label, "method": summary["method"], "seed": int(seed),
          "shift": shift or config.target.get("shift", "default"),
          "metric": metric, "value": value,
          "extra": table_metrics(summary["target"], summary["method"]),
          "wall_time_s": provenance.get("wall_time_s",
                                        summary["wall_time_s"]),
          "commit": provenance.get("commit"),
          "dirty": provenance.get("dirty"),
          "config_diff": results_files.config_diff(
              summary["config"], default.to_dict()),
          "workdir": os.path.relpath(workdir, _OUT.value)}


def _main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  shifts = _SHIFTS.value or [None]
  runs = [(spec, seed, shift) for shift in shifts
          for spec in _METHODS.value for seed in _SEEDS.value]
  try:
    rows = [_run_one(*run) for run in runs]
  except _RunError as e:
    # Finished runs stay on disk; rerunning the command reuses them.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  missing = [run for run, row in zip(runs, rows) if row is None]
  if missing:
    print("not run (--only_finished): " + ", ".join(
        f"{spec} seed {seed}" + (f" on {shift}" if shift else "")
        for spec, seed, shift in missing))
  rows = [row for row in rows if row is not None]
  baseline = _BASELINE.value or _METHODS.value[0].replace(":", "-")
  table = results_files.write_table(_OUT.value, rows, baseline)
  print("\n" + results_files.markdown(table))


if __name__ == "__main__":
  app.run(_main)
