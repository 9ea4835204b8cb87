"""docs/layout.md (generated) names every module, once, and only modules that exist;
each module has a docstring to describe it."""

import re
from pathlib import Path

from adjax.config import doc as config_doc

ROOT = Path(__file__).resolve().parents[1]
_LINE = re.compile(r"^- `([^`]+\.py)`: (.*)$")


def _modules() -> set[str]:
  return {p.relative_to(ROOT).as_posix() for pkg in config_doc.PACKAGES
          for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts}


def _listed(text: str) -> dict[str, list[str]]:
  out: dict[str, list[str]] = {}
  for line in text.splitlines():
    if m := _LINE.match(line):
      out.setdefault(m.group(1), []).append(m.group(2))
  return out


def test_every_module_has_one_layout_line_with_its_docstring():
  """Fails if the generator skips a module (only `__init__.py` files holding
  nothing but imports may be left out), lists one twice, names a file that
  does not exist, or a module has no docstring to describe it."""
  listed = _listed(config_doc.layout_page(ROOT))
  missing = sorted(m for m in _modules() - set(listed)
                   if not (m.endswith("__init__.py") and config_doc._docstring(ROOT / m)[1]))
  assert not missing, "modules missing from the layout page:\n" + "\n".join(missing)
  assert not [p for p in listed if not (ROOT / p).is_file()]
  twice = sorted(p for p, lines in listed.items() if len(lines) > 1)
  assert not twice, "the layout page names these more than once:\n" + "\n".join(twice)
  bare = sorted(p for p, (text, *_) in listed.items() if text == config_doc.NO_DOCSTRING)
  assert not bare, "modules without a docstring (its first paragraph is their layout line):\n" + \
      "\n".join(bare)


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
