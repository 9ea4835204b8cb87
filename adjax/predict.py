"""Prediction on a folder or glob of images with a trained head.

Writes `<workdir>/predictions/scores.csv` (path, image score and, when
`predict.threshold >= 0`, a 0/1 label) and one heatmap panel per image
(image | map overlaid, at the image's own resolution) under
`<workdir>/predictions/heatmaps/`. Any size or mode is accepted (converted to
RGB); unreadable files are listed in `unreadable.txt` and on the console, and
every other image is still processed.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from adjax import atomic, data, heatmaps
from adjax.scorer import Scorer


def _map_at(amap: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  img = Image.fromarray(amap.astype(np.float32), mode="F")
  return np.asarray(img.resize((hw[1], hw[0]), Image.BILINEAR))


def _output_name(path: str, root: str) -> str:
  """The heatmap's path under heatmaps/: the input's path below `root`, its
  whole file name kept (so photo.jpg and photo.png, or a/b.png and a__b.png,
  never share an output), plus .png."""
  rel = os.path.relpath(path, root) if root else os.path.basename(path)
  return Path(rel).as_posix() + ".png"


def run(cfg, workdir: Path, towers, mesh, params) -> dict:
  if jax.process_count() > 1:
    raise ValueError("mode=predict runs on one process; start it without distributed=True")
  if not cfg.predict.input:
    raise ValueError("mode=predict needs --config.predict.input=<folder or glob of images>")
  paths, unreadable = data.read_image_folder(cfg.predict.input)
  root = cfg.predict.input if os.path.isdir(cfg.predict.input) else os.path.commonpath(
      [os.path.dirname(p) for p in paths]) if paths else ""
  out_dir = workdir / "predictions"
  # Everything is written to a fresh folder that replaces predictions/ at the
  # end: a rerun leaves no output of an earlier one, a failed run leaves the
  # earlier outputs as they were.
  work_dir = workdir / f".predictions.tmp-{os.getpid()}"
  shutil.rmtree(work_dir, ignore_errors=True)
  try:
    rows = _predict_into(cfg, work_dir, towers, mesh, params, paths, root, unreadable)
    _replace_dir(work_dir, out_dir)
  finally:
    shutil.rmtree(work_dir, ignore_errors=True)
  if unreadable:
    print(f"{len(unreadable)} unreadable files (listed in {out_dir / 'unreadable.txt'}):")
    for p, why in unreadable:
      print(f"  {p}: {why}")
  print(f"predicted {len(rows)} images -> {out_dir / 'scores.csv'}")
  return {"scores": rows, "unreadable": unreadable}


def _replace_dir(new: Path, old: Path) -> None:
  stale = old.with_name(f".{old.name}.old-{os.getpid()}")
  if old.exists():
    os.replace(old, stale)
  os.replace(new, old)
  shutil.rmtree(stale, ignore_errors=True)


def _predict_into(cfg, out_dir: Path, towers, mesh, params, paths, root, unreadable):
  scorer = Scorer(cfg, towers, mesh, params)
  table = scorer.text_table([cfg.predict.object_name])
  threshold = cfg.predict.threshold
  rows = []
  for batch in data.prediction_batches(paths, image_size=scorer.model.image_size,
                                       batch_size=cfg.predict.batch_size):
    amap, score = scorer.maps(batch["image"], np.zeros(len(batch["image"]), np.int32),
                              table)
    for i in range(len(batch["image"])):
      path = str(batch["path"][i])
      if not batch["valid"][i]:
        if path:
          unreadable.append((path, str(batch["error"][i])))
        continue
      h, w = (int(v) for v in batch["orig_size"][i])
      with Image.open(path) as img:   # to_rgb: any mode -> 8-bit RGB
        rgb = np.asarray(data.images.to_rgb(img))
      pixels = heatmaps.panel(rgb, _map_at(amap[i], (h, w)))
      name = _output_name(path, root)
      heatmaps.save_png(out_dir / "heatmaps" / name, pixels)
      row = {"path": path, "score": f"{float(score[i]):.6f}", "heatmap": f"heatmaps/{name}"}
      if threshold >= 0:
        row["label"] = int(float(score[i]) >= threshold)
      rows.append(row)
  buf = io.StringIO()
  fields = ["path", "score", "heatmap"] + (["label"] if threshold >= 0 else [])
  writer = csv.DictWriter(buf, fieldnames=fields)
  writer.writeheader()
  writer.writerows(rows)
  atomic.write_text(out_dir / "scores.csv", buf.getvalue())
  if unreadable:
    atomic.write_text(out_dir / "unreadable.txt",
                      "".join(f"{p}\t{why}\n" for p, why in unreadable))
  return rows
