"""The generated docs pages: the configuration reference and the repository layout.

The configuration reference lays out each field's default, bounds and
meaning as declared in `adjax.config.schema`; the layout page lists every
module that exists, with the first paragraph of its docstring, grouped by
package. Neither page is edited by hand:

  python -m adjax.main --config=configs/mvtec.py --config_help   # the values a config sets
  python -m adjax.config.doc                                     # the reference table
  python -m adjax.config.doc --write                             # docs/config.md, docs/layout.md
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
import sys

from adjax.common import atomic
from adjax.config import defaults as config_defaults
from adjax.config import schema

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "python -m adjax.config.doc --write"
PACKAGES = ("adjax", "converters")
NO_DOCSTRING = "(no module docstring)"


def field_docs() -> dict[str, str]:
  """{dotted field: meaning, with its bounds} from the declarations."""
  docs = {}
  for name, f in schema.declared():
    text = f.metadata["doc"]
    if f.metadata.get("choices") is not None and " | " not in text:
      text += " (one of: " + " | ".join(repr(c) if c == "" else c
                                        for c in f.metadata["choices"]) + ")"
    if f.metadata.get("minimum") is not None:
      text += f" (an integer >= {f.metadata['minimum']})"
    docs[name] = text
  return docs


def _leaves(cfg, prefix=""):
  for key in sorted(cfg.keys()):
    value = cfg[key]
    if hasattr(value, "keys"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def rows(cfg) -> list[tuple[str, str, str]]:
  """(field, value as a command-line override would write it, meaning) per
  leaf; an entry of a free-form mapping (`data.manual_dirs.visa`) has its
  mapping's meaning."""
  docs = field_docs()
  out = []
  for name, value in _leaves(cfg):
    parts = name.split(".")
    doc = next((docs[".".join(parts[:i])] for i in range(len(parts), 0, -1)
                if ".".join(parts[:i]) in docs), "")
    shown = json.dumps(list(value) if isinstance(value, tuple) else value)
    out.append((name, shown, doc))
  return out


def text_table(cfg) -> str:
  width = max(len(n) for n, _, _ in rows(cfg))
  return "\n".join(f"{n:<{width}}  {v}\n{'':<{width}}  {d}" if d else f"{n:<{width}}  {v}"
                   for n, v, d in rows(cfg))


def markdown_table(cfg=None) -> str:
  cfg = cfg if cfg is not None else config_defaults.base_config()
  body = [f"| `{n}` | `{v}` | {d.replace('|', chr(92) + '|')} |" for n, v, d in rows(cfg)]
  return "\n".join(["| field | default | meaning |", "|---|---|---|", *body]) + "\n"


def _generated_note() -> str:
  return f"<!-- generated from the code by `{REGENERATE}`; do not edit -->\n\n"


def config_page() -> str:
  """docs/config.md: every field with its default and meaning."""
  return (_generated_note() + "# Configuration reference\n\n"
          "`python -m adjax.main --config=configs/demo.py --config_help` prints every field "
          "with the value that config gives it and its meaning. Each field is declared once, "
          "with its type, default, bounds and meaning, in `adjax/config/schema.py`; this page "
          "is generated from those declarations. A field is set on the command line with "
          "`--config.<field>=<value>` (`--config.eval.scoring=batch`); a misspelt field is "
          "an error.\n\n" + markdown_table())


def _docstring(path: Path) -> tuple[str, bool]:
  """(the docstring's first paragraph on one line, whether the module holds
  only a docstring, imports and dunder constants)."""
  tree = ast.parse(path.read_text())
  text = ast.get_docstring(tree) or ""
  first = " ".join(text.strip().split("\n\n")[0].split())
  trivial = all(
      (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
      or isinstance(n, (ast.Import, ast.ImportFrom))
      or (isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.startswith("__")
                                            and t.id.endswith("__") for t in n.targets))
      for n in tree.body)
  return first or NO_DOCSTRING, trivial


def _line(path: Path, root: Path, text: str) -> str:
  return f"- `{path.relative_to(root).as_posix()}`: {text}"


# How a run flows through the modules (the names are checked by tests/docs_test.py).
FLOW = """\
A run, read in one pass: `adjax.main` parses the flags and the config file;
`adjax.config` declares every field (`schema`), checks the whole config
(`check`, every problem in one message) and resolves it once into a frozen
`RunConfig`, of which each layer receives its part. `adjax.experiment`
locks the workdir, builds the mesh and the frozen towers (`adjax.towers`)
and dispatches to the commands: `adjax.train`, `adjax.evaluate` (one
`Evaluator` over a `scorer.ModeScorer` per scoring mode: `ZeroShotScorer`
or `scoring_modes.NeighbourScorer`) and `adjax.predict` (through
`adjax.detector.Detector`, which `adjax.serve` and `adjax.export` use too).
`adjax.loading.load_head` is the one head loader of the run, the Detector
and export. The method is `adjax.ad_model.ADModel` (`raw_tokens`,
`features`, the head's maps; its steps in `adjax.steps`); scoring against
neighbours lives in `adjax.neighbors`, the few-shot bank in
`adjax.workdir.banks`; `adjax.modes` names the modes without JAX. Every
file a run writes is named by `adjax.workdir.Workdir`. Nothing below the
commands imports a command, and there is no import cycle
(`tests/architecture_test.py`)."""


def layout_page(root: Path = ROOT) -> str:
  """docs/layout.md: one line per module of `adjax/` and `converters/` (a
  package's `__init__.py` only when it holds more than imports), grouped by
  package, each package headed by its own docstring; then the configs."""
  out = [_generated_note().rstrip("\n"), "", "# Repository layout", "", FLOW, "",
         "One line per module: the first paragraph of its docstring.", ""]
  for top in PACKAGES:
    packages = sorted({p.parent for p in (root / top).rglob("__init__.py")
                       if "__pycache__" not in p.parts})
    for pkg in packages:
      modules = sorted(p for p in pkg.glob("*.py"))
      head, _ = _docstring(pkg / "__init__.py")
      out += [f"## `{pkg.relative_to(root).as_posix()}/`", "", head, ""]
      for path in modules:
        text, trivial = _docstring(path)
        if path.name == "__init__.py" and trivial:
          continue
        out.append(_line(path, root, text))
      data = sorted(p for p in pkg.iterdir() if p.is_dir() and not (p / "__init__.py").exists()
                    and p.name != "__pycache__" and any(p.iterdir()))
      for folder in data:
        names = ", ".join(f"`{p.name}`" for p in sorted(folder.iterdir()) if p.is_file())
        out.append(f"- `{folder.relative_to(root).as_posix()}/`: package data: {names}")
      out.append("")
  configs = sorted((root / "configs").glob("*.py"))
  if configs:
    out += ["## `configs/`", "", "Experiment configs, run as "
            "`python -m adjax.main --config=configs/NAME.py[:variant]`.", ""]
    out += [_line(p, root, _docstring(p)[0]) for p in configs] + [""]
  out += ["## `tests/`", "", "`*_test.py` beside each area; what each checks is in "
          "[contributing.md](contributing.md).", ""]
  return "\n".join(out)


def pages(root: Path = ROOT) -> dict[Path, str]:
  """Each generated page and the text it must hold."""
  return {root / "docs" / "config.md": config_page(),
          root / "docs" / "layout.md": layout_page(root)}


def stale(root: Path = ROOT) -> list[Path]:
  """The generated pages whose file differs from what the code gives."""
  return [p for p, text in pages(root).items()
          if not p.is_file() or p.read_text() != text]


def main(argv: list[str]) -> int:
  if argv == ["--write"]:
    for path, text in pages().items():
      atomic.write_text(path, text)
      print(f"wrote {path.relative_to(ROOT)}")
    return 0
  if argv:
    print(f"error: unknown arguments {' '.join(argv)}; use no argument (print the "
          "reference table) or --write (regenerate docs/config.md and docs/layout.md)",
          file=sys.stderr)
    return 2
  print(markdown_table(), end="")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
