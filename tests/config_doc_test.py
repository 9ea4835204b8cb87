"""Every config field has a meaning, and the generated docs pages
(docs/config.md, docs/layout.md) are current."""

import re
import subprocess
import sys
from pathlib import Path

from adjax.config import defaults as config_defaults
from adjax.config import doc as config_doc

ROOT = Path(__file__).resolve().parent.parent


def test_every_field_is_documented():
  missing = [n for n, _, d in config_doc.rows(config_defaults.base_config()) if not d]
  assert not missing, f"config fields without a meaning in adjax/config/schema.py: {missing}"


def test_generated_pages_are_current():
  """Fails if a config field's declaration or a module's docstring changed (a
  module added, moved or removed) and the pages were not regenerated."""
  stale = config_doc.stale(ROOT)
  assert not stale, (
      f"generated docs pages are stale: {', '.join(p.relative_to(ROOT).as_posix() for p in stale)}; "
      f"regenerate them with {config_doc.REGENERATE}")


def test_config_page_holds_every_field_with_its_default():
  page = (ROOT / "docs" / "config.md").read_text()
  for name, value, _ in config_doc.rows(config_defaults.base_config()):
    assert f"| `{name}` | `{value}` |" in page, name


def test_stale_pages_are_detected(tmp_path):
  """The staleness check itself: a page with an edited line, or a missing
  page, is reported."""
  (tmp_path / "docs").mkdir()
  for sub in ("adjax", "converters"):
    (tmp_path / sub).mkdir()
    (tmp_path / sub / "__init__.py").write_text(f'"""The {sub} package."""\n')
  (tmp_path / "adjax" / "thing.py").write_text('"""A thing.\n\nMore."""\nX = 1\n')
  for path, text in config_doc.pages(tmp_path).items():
    path.write_text(text)
  assert config_doc.stale(tmp_path) == []
  layout = tmp_path / "docs" / "layout.md"
  assert "- `adjax/thing.py`: A thing.\n" in layout.read_text()
  (tmp_path / "adjax" / "other.py").write_text('"""Another."""\n')   # a new module
  assert config_doc.stale(tmp_path) == [layout]
  (tmp_path / "docs" / "config.md").unlink()
  assert sorted(config_doc.stale(tmp_path)) == sorted([tmp_path / "docs" / "config.md", layout])


def test_write_flag_regenerates_the_pages_and_refuses_others():
  bad = subprocess.run([sys.executable, "-m", "adjax.config.doc", "--writ"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--write" in bad.stderr


def test_config_help_flag_prints_the_configs_values():
  proc = subprocess.run(
      [sys.executable, "-m", "adjax.main", "--config=configs/mvtec.py:cpu", "--config_help"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert any(re.match(r'^image_size\s+224$', l) for l in lines)     # the :cpu value
  i = next(i for i, l in enumerate(lines) if l.startswith("eval.image_score"))
  assert "global | max | mean" in lines[i + 1]
