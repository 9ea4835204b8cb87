"""Every config field has a meaning, and the README's reference table is current."""

import re
import subprocess
import sys
from pathlib import Path

from adjax.config import defaults as config_defaults
from adjax.config import doc as config_doc

ROOT = Path(__file__).resolve().parent.parent


def test_every_field_is_documented():
  missing = [n for n, _, d in config_doc.rows(config_defaults.base_config()) if not d]
  assert not missing, f"config fields without a comment in adjax/config/defaults.py: {missing}"


def test_readme_reference_table_is_generated():
  readme = (ROOT / "README.md").read_text()
  block = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->",
                    readme, re.S)
  assert block, "README.md lacks the config reference markers"
  assert block.group(1) == config_doc.markdown_table(), (
      "README's configuration reference is stale: regenerate it with "
      "python -m adjax.config.doc")


def test_config_help_flag_prints_the_configs_values():
  proc = subprocess.run(
      [sys.executable, "-m", "adjax.main", "--config=configs/mvtec.py:cpu", "--config_help"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert any(re.match(r'^image_size\s+224$', l) for l in lines)     # the :cpu value
  i = next(i for i, l in enumerate(lines) if l.startswith("eval.image_score"))
  assert "global | max | mean" in lines[i + 1]
