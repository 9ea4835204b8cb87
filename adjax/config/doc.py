"""Every config field with its default, bounds and meaning, from one source.

The meanings and bounds are those declared with each field in
`adjax.config.schema`; this module only lays them out.

  python -m adjax.main --config=configs/mvtec.py --config_help   # the values a config sets
  python -m adjax.config.doc                                     # the reference table
"""

from __future__ import annotations

import json

from adjax.config import defaults as config_defaults
from adjax.config import schema


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


if __name__ == "__main__":
  print(markdown_table(), end="")
