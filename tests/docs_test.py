"""Every fenced code block in README.md and docs/*.md is run, checked or marked.

A block a user would run is either executed by a named test (`EXECUTED`: the
test reads the block from its page through `doc_blocks.block`, so a changed
block is what it runs), or, where running needs what this machine lacks
(MVTec AD, a GPU, real weights, a trained run), checked statically: every
`python -m` module exists, every flag is one its module defines, every
`--config=` file loads (with its variant), every `--config.x.y=` key is a
declared field, every shipped path it names exists, every Python import and
module attribute resolves. A block that is not a command (a table printed,
a usage synopsis) is marked `<!-- output -->` on the line before its fence.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import re
import shlex
import tomllib

import pytest

import doc_blocks
from doc_blocks import ROOT

# (page, a text that identifies the block, the test that executes it).
EXECUTED = [
    ("README.md", "python -m adjax.main --config=configs/demo.py\n",
     "tests/experiment_test.py::test_demo_reaches_its_auroc_floor"),
    ("README.md", 'pip install -e ".[test]" && python -m pytest -q -n 2',
     ".ci/run"),
    ("docs/scoring-modes.md", "# a fresh workdir: no training, no text weights",
     "tests/scoring_modes_test.py::test_demo_neighbour_modes_reach_their_floors"),
    ("README.md", "Detector.from_workdir",
     "tests/detector_test.py::test_readme_python_example_runs"),
    ("docs/api.md", "Detector.from_workdir",
     "tests/detector_test.py::test_docs_python_example_runs"),
    ("docs/api.md", "curl -s", "tests/serve_test.py::test_docs_curl_examples"),
    ("docs/deploy.md", "onnxruntime as ort",
     "tests/export_test.py::test_docs_snippet_feeds_what_predict_feeds"),
]

SHIPPED = ("configs/", "tests/", "adjax/", "converters/", "docs/", ".ci/")
SHELL_LANGS = ("bash", "sh", "shell", "console", "")
# Commands other than python's: what each must satisfy is checked below.
OTHER_COMMANDS = {"pip", ".", "source", "hf", "curl", "sed", "git"}


def _all_blocks():
  return [b for page in doc_blocks.pages() for b in doc_blocks.blocks(page)]


def _executed(b) -> str | None:
  for page, key, test in EXECUTED:
    if b.page == page and key in b.text:
      return test
  return None


@pytest.mark.parametrize("page,key,test", EXECUTED)
def test_executed_blocks_exist_and_their_tests_read_them(page, key, test):
  """Fails if a registered block left its page, or its test no longer reads
  that page (or no longer exists)."""
  text = doc_blocks.block(page, key)
  if test == ".ci/run":             # CI runs the README's test command itself
    ci = (ROOT / ".ci/run").read_text()
    line = next(l for l in text.splitlines() if key in l)
    assert line in ci, f"{page}'s test command is not the one .ci/run runs:\n{line}"
    return
  path, name = test.split("::")
  source = (ROOT / path).read_text()
  tree = ast.parse(source)
  fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
  assert fn is not None, f"{test} does not exist"
  assert f'"{page}"' in source, f"{path} does not read {page} (doc_blocks.block({page!r}, ...))"


def test_every_block_is_executed_checked_or_marked():
  """Fails if a page gains a block that is neither a shell command block, a
  Python block, nor marked as output; or an output mark hides a command."""
  problems = []
  for b in _all_blocks():
    first = next((l for l in b.text.splitlines() if l.strip()), "")
    if b.output:
      if re.match(r"\s*(python3?|pip|curl)\s", first):
        problems.append(f"{b.where()}: marked output, but it is a command: {first}")
    elif b.lang not in SHELL_LANGS + ("python",):
      problems.append(f"{b.where()}: a {b.lang} block; mark it {doc_blocks.OUTPUT_MARK} "
                      "or make it a command")
    elif b.lang in SHELL_LANGS and not doc_blocks.commands(b.text):
      problems.append(f"{b.where()}: holds no command; mark it {doc_blocks.OUTPUT_MARK}")
  assert not problems, "\n".join(problems)


# ---- static checks -------------------------------------------------------------

@functools.cache
def _declared_keys() -> frozenset[str]:
  from adjax.config import defaults, doc, schema
  leaves = {n for n, _, _ in doc.rows(defaults.base_config())}
  return frozenset(leaves | {n for n, _ in schema.declared()})


@functools.cache
def _module_flags(module: str) -> frozenset[str]:
  """The flags a `python -m` module defines, read from its source (argparse
  `"--name"` strings and absl `DEFINE_*("name", ...)`)."""
  spec = importlib.util.find_spec(module)
  assert spec is not None and spec.origin, module
  sources = [spec.origin]
  if module.startswith("converters."):
    sources.append(str(ROOT / "converters" / "common.py"))
  flags = set()
  for src in sources:
    text = open(src).read()
    flags |= set(re.findall(r"""["'](--[A-Za-z][\w-]*)["']""", text))
    flags |= {f"--{n}" for n in re.findall(r"""DEFINE_\w+\(\s*["'](\w+)["']""", text)}
  if module == "adjax.main":
    flags |= {"--verbosity", "--helpfull"}         # absl's own
  return frozenset(flags)


def _flags_of(args: list[str]) -> list[str]:
  out = []
  for a in args:
    for part in a.strip("[]").split("|"):
      if part.startswith("--"):
        out.append(part.split("=", 1)[0])
  return out


def _check_main(args: list[str]) -> list[str]:
  from adjax.config import load
  problems = []
  for a in args:
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
      if not (ROOT / spec.partition(":")[0]).is_file():
        problems.append(f"{a}: no such config file")
        continue
      try:
        load.from_file(str(ROOT / spec.partition(":")[0]) + (":" + spec.partition(":")[2]
                                                             if ":" in spec else ""))
      except Exception as e:  # noqa: BLE001  (reported as a docs problem)
        problems.append(f"{a}: does not load: {e}")
    elif a.startswith("--config."):
      key = a.split("=", 1)[0][len("--config."):]
      if key not in _declared_keys():
        problems.append(f"{a.split('=')[0]}: not a declared config field")
  return problems


def _check_python(args: list[str]) -> list[str]:
  if args[:2] == ["-m", "venv"]:
    return []
  if len(args) < 2 or args[0] != "-m":
    return [f"python {' '.join(args)}: only `python -m MODULE` commands are documented"]
  module, rest = args[1], args[2:]
  if module == "pytest":
    return [f"{a}: no such test file" for a in rest
            if a.startswith("tests/") and not (ROOT / a.split("::")[0]).exists()]
  if module == "adjax.bench":
    if not rest or not (ROOT / "adjax" / "bench" / f"{rest[0]}.py").is_file():
      return [f"python -m adjax.bench {rest[:1]}: no such benchmark"]
    module, rest = f"adjax.bench.{rest[0]}", rest[1:]
  if importlib.util.find_spec(module) is None:
    return [f"python -m {module}: no such module"]
  known = _module_flags(module)
  problems = [f"python -m {module}: no flag {f}" for f in _flags_of(rest)
              if f not in known and not f.startswith("--config.")]
  if module == "adjax.main":
    problems += _check_main(rest)
  return problems


def _sed_pattern(bre: str) -> str:
  """A sed basic regular expression as Python's (only what the docs use)."""
  out, i = "", 0
  while i < len(bre):
    c = bre[i]
    if c == "\\" and i + 1 < len(bre):
      out += re.escape(bre[i + 1])
      i += 2
      continue
    out += re.escape(c) if c in "(){}+?|" else c
    i += 1
  return out


def _check_other(words: list[str]) -> list[str]:
  head, args = words[0], words[1:]
  if head == "pip":
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    problems = []
    for a in args:
      if m := re.fullmatch(r"\.\[([\w,]+)\]", a):
        problems += [f"pip install: no extra {e!r} in pyproject.toml"
                     for e in m.group(1).split(",") if e not in extras]
    return problems
  if head == "sed":
    expr, *files = [a for a in args if not a.startswith("-")]
    m = re.match(r"s/((?:[^/\\]|\\.)*)/", expr)
    problems = [f"sed: {f}: no such file" for f in files if not (ROOT / f).is_file()]
    if m and not problems:
      problems += [f"sed: {f} holds nothing that matches {m.group(1)!r}" for f in files
                   if not re.search(_sed_pattern(m.group(1)), (ROOT / f).read_text())]
    return problems
  if head == "git":
    return [f"git: {a}: no such file" for a in args[1:] if a.startswith(SHIPPED)
            and not (ROOT / a).exists()]
  return []


def _shell_problems(b) -> list[str]:
  problems = []
  for command in doc_blocks.commands(b.text):
    try:
      words = shlex.split(command)
    except ValueError as e:
      problems.append(f"{command}: does not parse as a shell command ({e})")
      continue
    if words[0] in ("python", "python3"):
      problems += _check_python(words[1:])
    elif words[0] in OTHER_COMMANDS:
      problems += _check_other(words)
    else:
      problems.append(f"{words[0]}: a command the docs test does not know")
    for w in words:
      for part in [w, w.split("=", 1)[-1]]:
        path = part.strip("[]'\"").partition(":")[0]
        if path.startswith(SHIPPED) and "{" not in path and not any(
            (ROOT / p).exists() for p in (path, path.rstrip(","))):
          problems.append(f"{path}: names a file the project does not ship")
  return [f"{b.where()}: {p}" for p in problems]


def _python_problems(b) -> list[str]:
  try:
    tree = ast.parse(b.text)
  except SyntaxError as e:
    return [f"{b.where()}: does not parse: line {e.lineno}: {e.msg}"]
  names, problems = {}, []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        try:
          names[a.asname or a.name.split(".")[0]] = importlib.import_module(
              a.name if a.asname else a.name.split(".")[0])
        except ImportError as e:
          problems.append(f"import {a.name}: {e}")
    elif isinstance(node, ast.ImportFrom) and node.module:
      try:
        module = importlib.import_module(node.module)
      except ImportError as e:
        problems.append(f"from {node.module}: {e}")
        continue
      for a in node.names:
        value = getattr(module, a.name, None)
        if value is None:
          try:
            value = importlib.import_module(f"{node.module}.{a.name}")
          except ImportError:
            problems.append(f"from {node.module} import {a.name}: no such name")
            continue
        names[a.asname or a.name] = value
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in names and names[node.value.id].__class__.__name__ == "module"
        and names[node.value.id].__name__.startswith(("adjax", "converters"))):
      if not hasattr(names[node.value.id], node.attr):
        problems.append(f"{node.value.id}.{node.attr}: no such name in "
                        f"{names[node.value.id].__name__}")
  return [f"{b.where()}: {p}" for p in problems]


def test_every_block_checks_statically():
  """Fails on a documented command with a misspelt flag, config field or
  module, a config file or variant that is gone, a path the project no longer
  ships, an extra pyproject.toml lacks, a mutation example that no longer
  matches its file, or a Python example whose import or module function is
  gone."""
  problems = []
  for b in _all_blocks():
    if b.output:
      continue
    if b.lang in SHELL_LANGS:
      problems += _shell_problems(b)
    elif b.lang == "python":
      problems += _python_problems(b)
  assert not problems, "\n".join(problems)


def test_inline_commands_check_statically():
  """The same checks for a `python -m ...` command written inline in the text
  (the README's one-liners, the benchmark headings)."""
  problems = []
  for page in doc_blocks.pages():
    for line, command in doc_blocks.inline_commands(page):
      problems += _shell_problems(doc_blocks.Block(page, line, "bash", command + "\n", False))
  assert not problems, "\n".join(problems)


def _anchor(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve():
  """Fails on a relative link to a page or picture that is not there, or to a
  heading the page does not have (a page moved or a section renamed)."""
  problems = []
  for page in doc_blocks.pages():
    text = (ROOT / page).read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+:", target):
        continue
      path, _, anchor = target.partition("#")
      dest = (ROOT / page).parent / path if path else ROOT / page
      if not dest.exists():
        problems.append(f"{page}: link to {target}: no such file")
      elif anchor and anchor not in {_anchor(h) for h in re.findall(
          r"^#+ (.*)$", dest.read_text(), re.M)}:
        problems.append(f"{page}: link to {target}: no such heading")
  assert not problems, "\n".join(problems)


def _text_outside_blocks(page: str) -> str:
  return re.sub(r"^\s*```.*?^\s*```", "", (ROOT / page).read_text(), flags=re.S | re.M)


def _resolves(dotted: str) -> bool:
  """`adjax.neighbors.mutual_maps`: the longest importable module, then attributes."""
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    for name in parts[i:]:
      if not hasattr(obj, name):
        return False
      obj = getattr(obj, name)
    return True
  return False


def test_paths_and_names_in_the_text_exist():
  """Fails when the prose names a module file or a dotted adjax name that is
  gone (a module moved or renamed without its docs following)."""
  problems = []
  for page in doc_blocks.pages():
    text = _text_outside_blocks(page)
    for path in set(re.findall(r"`((?:adjax|converters|configs|tests)/[^`\s:]*)", text)):
      if not re.search(r"[<{*]", path) and not (ROOT / path.rstrip(".,")).exists():
        problems.append(f"{page}: `{path}`: no such file")
    for dotted in set(re.findall(r"`((?:adjax|converters)(?:\.\w+)+)", text)):
      if not _resolves(dotted):
        problems.append(f"{page}: `{dotted}`: no such module or name")
  assert not problems, "\n".join(problems)


def test_static_checks_catch_broken_blocks():
  """The checker itself, on blocks broken the ways the docs break."""
  def shell(text):
    return _shell_problems(doc_blocks.Block("x.md", 1, "bash", text, False))
  assert shell("python -m adjax.main --config=configs/demo.py --config.mode=evaluate\n") == []
  assert shell("python -m adjax.main --config=configs/demo.py --config.epocs=3\n")
  assert shell("python -m adjax.main --config=configs/mvtec.py:nosuch\n")
  assert shell("python -m adjax.main --config=configs/gone.py\n")
  assert shell("python -m adjax.main --config=configs/demo.py --work-dir=x\n")
  assert shell("python -m adjax.export --workdir runs/demo --objects tile --format onnx\n")
  assert shell("python -m converters.dinov3 --source a --dst b\n")
  assert shell("python -m adjax.bench nosuch\n")
  assert shell("python -m pytest -q tests/nosuch_test.py\n")
  assert shell("pip install -e '.[nosuch]'\n")
  assert shell("sed -i 's/no such text anywhere/pass/' adjax/steps.py\n")
  assert shell("rm -rf runs\n")
  assert _python_problems(doc_blocks.Block("x.md", 1, "python",
                                           "from adjax.models import dinov3\n"
                                           "dinov3.lod('x')\n", False))
  assert _python_problems(doc_blocks.Block("x.md", 1, "python",
                                           "from adjax import Detektor\n", False))
