"""Result files of ``experiments.compare``: provenance, tables, what git keeps.

A results directory (``results/<benchmark>/``) holds one folder per run
with its ``summary.json`` (and ``rounds.json`` where the method writes one)
plus ``provenance.json`` (git commit, dirty tree, date, machine), and the
comparison's ``table.json`` + ``table.md``. Its ``.gitignore`` keeps exactly
those files, so checkpoints and pictures never get committed.

Why here and not in ``jaxda``: git and machine facts describe an experiment
run, not the library.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
from typing import Any

KEPT = ("summary.json", "rounds.json", "provenance.json", "selection.json",
        "table.json", "table.md")
_GITIGNORE = "\n".join(["# Written by experiments.compare: keep only the"
                        " result files.", "*", "!*/", "!.gitignore",
                        *[f"!{name}" for name in KEPT]]) + "\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_state() -> dict[str, Any]:
  """``{'commit', 'dirty'}`` of the code (jaxda/ and experiments/)."""
  def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True,
                          text=True, check=False)
  head = git("rev-parse", "HEAD")
  if head.returncode != 0:
    return {"commit": None, "dirty": None}
  dirty = git("diff", "--quiet", "HEAD", "--", "jaxda", "experiments")
  return {"commit": head.stdout.strip(), "dirty": dirty.returncode != 0}


def machine() -> dict[str, Any]:
  """CPU model, core count, a hash of the CPU's feature flags (XLA:CPU
  compiles for them, so two machines give bitwise-equal runs only when
  they match) and the JAX devices of this process."""
  cpu, flags = platform.processor() or platform.machine(), ""
  model = None
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:  # the first core's model name and flags
        if line.startswith("model name") and model is None:
          model = cpu = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
          flags = " ".join(sorted(line.split(":", 1)[1].split()))
  except OSError:
    pass
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {"cpu": cpu, "cores": os.cpu_count(),
          "cpu_flags": hashlib.sha1(flags.encode()).hexdigest()[:12]
                       if flags else "",
          "device": f"{len(devices)} x {devices[0].device_kind}",
          "platform": devices[0].platform, "jax": jax.__version__}


def provenance() -> dict[str, Any]:
  return {**git_state(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"),
          "machine": machine()}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def config_diff(config: dict[str, Any], default: dict[str, Any]
                ) -> dict[str, Any]:
  """``{dotted key: value}`` where ``config`` differs from ``default``
  (keys only one of them has included; seed excluded, it has a column)."""
  a, b = _flat(config), _flat(default)
  return {k: a.get(k) for k in sorted(set(a) | set(b))
          if k != "seed" and a.get(k) != b.get(k)}


def write_gitignore(out: str) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, ".gitignore"), "w") as f:
    f.write(_GITIGNORE)


def aggregate(rows: list[dict[str, Any]], baseline: str
              ) -> dict[str, dict[str, Any]]:
  """Per label: mean ± std (percent) of the headline, seeds, wall time, and
  the mean gain over the ``baseline`` label's row of the same shift and
  seed."""
  by_key = {(r["label"], r["shift"], r["seed"]): r for r in rows}
  out: dict[str, dict[str, Any]] = {}
  for r in rows:
    e = out.setdefault(f"{r['label']}|{r['shift']}", {
        "label": r["label"], "shift": r["shift"], "metric": r["metric"],
        "values": [], "seeds": [], "wall_time_s": [], "gains": []})
    e["values"].append(100 * r["value"])
    for k, v in r.get("extra", {}).items():
      e.setdefault("extra_values", {}).setdefault(k, []).append(v)
    e["seeds"].append(r["seed"])
    e["wall_time_s"].append(r["wall_time_s"])
    base = by_key.get((baseline, r["shift"], r["seed"]))
    if base is not None and r is not base:
      e["gains"].append(100 * (r["value"] - base["value"]))
  for e in out.values():
    v = e["values"]
    e["mean"] = statistics.mean(v)
    e["std"] = statistics.stdev(v) if len(v) > 1 else 0.0
    e["gain"] = statistics.mean(e["gains"]) if e["gains"] else None
    e["extra"] = {k: [statistics.mean(x),
                      statistics.stdev(x) if len(x) > 1 else 0.0]
                  for k, x in e.pop("extra_values", {}).items()}
  return out


def markdown(table: dict[str, Any]) -> str:
  """The table as Markdown: one row per (method, shift)."""
  p = table["provenance"]
  # The tasks' further columns (angles, abs-rel), in first-seen order.
  extra = list(dict.fromkeys(
      k for e in table["aggregate"].values() for k in e.get("extra", {})))
  commits = sorted({(r.get("commit") or "unknown")[:10]
                    + (" (dirty)" if r.get("dirty") else "")
                    for r in table["rows"]})
  lines = [f"Runs at commit(s) {', '.join(f'`{c}`' for c in commits)};"
           f" table written at `{(p['commit'] or 'unknown')[:10]}`"
           f"{' (dirty tree)' if p['dirty'] else ''}, {p['date']},"
           f" {p['machine']['cpu']} ({p['machine']['cores']} cores,"
           f" {p['machine']['device']}).", "",
           f"| method | shift | metric | mean ± std (%) | gain over"
           f" {table['baseline']}"
           + "".join(f" | {k}" for k in extra)
           + " | seeds | wall s (mean) |",
           "|---|---|---|---|---|" + "---|" * len(extra) + "---|---|"]
  for e in table["aggregate"].values():
    gain = "—" if e["gain"] is None else f"{e['gain']:+.2f}"
    cells = "".join(
        f" {e['extra'][k][0]:.2f} ± {e['extra'][k][1]:.2f} |"
        if k in e.get("extra", {}) else " — |" for k in extra)
    lines.append(
        f"| {e['label']} | {e['shift']} | {e['metric']} |"
        f" {e['mean']:.2f} ± {e['std']:.2f} | {gain} |{cells}"
        f" {','.join(map(str, e['seeds']))} |"
        f" {statistics.mean(e['wall_time_s']):.0f} |")
  return "\n".join(lines) + "\n"


def write_table(out: str, rows: list[dict[str, Any]], baseline: str
                ) -> dict[str, Any]:
  """Writes ``table.json`` and ``table.md`` under ``out`` (gains against
  the ``baseline`` label); returns the table."""
  table = {"provenance": provenance(), "rows": rows, "baseline": baseline,
           "aggregate": aggregate(rows, baseline)}
  write_gitignore(out)
  with open(os.path.join(out, "table.json"), "w") as f:
    json.dump(table, f, indent=2, default=str)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(markdown(table))
  return table
