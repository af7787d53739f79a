"""Writes README.md's result tables from the committed result files.

  python -m experiments.report           # rewrite the generated blocks
  python -m experiments.report --check   # exit 1 (one line) if they differ

A generated block is an HTML comment naming a table file, the generated
Markdown, and a closing comment::

  <!-- results: results/embedded_segmentation/table.json -->
  ... (written by this module: never edit by hand) ...
  <!-- /results -->

The Markdown is ``experiments.results_files.markdown`` of that
``table.json`` (``experiments.compare`` writes it): the commits of the runs,
the commit and date the table was written at, the machine, and per method
and shift the mean ± std over seeds and the gain over the baseline.
``tests/test_report.py`` fails when README.md and the files disagree.
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app
from absl import flags

from experiments import results_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BLOCK = re.compile(
    r"(<!-- results: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /results -->)",
    re.DOTALL)

_CHECK = flags.DEFINE_bool("check", False, "Only compare; exit 1 if README"
                           " differs from the result files.")
_README = flags.DEFINE_string("readme", os.path.join(ROOT, "README.md"),
                              "The Markdown file with generated blocks.")


class ReportError(ValueError):
  """A block names a table file that is missing or unreadable."""


def table_markdown(path: str, root: str = ROOT) -> str:
  """The Markdown of one ``table.json`` (path relative to ``root``)."""
  full = os.path.join(root, path)
  try:
    with open(full) as f:
      table = json.load(f)
  except (OSError, ValueError) as e:
    raise ReportError(f"{path}: cannot read the table ({e}); run"
                      " experiments.compare with --out set to its folder")
  return results_files.markdown(table)


def render(text: str, root: str = ROOT) -> str:
  """``text`` with every generated block re-written from its file."""
  return _BLOCK.sub(
      lambda m: m.group(1) + table_markdown(m.group("path"), root)
      + m.group(4), text)


def blocks(text: str) -> list[str]:
  """The table paths of the generated blocks, in order."""
  return [m.group("path") for m in _BLOCK.finditer(text)]


def _main(argv):
  del argv
  with open(_README.value) as f:
    text = f.read()
  try:
    new = render(text, os.path.dirname(os.path.abspath(_README.value)))
  except ReportError as e:
    sys.exit(f"report: {e}")
  paths = blocks(text)
  if _CHECK.value:
    if new != text:
      sys.exit(f"report: {_README.value} differs from the result files;"
               " run python -m experiments.report")
    print(f"{len(paths)} generated tables match their files")
    return
  if new != text:
    with open(_README.value, "w") as f:
      f.write(new)
  print(f"{len(paths)} generated tables written: {', '.join(paths)}")


if __name__ == "__main__":
  app.run(_main)
