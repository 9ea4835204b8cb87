"""The fenced code blocks of README.md and docs/*.md, for the tests that run them.

A test that executes a documented block reads it through `block(page, key)`,
which fails when the page no longer holds exactly one block containing `key`:
the code tested is the code documented. `tests/docs_test.py` checks every
block: executed by a registered test, checked statically, or marked
`<!-- output -->` on the line before its fence (illustrative, not a command).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_MARK = "<!-- output -->"
_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
  page: str          # "README.md", "docs/api.md"
  line: int          # 1-based line of the opening fence
  lang: str          # "bash", "python", "" ...
  text: str
  output: bool       # marked illustrative output

  def where(self) -> str:
    return f"{self.page}:{self.line}"


def pages() -> list[str]:
  return ["README.md"] + sorted(p.relative_to(ROOT).as_posix()
                                for p in (ROOT / "docs").glob("*.md"))


def blocks(page: str) -> list[Block]:
  lines = (ROOT / page).read_text().splitlines()
  out, i = [], 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    indent, lang = m.groups()
    j = i + 1
    while j < len(lines) and lines[j].strip() != "```":
      j += 1
    if j == len(lines):
      raise AssertionError(f"{page}:{i + 1}: a code block that is never closed")
    body = "\n".join(l[len(indent):] if l.startswith(indent) else l for l in lines[i + 1:j])
    marked = i > 0 and lines[i - 1].strip() == OUTPUT_MARK
    out.append(Block(page, i + 1, lang, body + "\n", marked))
    i = j + 1
  return out


def block(page: str, key: str) -> str:
  """The text of the one block of `page` that contains `key`."""
  found = [b for b in blocks(page) if key in b.text]
  assert len(found) == 1, (
      f"{page} should hold exactly one code block containing {key!r}, holds {len(found)}")
  return found[0].text


def commands(text: str) -> list[str]:
  """A shell block's commands: continuation lines joined, comments and blank
  lines dropped, `&&` chains split."""
  joined = re.sub(r"\\\n\s*", " ", text)
  out = []
  for line in joined.splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    line = re.sub(r"\s+#\s.*$", "", line)           # a trailing comment
    out += [c.strip() for c in line.split("&&") if c.strip()]
  return out


def inline_commands(page: str) -> list[tuple[int, str]]:
  """(line, command) for each inline code span outside the fenced blocks that
  is a `python -m` command (`python -m adjax.bench metrics` in a heading); a
  synopsis with placeholders (`python -m adjax.bench NAME`) is not one."""
  out, fence = [], False
  for i, line in enumerate((ROOT / page).read_text().splitlines(), 1):
    if _FENCE.match(line) or line.strip() == "```":
      fence = not fence
      continue
    if not fence:
      out += [(i, m) for m in re.findall(r"`(python3? -m [^`]+)`", line)
              if not re.search(r"\b[A-Z]{3,}\b|<", m)]
  return out
