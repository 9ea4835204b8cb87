"""Every config field with its default and meaning, from one source.

The meanings are the comments beside (or just above) each field in
`adjax/config/defaults.py`, read with Python's tokenizer, so the defaults
module stays the single place where a field is declared and explained.

  python -m adjax.main --config=configs/mvtec.py --config_help   # the values a config sets
  python -m adjax.config.doc                                     # the reference table (README)
"""

from __future__ import annotations

import io
import json
import re
import tokenize
from pathlib import Path

from adjax.config import defaults as config_defaults

_ASSIGN = re.compile(r"^\s*c\.([\w.]+)\s*=")


def field_docs() -> dict[str, str]:
  """{dotted field: meaning} from adjax/config/defaults.py's comments."""
  source = Path(config_defaults.__file__).read_text()
  comments: dict[int, str] = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip("#").strip()
  lines = source.splitlines()
  docs: dict[str, str] = {}
  above: list[str] = []
  for number, line in enumerate(lines, start=1):
    stripped = line.strip()
    if stripped.startswith("#"):
      above.append(comments.get(number, ""))
      continue
    m = _ASSIGN.match(line)
    if m:
      text = " ".join(above + ([comments[number]] if number in comments else []))
      if text:
        docs[m.group(1)] = text
    above = [] if not stripped.startswith("#") else above
  return docs


def _leaves(cfg, prefix=""):
  for key in sorted(cfg.keys()):
    value = cfg[key]
    if hasattr(value, "keys"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def rows(cfg) -> list[tuple[str, str, str]]:
  """(field, value as a command-line override would write it, meaning) per leaf."""
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


if __name__ == "__main__":
  print(markdown_table(), end="")
