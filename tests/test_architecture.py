"""The package's structure rules (issue 19), checked on the source tree.

Walks the AST of every module under ``jaxda/`` (nothing is imported):

1. no import cycle, and no lower layer imports a higher one;
2. no file outside ``jaxda/methods/`` compares anything to a method name,
   and none outside ``jaxda/tasks/`` compares anything to a task name;
3. no module over 600 lines, no two modules with the same base name;
4. one definition of the ignore label.
"""

from __future__ import annotations

import ast
import collections
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxda"
MAX_LINES = 600

# Layers, lowest first: a module may import its own layer or lower ones.
LAYERS = (
    ("math", ("jaxda.types", "jaxda.losses", "jaxda.ops", "jaxda.metrics",
              "jaxda.hrda_fusion")),
    ("models", ("jaxda.models",)),
    ("data", ("jaxda.data",)),
    ("infra", ("jaxda.parallel", "jaxda.state", "jaxda.optim",
               "jaxda.checkpoint", "jaxda.writers", "jaxda.visualize",
               "jaxda.weights", "jaxda.host_memory")),
    ("tasks", ("jaxda.tasks",)),
    ("train", ("jaxda.train",)),
    ("methods", ("jaxda.methods",)),
)
# Pure math that lives beside its method: may import only the math layer.
PURE_MATH = ("jaxda.methods.self_training.thresholds",
             "jaxda.methods.self_training.densify",
             "jaxda.methods.self_training.easy_hard",
             "jaxda.methods.self_training.progress",
             "jaxda.methods.self_training.recipe_math",
             "jaxda.methods.gam.matching",
             "jaxda.methods.daformer",
             "jaxda.methods.daformer.teacher",
             "jaxda.methods.daformer.mixing",
             "jaxda.methods.daformer.photometric",
             "jaxda.methods.daformer.rare_class",
             "jaxda.methods.daformer.feature_distance",
             "jaxda.methods.daformer.masking",
             "jaxda.methods.daformer.schedule",
             "jaxda.hrda_fusion")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
  """jaxda modules ``name`` imports (``from a import b`` resolves b if it is
  a module), at any depth of the file (function-level imports count)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("jaxda"))
    elif isinstance(node, ast.ImportFrom) and node.module:
      assert not node.level, f"{path}: relative import; jaxda uses absolute"
      if not node.module.startswith("jaxda"):
        continue
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        found.add(sub if sub in MODULES else node.module)
  found.discard(name)
  return {m for m in found if m in MODULES}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
  for i, (_, prefixes) in enumerate(LAYERS):
    if any(name == p or name.startswith(p + ".") for p in prefixes):
      return i
  return -1  # jaxda/__init__.py


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of ``graph`` (package __init__ edges included)."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_no_import_cycle():
  # A package's __init__ that imports its submodules (the registries) is
  # not a cycle with a submodule importing a sibling: only module -> module
  # edges between files count, with __init__ files treated as files.
  assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH))


def test_cycle_detector_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_lower_layers_never_import_higher_ones(name):
  mine = _layer(name)
  if name in PURE_MATH:
    mine = 0
  upward = sorted(m for m in GRAPH[name]
                  if (0 if m in PURE_MATH else _layer(m)) > mine)
  assert not upward, f"{name} (layer {LAYERS[mine][0]}) imports {upward}"


def _method_and_task_names() -> tuple[set[str], set[str]]:
  """Registry names, read from the registries' source (not imported)."""
  methods = set()
  for path in (PACKAGE / "methods").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "Method") or (
              isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "Method"):
        for kw in node.keywords:
          if kw.arg == "name" and isinstance(kw.value, ast.Constant):
            methods.add(kw.value.value)
  tasks = set()
  for path in (PACKAGE / "tasks").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Call) and getattr(
          node.func, "attr", getattr(node.func, "id", None)) == "Task":
        for kw in node.keywords:
          if kw.arg == "name" and isinstance(kw.value, ast.Constant):
            tasks.add(kw.value.value)
  return methods, tasks


METHOD_NAMES, TASK_NAMES = _method_and_task_names()


def _name_comparisons(path: pathlib.Path, names: set[str]) -> list[str]:
  """``x == 'name'``, ``x != 'name'``, ``x in ('name', ...)`` in ``path``."""
  hits = []
  for node in ast.walk(ast.parse(path.read_text())):
    if not isinstance(node, ast.Compare):
      continue
    for op, right in zip(node.ops, node.comparators):
      values = []
      for side in (node.left, right):
        if isinstance(side, ast.Constant):
          values.append(side.value)
        elif isinstance(side, (ast.Tuple, ast.List, ast.Set)):
          values += [e.value for e in side.elts if isinstance(e, ast.Constant)]
      if isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)):
        bad = sorted(v for v in values if isinstance(v, str) and v in names)
        if bad:
          where = (path.relative_to(ROOT) if path.is_relative_to(ROOT)
                   else path)
          hits.append(f"{where}:{node.lineno} {bad}")
  return hits


def test_registries_were_read():
  assert {"source_only", "adaptsegnet", "tpld", "gam", "dann",
          "tada"} <= METHOD_NAMES
  assert {"segmentation", "classification"} <= TASK_NAMES


def test_name_comparison_detector(tmp_path):
  f = tmp_path / "x.py"
  f.write_text("if config.method == 'gam' or m in ('tada', 'x'):\n  pass\n")
  assert len(_name_comparisons(f, {"gam", "tada"})) == 2


def test_no_method_name_comparisons_outside_methods():
  hits = []
  for name, path in MODULES.items():
    if not name.startswith("jaxda.methods"):
      hits += _name_comparisons(path, METHOD_NAMES)
  for path in sorted((ROOT / "experiments").rglob("*.py")):
    if "configs" not in path.parts:  # Presets name their own method.
      hits += _name_comparisons(path, METHOD_NAMES)
  assert not hits, hits


def test_no_task_branches_outside_tasks():
  hits = []
  for name, path in MODULES.items():
    if not name.startswith("jaxda.tasks"):
      hits += _name_comparisons(path, TASK_NAMES)
  assert not hits, hits


def test_modules_are_small():
  long = {name: n for name, path in MODULES.items()
          if (n := len(path.read_text().splitlines())) > MAX_LINES}
  assert not long, long


def test_no_two_modules_share_a_base_name():
  by_base = collections.defaultdict(list)
  for name, path in MODULES.items():
    if path.name != "__init__.py":
      by_base[path.stem].append(name)
  clashes = {k: v for k, v in by_base.items() if len(v) > 1}
  assert not clashes, clashes


def test_one_ignore_label():
  definitions = []
  for name, path in MODULES.items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.Assign, ast.AnnAssign)):
        value = node.value
        if isinstance(value, ast.Constant) and value.value == 255:
          targets = (node.targets if isinstance(node, ast.Assign)
                     else [node.target])
          definitions += [f"{name}.{t.id}" for t in targets
                          if isinstance(t, ast.Name) and t.id.isupper()]
  assert definitions == ["jaxda.types.IGNORE_LABEL"], definitions


def _layout_block() -> str:
  readme = (ROOT / "README.md").read_text()
  section = readme[readme.index("## Layout"):]
  return section[section.index("```") + 3:section.index("```", section.index("```") + 3)]


def test_readme_module_map_matches_the_tree():
  block = _layout_block()
  # Every path the map names exists ...
  named = set()
  for line in block.splitlines():
    first = line.split()[0] if line.strip() else ""
    if first.startswith("jaxda/"):
      named.add(first.rstrip("/"))
      assert (ROOT / first).exists(), f"README Layout names missing {first}"
  # ... and every package of jaxda/ is in the map.
  packages = {str(p.parent.relative_to(ROOT)) for p in PACKAGE.rglob("__init__.py")}
  missing = sorted(p for p in packages if p != "jaxda" and p not in named
                   and not any(p.startswith(n + "/") for n in named))
  assert not missing, f"packages missing from README's Layout: {missing}"
  # Every top-level module is named.
  for path in PACKAGE.glob("*.py"):
    if path.name != "__init__.py":
      assert path.name in block or path.stem + ".py" in block, path.name
