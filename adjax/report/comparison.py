"""The scoring modes evaluated on one data set, side by side: `<name>.modes.md`
and `<name>.modes.html` in results/, from each mode's results file."""

from __future__ import annotations

import html as html_lib
import json
from pathlib import Path

from adjax import modes
from adjax.common import atomic
from adjax.report import html as report_html
from adjax.report import tables

COMPARED = (("image_auroc", "I-AUROC"), ("pixel_auroc", "P-AUROC"), ("pixel_aupro", "AUPRO"))


def write_comparison(results_dir: Path, name: str) -> Path | None:
  """`<name>.modes.md`: every scoring mode evaluated on data set `name` side by
  side per category (image AUROC, pixel AUROC, AUPRO), from `<name>.json` and
  `<name>.<mode>.json`; None when fewer than two modes were evaluated."""
  found = {}
  for mode in modes.SCORINGS:
    path = Path(results_dir) / (f"{name}.json" if mode == "zero_shot" else f"{name}.{mode}.json")
    if path.exists():
      found[mode] = json.loads(path.read_text())
  if len(found) < 2:
    return None
  cats = sorted({c for r in found.values() for c in r["categories"]}) + [tables.MEAN]

  def cell(res, cat, key):
    row = res[tables.MEAN] if cat == tables.MEAN else res["categories"].get(cat, {})
    v = row.get(key)
    return tables.MISSING if v is None else f"{100 * v:.1f}"

  head = ["category"] + [f"{mode} {short}" for mode in found for _, short in COMPARED]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for cat in cats:
    lines.append("| " + " | ".join([cat] + [cell(res, cat, key) for res in found.values()
                                            for key, _ in COMPARED]) + " |")
  notes = [f"{mode}: {name}{'' if mode == 'zero_shot' else '.' + mode}.json"
           + (_references_note(res) if "few_shot" in mode else "")
           for mode, res in found.items()]
  out = Path(results_dir) / f"{name}.modes.md"
  atomic.write_text(out, f"# {name}: scoring modes side by side\n\n" + "\n".join(lines)
                    + "\n\n" + "\n".join("- " + n for n in notes) + "\n")
  atomic.write_text(Path(results_dir) / f"{name}.modes.html",
                    comparison_html(name, found, cats, notes))
  return out


def _references_note(res: dict) -> str:
  ev = res.get("identity", {}).get("eval", {})
  if ev.get("references_dir"):
    return f", {ev.get('references')} references per category from {ev['references_dir']}"
  return f", {ev.get('references')} references per category left out of the metrics"


def comparison_html(name: str, found: dict[str, dict], cats: list[str],
                    notes: list[str]) -> str:
  """`<name>.modes.html`: one table, a row per category, per mode a group of
  columns (image AUROC, pixel AUROC, AUPRO), with the report's styling."""
  esc = html_lib.escape
  top = "".join(f'<th colspan="{len(COMPARED)}">{esc(mode)}</th>' for mode in found)
  sub = "".join(f"<th>{esc(short)}</th>" for _ in found for _, short in COMPARED)
  rows = []
  for cat in cats:
    cells = []
    for mode, res in found.items():
      row = res[tables.MEAN] if cat == tables.MEAN else res["categories"].get(cat, {})
      cells += [f'<td data-mode="{esc(mode)}" data-metric="{key}">'
                f"{report_html.percent(row.get(key))}</td>" for key, _ in COMPARED]
    rows.append(f'<tr data-category="{esc(cat)}"><td>{esc(cat)}</td>{"".join(cells)}</tr>')
  table = (f'<table class="modes"><tr><th rowspan="2">category</th>{top}</tr>'
           f'<tr>{sub}</tr>{"".join(rows)}</table>')
  listed = "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"
  return report_html.page(f"{name}: scoring modes side by side", [table, listed])


def console_table(name: str, by_mode: dict) -> str:
  """Every mode evaluated on data set `name` in one plain-text table: the
  mean over its categories of image AUROC, pixel AUROC and AUPRO (percent),
  the evaluation's wall time and what the mode needs. `by_mode`: mode ->
  (its results by category or None, seconds)."""
  head = ["mode", "image AUROC", "pixel AUROC", "AUPRO", "time", "needs"]
  rows = []
  for mode, (results, seconds) in by_mode.items():
    mean = tables.summarize(results)[tables.MEAN] if results else {}
    cells = [tables.MISSING if mean.get(key) is None else f"{100 * mean[key]:.1f}"
             for key, _ in COMPARED]
    rows.append([mode, *cells, f"{seconds:.0f} s", modes.NEEDS.get(mode, "")])
  widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

  def line(cells):
    # Text columns to the left, numbers to the right.
    return "  ".join(c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

  return "\n".join([f"{name}: every scoring mode evaluated (mean over its categories, %)",
                    line(head), *(line(r) for r in rows)])
