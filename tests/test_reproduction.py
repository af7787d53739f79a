"""A committed result reproduces: the row in ``results/reproduction/``
re-run by the command that made it gives the same number, bit for bit,
while the code that produced it is unchanged.

Runs are deterministic on CPU for a given XLA:CPU code generation, i.e. the
same jax version and CPU feature flags (``results_files.machine``); on
another machine the test says so and skips. When ``jaxda/`` or
``experiments/`` changed since the row's commit it skips too, naming the
command that regenerates the row (about 30 s). The row is a short
source-only run (100 steps, the default data and evaluation) so that the
check fits the CI budget; its reason to be slow: it is the end-to-end
evidence that a committed number is what the code computes.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from experiments import results_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results", "reproduction")


def _row():
  with open(os.path.join(RESULTS, "table.json")) as f:
    (row,) = json.load(f)["rows"]
  with open(os.path.join(RESULTS, row["workdir"], "provenance.json")) as f:
    return row, json.load(f)


def command(row, out: str) -> list[str]:
  """The ``experiments.compare`` call that (re)makes ``row`` under ``out``."""
  overrides = []
  for key, value in sorted(row["config_diff"].items()):
    assert isinstance(value, (int, float, str, bool)), (key, value)
    overrides.append(f"--override={key}={value}")
  shift = ([f"--shifts={row['shift']}"]
           if row["workdir"] != f"{row['label']}_seed{row['seed']}" else [])
  return [sys.executable, "-m", "experiments.compare",
          f"--methods={row['label'].replace('-', ':')}",
          f"--seeds={row['seed']}", *shift, *overrides, f"--out={out}"]


def _code_changed_since(commit: str) -> bool | None:
  """True / False, or None when git cannot tell (no git, unknown commit)."""
  if shutil.which("git") is None:
    return None
  r = subprocess.run(["git", "diff", "--quiet", commit, "--", "jaxda",
                      "experiments"], cwd=ROOT, capture_output=True,
                     check=False)
  return {0: False, 1: True}.get(r.returncode)


def test_the_committed_row_is_clean_and_has_its_command():
  row, provenance = _row()
  assert not row["dirty"] and not provenance["dirty"], (
      "results/reproduction was made from a dirty tree; regenerate it")
  assert row["commit"] == provenance["commit"]
  # Its command names no machine-specific path (anyone can re-run it).
  assert all(ROOT not in a for a in command(row, "OUT")[1:])


def test_committed_row_reproduces_bitwise(tmp_path, shared_data_cache):
  row, provenance = _row()
  regenerate = " ".join(command(row, "results/reproduction")[1:])
  changed = _code_changed_since(row["commit"])
  if changed is None:
    pytest.skip(f"git cannot compare with {row['commit'][:10]}")
  if changed:
    pytest.skip(f"jaxda/ or experiments/ changed since {row['commit'][:10]};"
                f" regenerate the row: python {regenerate}")
  here, there = results_files.machine(), provenance["machine"]
  if (here["jax"], here["cpu_flags"]) != (there["jax"], there["cpu_flags"]):
    pytest.skip(f"other XLA:CPU code generation (jax {there['jax']}, CPU"
                f" flags {there['cpu_flags']} then; {here['jax']},"
                f" {here['cpu_flags']} here)")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"  # one device, optimised: the CLI's programs
  out = str(tmp_path / "out")
  data = [f"--override={r}.data_dir={shared_data_cache}"
          for r in ("source", "target")]  # where the data lives, not what
  r = subprocess.run(command(row, out) + data, cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(out, "table.json")) as f:
    (again,) = json.load(f)["rows"]
  assert {k: v for k, v in again["config_diff"].items()
          if not k.endswith(".data_dir")} == row["config_diff"]
  assert again["value"] == row["value"], (again["value"], row["value"])
  with open(os.path.join(out, again["workdir"], "summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(RESULTS, row["workdir"], "summary.json")) as f:
    committed = json.load(f)
  assert summary["target"] == committed["target"]


# results/current_code/final_code_check/<group>/<run> re-ran <run> of the
# committed table named here at the final code, on the same CPU type.
_FINAL_CHECKS = {
    "segmentation_texture": "current_code/embedded_segmentation",
    "crst_default": "current_code/embedded_segmentation",
    "anchor_depth": "current_code/anchor_depth",
    "anchor_normals": "current_code/anchor_normals",
    "digits_default": "current_code/digits_shifts",
}
# TPLD's default of that table is today's `tpld:no_target_bn,constant_lr`.
_RENAMED = {"tpld-no_target_bn+constant_lr": "tpld"}


def test_final_code_reruns_equal_the_committed_runs():
  """The README's claim that the older tables hold at the final code: each
  re-run's whole ``target`` block equals its committed run's."""
  checked = 0
  for group, table in _FINAL_CHECKS.items():
    root = os.path.join(ROOT, "results", "current_code", "final_code_check",
                        group)
    for run in sorted(os.listdir(root)):
      summary = os.path.join(root, run, "summary.json")
      if not os.path.isfile(summary):
        continue
      for old, new in _RENAMED.items():
        if run.startswith(old):
          run = new + run[len(old):]
      with open(summary) as f:
        got = json.load(f)["target"]
      with open(os.path.join(ROOT, "results", table, run,
                             "summary.json")) as f:
        want = json.load(f)["target"]
      assert got == want, (group, run)
      checked += 1
  assert checked == 12
