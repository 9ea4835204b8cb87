"""Self-contained HTML reports: evaluation results and prediction galleries.

Plain HTML with inline SVG plots and base64-embedded PNG pictures: one file
that opens in any browser, needs no plotting library to write, and can be
mailed or archived as it is.

- `evaluation_html`: the results table, ROC and precision-recall curves per
  category (image and pixel level) and the highest- and lowest-scoring
  heatmap panels per category.
- `gallery_html`: prediction results sorted by score, with the decisions and
  links to each image's heatmap (and mask overlay) files.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Sequence
from urllib.parse import quote

import numpy as np

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:12px 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
section{margin:28px 0;border-top:1px solid #ddd}
figure{display:inline-block;margin:6px;vertical-align:top}
figcaption{font-size:12px;color:#555;max-width:520px;word-break:break-all}
img{max-width:520px;border:1px solid #ddd}
.anomalous{color:#b00;font-weight:bold}.normal{color:#070}
"""


def percent(v) -> str:
  return "n/a" if v is None else f"{100 * v:.1f}"


def svg_curve(x: np.ndarray, y: np.ndarray, *, title: str, xlabel: str, ylabel: str,
              diagonal: bool = False, size: int = 220) -> str:
  """An inline SVG line plot of y against x, both in [0, 1]."""
  pad = 34
  inner = size - 2 * pad

  def pt(a, b):
    return f"{pad + a * inner:.1f},{size - pad - b * inner:.1f}"

  points = " ".join(pt(float(a), float(b)) for a, b in zip(x, y))
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
           f'class="curve" data-title="{html.escape(title)}">',
           f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" fill="none" '
           'stroke="#999"/>']
  if diagonal:
    parts.append(f'<polyline points="{pt(0, 0)} {pt(1, 1)}" fill="none" stroke="#ccc" '
                 'stroke-dasharray="4"/>')
  parts.append(f'<polyline points="{points}" fill="none" stroke="#1f5fbf" '
               'stroke-width="1.5"/>')
  parts.append(f'<text x="{size / 2}" y="{pad - 10}" font-size="12" '
               f'text-anchor="middle">{html.escape(title)}</text>')
  parts.append(f'<text x="{size / 2}" y="{size - 8}" font-size="11" '
               f'text-anchor="middle">{html.escape(xlabel)}</text>')
  parts.append(f'<text x="10" y="{size / 2}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 10 {size / 2})">{html.escape(ylabel)}</text>')
  for v in (0, 1):
    parts.append(f'<text x="{pad + v * inner}" y="{size - pad + 13}" font-size="10" '
                 f'text-anchor="middle">{v}</text>')
    parts.append(f'<text x="{pad - 6}" y="{size - pad - v * inner + 4}" font-size="10" '
                 f'text-anchor="end">{v}</text>')
  parts.append("</svg>")
  return "".join(parts)


def roc_pr_svgs(curve: np.ndarray | None, level: str) -> list[str]:
  """ROC and PR plots from `MetricAccumulator.result(details=True)`'s curve
  rows (threshold, FPR, recall, precision)."""
  if curve is None or len(curve) == 0:
    return []
  fpr = np.concatenate([[0.0], curve[:, 1], [1.0]])
  tpr = np.concatenate([[0.0], curve[:, 2], [1.0]])
  recall = np.concatenate([[0.0], curve[:, 2]])
  precision = np.concatenate([[curve[0, 3]], curve[:, 3]])
  return [svg_curve(fpr, tpr, title=f"{level} ROC", xlabel="false-positive rate",
                    ylabel="true-positive rate", diagonal=True),
          svg_curve(recall, precision, title=f"{level} precision-recall", xlabel="recall",
                    ylabel="precision")]


def png_img(png: bytes, alt: str) -> str:
  data = base64.b64encode(png).decode("ascii")
  return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'


def page(title: str, body: Sequence[str]) -> str:
  return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"/>"
          f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
          f"<h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def evaluation_html(title: str, results: dict[str, dict], curves: dict[str, dict],
                    panels: dict[str, list[tuple[str, bytes]]], identity: dict | None,
                    metric_names: Sequence[str]) -> str:
  """The evaluation report of one data set.

  Args:
    results: category -> metric -> fraction or None (plus the `mean` row).
    curves: category -> {"image": curve rows or None, "pixel": ...}.
    panels: category -> [(caption, PNG bytes)], highest scores first.
    identity: what produced the results (shown for the record).
  """
  head = "".join(f"<th>{html.escape(m)}</th>" for m in metric_names)
  rows = [f"<tr><td>{html.escape(c)}</td>" +
          "".join(f"<td>{percent(results[c].get(m))}</td>" for m in metric_names) + "</tr>"
          for c in results]
  body = [f'<table class="results"><tr><th>category</th>{head}</tr>{"".join(rows)}'
          "</table>"]
  for category in sorted(curves):
    figures = roc_pr_svgs(curves[category].get("image"), "image")
    figures += roc_pr_svgs(curves[category].get("pixel"), "pixel")
    pictures = [f"<figure>{png_img(png, caption)}<figcaption>{html.escape(caption)}"
                "</figcaption></figure>" for caption, png in panels.get(category, [])]
    body.append(f'<section class="category" id="{html.escape(category)}">'
                f"<h2>{html.escape(category)}</h2><div>{''.join(figures)}</div>"
                f"<div>{''.join(pictures)}</div></section>")
  if identity:
    body.append("<section><h2>What produced these results</h2><pre>"
                f"{html.escape(json.dumps(identity, indent=2, default=str))}</pre></section>")
  return page(title, body)


def gallery_html(title: str, rows: Sequence[dict]) -> str:
  """Prediction gallery: rows with `path`, `score`, optional `decision` and
  `heatmap` / `overlay` / `mask` (paths relative to the page), by score."""
  items = []
  for r in sorted(rows, key=lambda r: -float(r["score"])):
    decision = r.get("decision")
    label = (' <span class="undecided">undecided</span>'
             if decision in (None, "", "undecided") else
             f' <span class="{"anomalous" if int(decision) else "normal"}">'
             f'{"anomalous" if int(decision) else "normal"}</span>')
    # A file name may hold #, ? or %: the link is URL-encoded, then HTML-escaped.
    pictures = "".join(f'<img alt="{k}" src="{html.escape(quote(r[k]))}"/>'
                       for k in ("heatmap", "overlay") if r.get(k))
    items.append(f'<figure class="prediction">{pictures}<figcaption>'
                 f'{float(r["score"]):.4f}{label}<br/>{html.escape(str(r["path"]))}'
                 "</figcaption></figure>")
  return page(title, [f"<p>{len(rows)} images, highest score first.</p>", *items])
