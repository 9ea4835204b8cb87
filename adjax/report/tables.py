"""Result tables: per-category metrics plus their mean, for people and tools.

Input everywhere is `{category: {metric: value}}` with values in [0, 1] or
None/NaN for a missing metric (see `adjax.metrics`). The mean row averages
each metric over the categories where it is defined and is missing if it is
defined nowhere. Console and Markdown tables show percentages with one
decimal; JSON and CSV keep the full-precision fractions. Missing values are
`null` in JSON and "n/a" elsewhere.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Mapping

from adjax.common import atomic
from adjax.metrics import METRIC_KEYS
from adjax.metrics import ZSAD_KEY

MISSING = "n/a"
MEAN = "mean"
_SHORT = {
    "image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1max",
    "pixel_auroc": "P-AUROC", "pixel_ap": "P-AP", "pixel_f1max": "P-F1max",
    "pixel_aupro": "AUPRO", ZSAD_KEY: "AUPRO-zsad",
}

Results = Mapping[str, Mapping[str, "float | None"]]


def _value(v) -> float | None:
  if v is None:
    return None
  v = float(v)
  if math.isinf(v):
    raise ValueError(f"metric values must be finite or missing, got {v}")
  return None if math.isnan(v) else v


def metric_names(results: Results) -> list[str]:
  """The metrics present, in the canonical order, then others as first seen."""
  seen: list[str] = []
  for row in results.values():
    seen += [k for k in row if k not in seen]
  known = [k for k in METRIC_KEYS + (ZSAD_KEY,) if k in seen]
  return known + [k for k in seen if k not in known]


def summarize(results: Results) -> dict:
  """{"categories": {name: {metric: value}}, "mean": {metric: value}}."""
  names = metric_names(results)
  categories = {}
  for cat, row in results.items():
    if not isinstance(cat, str) or cat == MEAN:
      raise ValueError(
          f"category names must be strings other than {MEAN!r}, got {cat!r}")
    categories[cat] = {k: _value(row.get(k)) for k in names}
  mean = {}
  for k in names:
    vals = [row[k] for row in categories.values() if row[k] is not None]
    mean[k] = sum(vals) / len(vals) if vals else None
  out = {"categories": categories, MEAN: mean}
  note = mean_note(categories, names)
  if note:
    out["mean_note"] = note
  return out


def mean_note(categories: dict, names: list[str]) -> str:
  """Says when the mean row averages fewer than all categories, and why:
  "pixel metrics: mean over 3 of 4 categories (chip has no defect masks)";
  "" when every metric averages every category."""
  parts = []
  for kind, why in (("pixel", "no defect masks"),
                    ("image", "no anomalous or no normal images")):
    # A metric missing everywhere (not computed) shows as n/a and needs no note.
    keys = [k for k in names if k.startswith(kind + "_")
            and any(row[k] is not None for row in categories.values())]
    missing = sorted({cat for cat, row in categories.items() for k in keys
                      if row[k] is None})
    if keys and missing:
      n = len(categories)
      verb = "has" if len(missing) == 1 else "have"
      parts.append(f"{kind} metrics: mean over {n - len(missing)} of {n} categories "
                   f"({', '.join(missing)} {verb} {why})")
  return "; ".join(parts)


def _rows(summary: dict) -> tuple[list[str], list[list[str]]]:
  names = list(summary[MEAN])
  header = ["category"] + [_SHORT.get(k, k) for k in names]

  def fmt(v):
    return MISSING if v is None else f"{100 * v:.1f}"

  rows = [[cat] + [fmt(row[k]) for k in names]
          for cat, row in summary["categories"].items()]
  rows.append([MEAN] + [fmt(summary[MEAN][k]) for k in names])
  return header, rows


def console_table(results: Results) -> str:
  """Aligned plain-text table, metrics in percent, the mean row last."""
  header, rows = _rows(summarize(results))
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

  def line(cells):
    first = cells[0].ljust(widths[0])
    rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
    return "  ".join([first] + rest).rstrip()

  rule = "-" * len(line(header))
  note = summarize(results).get("mean_note")
  return "\n".join([line(header), rule] + [line(r) for r in rows[:-1]]
                   + [rule, line(rows[-1])] + ([note] if note else [])) + "\n"


def markdown_table(results: Results) -> str:
  """GitHub Markdown table, metrics in percent, the mean row in bold."""
  header, rows = _rows(summarize(results))
  rows[-1] = [f"**{c}**" for c in rows[-1]]
  out = ["| " + " | ".join(header) + " |",
         "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  note = summarize(results).get("mean_note")
  return "\n".join(out + ([f"\n{MEAN}: {note}"] if note else [])) + "\n"


def csv_text(results: Results) -> str:
  """CSV with full-precision fractions; the last row is the mean."""
  summary = summarize(results)
  names = list(summary[MEAN])
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(["category"] + names)
  rows = list(summary["categories"].items()) + [(MEAN, summary[MEAN])]
  for cat, row in rows:
    writer.writerow([cat] + [MISSING if row[k] is None else repr(row[k])
                             for k in names])
  return buf.getvalue()


def json_text(results: Results, identity: dict | None = None) -> str:
  summary = summarize(results)
  if identity is not None:
    summary["identity"] = identity   # what produced these numbers
  return json.dumps(summary, indent=2, default=str) + "\n"


def read_csv(path: str | os.PathLike) -> dict:
  """Parses a CSV written by `write_reports` back into the `summarize` form."""
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = next(reader)
    if not header or header[0] != "category":
      raise ValueError(f"{path}: not a results CSV (first column must be 'category')")
    rows = {}
    for rec in reader:
      rows[rec[0]] = {k: None if v == MISSING else float(v)
                      for k, v in zip(header[1:], rec[1:])}
  if MEAN not in rows:
    raise ValueError(f"{path}: no {MEAN!r} row")
  mean = rows.pop(MEAN)
  return {"categories": rows, MEAN: mean}


def read_json(path: str | os.PathLike) -> dict:
  with open(path) as f:
    return json.load(f)


def write_reports(results_by_category: Results, out_dir: str | os.PathLike,
                  name: str, identity: dict | None = None) -> str:
  """Writes `<name>.json`, `<name>.md` and `<name>.csv` atomically.

  `identity` (what produced the results) is stored in the JSON.

  Returns:
    The console table (for printing or logging).
  """
  out_dir = Path(out_dir)
  if not name or Path(name).name != name:
    raise ValueError(f"report name must be a plain file name, got {name!r}")
  summary_json = json_text(results_by_category, identity)  # validates before writing
  atomic.write_text(out_dir / f"{name}.json", summary_json)
  atomic.write_text(out_dir / f"{name}.md", markdown_table(results_by_category))
  atomic.write_text(out_dir / f"{name}.csv", csv_text(results_by_category))
  return console_table(results_by_category)
