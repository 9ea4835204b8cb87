"""Prediction on a folder or glob of images with a trained head.

Writes `<workdir>/predictions/scores.csv` (path, image score, heatmap and,
with a threshold, `decision` 0/1 and `threshold_source`) and one heatmap panel per image
(image | map overlaid, at the image's own resolution) under
`<workdir>/predictions/heatmaps/`. Any size or mode is accepted (converted to
RGB); unreadable files are listed in `unreadable.txt` and on the console, and
every other image is still processed; when none can be read the run fails
in one line and the previous predictions stay. Files under the workdir are
never inputs; symlinked folders are followed (each real folder once); EXIF
orientation is applied.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from adjax import atomic, data, heatmaps, html_report, overlays, run_log, thresholds
from adjax.errors import UserError
from adjax.scorer import Scorer


class PredictError(UserError, ValueError):
  """Nothing could be predicted; the message says why."""


SHOWN_UNREADABLE = 3


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
  scorer = Scorer(cfg, towers, mesh, params)
  table = scorer.text_table([cfg.predict.object_name])
  limits = _thresholds(cfg, workdir, scorer, table)
  if not cfg.predict.input:          # calibration only
    return {"scores": [], "unreadable": [], "thresholds": limits[:2], "threshold_source": limits[3]}
  # The workdir (its predictions, heatmaps, checkpoints) is never an input.
  excluded: list[str] = []
  paths, unreadable = data.read_image_folder(cfg.predict.input, exclude=[workdir],
                                             excluded=excluded)
  if excluded:
    print(f"skipped {len(excluded)} files under the workdir {workdir} (its own outputs "
          "are never inputs)", flush=True)
  if not paths:
    # Nothing readable: the previous predictions stay as they are.
    listing = workdir / "unreadable.txt"
    atomic.write_text(listing, "".join(f"{p}\t{why}\n" for p, why in unreadable))
    raise PredictError(
        f"predict.input={cfg.predict.input!r}: none of its {len(unreadable)} image files "
        f"could be read ({_first_few(unreadable)}; all listed in {listing}); "
        "predictions/ is left as it was")
  root = cfg.predict.input if os.path.isdir(cfg.predict.input) else os.path.commonpath(
      [os.path.dirname(p) for p in paths]) if paths else ""
  out_dir = workdir / "predictions"
  # Everything is written to a fresh folder that replaces predictions/ at the
  # end: a rerun leaves no output of an earlier one, a failed or interrupted
  # run leaves the earlier outputs as they were (and no temporary folder).
  with atomic.atomic_dir(out_dir, overwrite=True) as work_dir:
    rows = _predict_into(cfg, work_dir, scorer, table, paths, root, unreadable, limits)
  if unreadable:
    print(f"{len(unreadable)} unreadable files ({_first_few(unreadable)}; all listed in "
          f"{out_dir / 'unreadable.txt'})")
  print(f"predicted {len(rows)} images -> {out_dir / 'scores.csv'}, {out_dir / 'index.html'}"
        f" (decision thresholds: {limits[2]})")
  return {"scores": rows, "unreadable": unreadable, "thresholds": limits[:2], "threshold_source": limits[3]}


def _first_few(unreadable) -> str:
  shown = "; ".join(f"{p}: {why}" for p, why in unreadable[:SHOWN_UNREADABLE])
  return shown + (f"; and {len(unreadable) - SHOWN_UNREADABLE} more"
                  if len(unreadable) > SHOWN_UNREADABLE else "")


def _thresholds(cfg, workdir: Path, scorer, table):
  """(image threshold, pixel threshold, where they come from, the image
  threshold's source as `thresholds.resolve` names it) for this run.

  `predict.calibrate_normals` first sets them from normal images and writes
  thresholds.json; an existing thresholds.json must belong to this head,
  towers, size and image-score mode (else it is refused, saying why);
  `predict.threshold >= 0` overrides the image threshold. The object's own
  thresholds are chosen by `thresholds.resolve`, the rule export uses too.
  """
  if cfg.predict.calibrate_normals:
    _calibrate(cfg, workdir, scorer, table)
  record = None
  origin = "none"
  path = thresholds.deployment_path(workdir, cfg.init_from)
  if path is not None:
    record = thresholds.read(path)
    thresholds.check(record, image_score=scorer.model.image_score,
                     model=scorer.threshold_identity())
    origin = f"{path} ({record['method']})"
  chosen = thresholds.resolve(record, cfg.predict.object_name,
                              cfg.predict.threshold if cfg.predict.threshold >= 0 else None)
  if chosen.source == "predict.threshold":
    origin = "predict.threshold"
  elif record is not None and not chosen.source.startswith("category:"):
    seen = sorted({n for cats in record.get("details", {}).get("per_category", {}).values()
                   for n in cats})
    print(f"predict.object_name={cfg.predict.object_name!r} has no calibrated threshold of "
          f"its own in {path} (its categories: {', '.join(seen) or 'none'}); using the "
          "top-level threshold", flush=True)
  return chosen.image, chosen.pixel, f"{origin}; image threshold from {chosen.source}", \
      chosen.source


def _calibrate(cfg, workdir: Path, scorer, table) -> None:
  """Thresholds from normal images only: the `calibrate_quantile` quantile of
  their image scores and of their pixels' scores, written to thresholds.json."""
  paths, unreadable = data.read_image_folder(cfg.predict.calibrate_normals)
  if not paths:
    raise thresholds.ThresholdError(
        f"predict.calibrate_normals={cfg.predict.calibrate_normals!r}: no readable images")
  scores, pixels = [], []
  for batch in data.prediction_batches(paths, image_size=scorer.model.image_size,
                                       batch_size=cfg.predict.batch_size):
    amap, score = scorer.maps(batch["image"], np.zeros(len(batch["image"]), np.int32),
                              table)
    valid = np.asarray(batch["valid"])
    scores.append(np.asarray(score)[valid])
    pixels.append(np.asarray(amap)[valid].ravel())
  q = cfg.predict.calibrate_quantile
  written = thresholds.write(
      workdir, dataset=f"normals:{cfg.predict.calibrate_normals}",
      image_score=scorer.model.image_score, checkpoint_step=-1,
      model=scorer.threshold_identity(),
      image=thresholds.quantile_threshold(np.concatenate(scores), q),
      pixel=thresholds.quantile_threshold(np.concatenate(pixels), q),
      method=f"normal-quantile {q}",
      details={"normal_images": int(sum(len(x) for x in scores)),
               "unreadable": [p for p, _ in unreadable]})
  print(f"calibrated on {sum(len(x) for x in scores)} normal images (quantile {q}) -> "
        f"{written}", flush=True)


def _predict_into(cfg, out_dir: Path, scorer, table, paths, root, unreadable, limits):
  image_t, pixel_t, origin, source = limits
  rows = []
  progress = run_log.Progress("predict", len(paths))
  for batch in data.prediction_batches(paths, image_size=scorer.model.image_size,
                                       batch_size=cfg.predict.batch_size):
    amap, score = scorer.maps(batch["image"], np.zeros(len(batch["image"]), np.int32),
                              table)
    progress.update(int(np.asarray(batch["valid"]).sum()))
    for i in range(len(batch["image"])):
      path = str(batch["path"][i])
      if not batch["valid"][i]:
        if path:
          unreadable.append((path, str(batch["error"][i])))
        continue
      h, w = (int(v) for v in batch["orig_size"][i])
      with Image.open(path) as img:   # upright (EXIF), any mode -> 8-bit RGB
        rgb = np.asarray(data.images.to_rgb(data.images.upright(img)))
      full = _map_at(amap[i], (h, w))
      name = _output_name(path, root)
      heatmaps.save_png(out_dir / "heatmaps" / name, heatmaps.panel(rgb, full))
      row = {"path": path, "score": f"{float(score[i]):.6f}", "heatmap": f"heatmaps/{name}"}
      if image_t is not None:
        row["decision"] = int(float(score[i]) >= image_t)
        row["threshold_source"] = source
      if pixel_t is not None:
        mask = overlays.binary_mask(full, pixel_t)
        overlays.save_mask_png(out_dir / "masks" / name, mask)
        overlays.save_overlay_png(out_dir / "overlays" / name, rgb, mask)
        row.update(mask=f"masks/{name}", overlay=f"overlays/{name}")
      rows.append(row)
  progress.close()
  buf = io.StringIO()
  fields = ["path", "score", "heatmap"] + (
      ["decision", "threshold_source"] if image_t is not None else []) + (
      ["mask", "overlay"] if pixel_t is not None else [])
  writer = csv.DictWriter(buf, fieldnames=fields)
  writer.writeheader()
  writer.writerows(rows)
  atomic.write_text(out_dir / "scores.csv", buf.getvalue())
  atomic.write_text(out_dir / "index.html", html_report.gallery_html(
      f"predictions for {cfg.predict.object_name!r} (thresholds: {origin})", rows))
  if unreadable:
    atomic.write_text(out_dir / "unreadable.txt",
                      "".join(f"{p}\t{why}\n" for p, why in unreadable))
  return rows
