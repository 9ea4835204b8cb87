"""README's "Repository layout" names every module, once, and only modules that exist."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adjax", "converters")
_LINE = re.compile(r"^- `([^`]+\.py)`: \S")


def _trivial_init(path: Path) -> bool:
  """An `__init__.py` that holds only a docstring, imports and dunder constants."""
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
      continue
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      continue
    if (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.startswith("__")
                                             and t.id.endswith("__") for t in node.targets)):
      continue
    return False
  return True


def _modules() -> set[str]:
  out = set()
  for pkg in PACKAGES:
    for path in (ROOT / pkg).rglob("*.py"):
      if "__pycache__" in path.parts:
        continue
      if path.name == "__init__.py" and _trivial_init(path):
        continue
      out.add(path.relative_to(ROOT).as_posix())
  return out


def _listed() -> list[str]:
  text = (ROOT / "README.md").read_text()
  section = re.search(r"^## Repository layout\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
  assert section, "README.md has no '## Repository layout' section"
  return [m.group(1) for line in section.group(1).splitlines() if (m := _LINE.match(line))]


def test_every_module_has_a_layout_line():
  missing = sorted(_modules() - set(_listed()))
  assert not missing, (
      "modules missing from README.md's '## Repository layout' (one line each, "
      "'- `path`: what it does'):\n" + "\n".join(missing))


def test_layout_lines_name_existing_modules_once():
  listed = _listed()
  stale = sorted(p for p in set(listed) if not (ROOT / p).is_file())
  assert not stale, "README.md's layout names modules that do not exist:\n" + "\n".join(stale)
  twice = sorted({p for p in listed if listed.count(p) > 1})
  assert not twice, "README.md's layout names these more than once:\n" + "\n".join(twice)


def test_config_files_of_earlier_versions_still_load(tmp_path):
  """A user's config file that imports `adjax.config_defaults` (the name before
  the config package) loads and gives the same config as the new import."""
  from adjax import config_defaults
  from adjax.config import defaults, load
  assert config_defaults is defaults
  old = tmp_path / "old_style.py"
  old.write_text("from adjax import config_defaults\n\n"
                 "def get_config(arg=None):\n"
                 "  c = config_defaults.base_config()\n"
                 "  c.epochs = 3\n"
                 "  return c\n")
  cfg = load.from_file(str(old))
  want = defaults.base_config()
  want.epochs = 3
  assert cfg.to_dict() == want.to_dict()
