"""experiments.report: README's result tables come from the result files."""

import json
import os

import pytest

from experiments import report
from experiments import results_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_tables_match_the_result_files():
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  paths = report.blocks(text)
  assert paths, "README has no generated result table"
  for path in paths:
    assert os.path.isfile(os.path.join(ROOT, path)), path
  assert report.render(text) == text, (
      "README's generated tables differ from the result files: run"
      " python -m experiments.report")


def _table(value):
  rows = [{"label": "source_only", "method": "source_only", "seed": 0,
           "shift": "default", "metric": "miou", "value": value,
           "wall_time_s": 10.0, "commit": "abc", "dirty": False}]
  return {"provenance": {"commit": "abc", "dirty": False, "date": "today",
                         "machine": {"cpu": "x", "cores": 2,
                                     "device": "1 x cpu"}},
          "rows": rows, "baseline": "source_only",
          "aggregate": results_files.aggregate(rows, "source_only")}


def test_render_rewrites_only_the_blocks(tmp_path):
  os.makedirs(tmp_path / "results" / "b")
  with open(tmp_path / "results" / "b" / "table.json", "w") as f:
    json.dump(_table(0.25), f)
  text = ("intro 1.0\n<!-- results: results/b/table.json -->\n| stale 9.99 |\n"
          "<!-- /results -->\noutro 2.0\n")
  new = report.render(text, str(tmp_path))
  assert new.startswith("intro 1.0\n<!-- results: results/b/table.json -->\n")
  assert new.endswith("<!-- /results -->\noutro 2.0\n")
  assert "stale" not in new and "| source_only | default | miou | 25.00 ±" in new
  assert report.render(new, str(tmp_path)) == new  # a fixed point
  with pytest.raises(report.ReportError, match="results/missing/table.json"):
    report.render(text.replace("results/b", "results/missing"),
                  str(tmp_path))
