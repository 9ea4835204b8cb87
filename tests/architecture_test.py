"""The package's shape, read from its sources: no import cycle, commands on
top, function-local imports only with a stated reason, a short top level,
one interface for the evaluation scorers, a JAX-free config check."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "adjax"

# The commands: what a user runs. Nothing else may import them.
COMMANDS = {"adjax.main", "adjax.experiment", "adjax.train", "adjax.evaluate",
            "adjax.predict", "adjax.export", "adjax.serve"}
TOP_LEVEL_LIMIT = 17


def _modules() -> dict[str, Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def _imports(name: str, path: Path, modules: dict[str, Path]):
  """Yields (imported adjax module, line, at top level) for each import in `path`."""
  tree = ast.parse(path.read_text())
  top = {id(node) for node in tree.body}
  for node in ast.walk(tree):
    targets = []
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        targets.append(full if full in modules else node.module)
    elif isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    for target in targets:
      if target.split(".")[0] == "adjax" and target != name:
        yield target, node.lineno, id(node) in top


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = {name: set() for name in modules}
  for name, path in modules.items():
    for target, _, _ in _imports(name, path, modules):
      # `from adjax import x` where x is a module names x; a package's own
      # __init__ is what `import adjax.data` loads first.
      while target not in modules and "." in target:
        target = target.rsplit(".", 1)[0]
      if target in modules and target != name and target != "adjax":
        graph[name].add(target)
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, found = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        found.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_no_import_cycle():
  assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_one():
  """The check above can fail: a made-up a -> b -> c -> a is found."""
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_below_the_commands_imports_a_command():
  graph = _graph()
  below = {name for name in graph if name not in COMMANDS
           and not name.startswith("adjax.bench")}
  offending = sorted(f"{name} imports {target}" for name in below
                     for target in graph[name] if target in COMMANDS)
  assert offending == []


def test_function_local_imports_state_why_they_are_deferred():
  """An import inside a function defers a heavy or optional dependency, and
  says so on its line (`# deferred: <reason>`); any other import is at the top."""
  unexplained = []
  for path in sorted(PACKAGE.rglob("*.py")):
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
        line = lines[node.lineno - 1]
        if line[:1].isspace() and "deferred:" not in line.split("#", 1)[-1]:
          unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}: {line.strip()}")
  assert unexplained == [], "function-local imports without a reason:\n" + "\n".join(
      unexplained)


def test_the_top_level_is_short():
  flat = sorted(p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
  assert len(flat) <= TOP_LEVEL_LIMIT, (
      f"{len(flat)} modules directly in adjax/ (at most {TOP_LEVEL_LIMIT}): {flat}")


def test_one_module_per_role_name():
  """No two modules share a file name (e.g. two thresholds.py); the
  benchmarks are named after what they measure."""
  names: dict[str, list[str]] = {}
  for path in PACKAGE.rglob("*.py"):
    if path.name not in ("__init__.py", "__main__.py") and path.parent.name != "bench":
      names.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
  assert {k: v for k, v in names.items() if len(v) > 1} == {}


def test_the_config_check_and_modes_load_without_jax():
  code = ("import sys, adjax.config.check, adjax.modes, adjax.config.load\n"
          "print(sorted(m for m in ('jax', 'flax', 'grain') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, check=True).stdout.strip()
  assert out == "[]"


def test_both_evaluation_scorers_implement_the_interface():
  """`scorer.ModeScorer` is the one statement of what `evaluate.Evaluator`
  asks; the zero-shot and the neighbour scorers implement every method with
  the same parameters, and its attributes."""
  from adjax import scoring_modes
  from adjax.scorer import ModeScorer, ZeroShotScorer
  methods = {n: f for n, f in vars(ModeScorer).items()
             if callable(f) and not n.startswith("_")}
  attributes = set(ModeScorer.__annotations__)
  assert len(methods) >= 10 and {"scoring", "model", "towers"} <= attributes
  for cls in (ZeroShotScorer, scoring_modes.NeighbourScorer):
    for name, proto in methods.items():
      impl = getattr(cls, name, None)
      assert impl is not None, f"{cls.__name__} lacks {name}"
      assert (list(inspect.signature(impl).parameters)
              == list(inspect.signature(proto).parameters)), f"{cls.__name__}.{name}"
    missing = attributes - _assigned(cls)
    assert not missing, f"{cls.__name__} does not set {sorted(missing)}"


def _assigned(cls) -> set[str]:
  """Names a class assigns in its body or as `self.x` anywhere in its methods."""
  tree = ast.parse(inspect.getsource(cls).lstrip())
  names = set()
  for node in ast.walk(tree):
    targets = node.targets if isinstance(node, ast.Assign) else (
        [node.target] if isinstance(node, ast.AnnAssign) else [])
    for target in targets:
      for leaf in ast.walk(target):
        if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) \
            and leaf.value.id == "self":
          names.add(leaf.attr)
        elif isinstance(leaf, ast.Name) and isinstance(leaf.ctx, ast.Store):
          names.add(leaf.id)
  return names
