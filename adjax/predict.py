"""Prediction on a folder or glob of images with a trained head.

Writes `<workdir>/predictions/scores.csv` (path, image score as `%.9g`, which
round-trips float32, heatmap, `decision` 0/1, or `undecided` without an image
threshold, and `threshold_source`) and one heatmap panel per image
(image | map overlaid, at the image's own resolution) under
`<workdir>/predictions/heatmaps/`. Any size or mode is accepted (converted to
RGB); unreadable files (NaN float images among them) and files skipped by
their extension are listed in `unreadable.txt` (one line each, `\\n`, `\\t`
escaped) and counted on the console, and every other image is still
processed; when none can be read the run fails in one line and the previous
predictions stay. A scores.csv cell that a spreadsheet would run as a
formula gets a leading `'`; an output name too long for the file system is
cut and ends with a hash of the whole name. Files under the workdir are
never inputs; symlinked folders are followed (each real folder once); EXIF
orientation is applied.

Scoring, batching, resizing maps to each image's size and the choice of
thresholds are `adjax.detector.Detector`'s (the Python API): this module
only chooses the input files, reports progress and writes the outputs.
`predict.scoring=few_shot` scores against `predict.references` (normal
images, `Detector.use_references`), `batch` scores the inputs against each
other (at least 5); neither needs the head or the text tower. Each mode
decides with its own record (`Workdir.mode_thresholds`: thresholds.json,
thresholds.few_shot.json, thresholds.batch.json), or `predict.threshold`;
`predict.calibrate_normals` makes that record from normal images only
(`Detector.calibrate`). Without one the run is undecided, and says so.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from pathlib import Path

import jax

from adjax import data, modes
from adjax.common import atomic
from adjax.common.errors import UserError
from adjax.data import images as data_images
from adjax.detector import Detector, DetectorError
from adjax.report import heatmaps
from adjax.report import html as html_report
from adjax.report import overlays
from adjax.workdir import Predictions, Workdir, run_log


class PredictError(UserError, ValueError):
  """Nothing could be predicted; the message says why."""


SHOWN_UNREADABLE = 3


def _output_name(path: str, root: str, longest: int | None = None) -> str:
  """The heatmap's path under heatmaps/: the input's path below `root`, its
  whole file name kept (so photo.jpg and photo.png, or a/b.png and a__b.png,
  never share an output), plus .png. A part longer than the file system
  allows for a written file (`atomic.longest_name`) is cut and ends with a
  hash of the whole part (`<start>~<12 hex>.png`): stable, and distinct for
  distinct names."""
  rel = os.path.relpath(path, root) if root else os.path.basename(path)
  parts = list(Path(rel).parts)
  parts[-1] += ".png"
  longest = atomic.longest_name() if longest is None else longest
  return "/".join(_fitting(part, longest) for part in parts)


def _fitting(part: str, longest: int) -> str:
  raw = part.encode("utf-8", "surrogateescape")
  if len(raw) <= longest:
    return part
  tail = "~" + hashlib.sha256(raw).hexdigest()[:12] + (".png" if part.endswith(".png")
                                                         else "")
  head = raw[:longest - len(tail)].decode("utf-8", "ignore")   # no half a character
  return head + tail


# A spreadsheet runs a cell that starts with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
  """A text cell of scores.csv that a spreadsheet shows as text: one starting
  with =, +, -, @, tab or CR gets a leading apostrophe (OWASP's advice)."""
  return "'" + text if text.startswith(_FORMULA_START) else text


def listing_line(path: str, why: str) -> str:
  """One line of unreadable.txt, `path<TAB>reason`: backslash, tab, CR and
  newline in either are written as \\, \\t, \\r, \\n, so one file is one line."""
  return f"{_one_line(path)}\t{_one_line(why)}\n"


def _one_line(text) -> str:
  return (str(text).replace("\\", "\\\\").replace("\t", "\\t").replace("\r", "\\r")
          .replace("\n", "\\n"))


def references_of(references: str, object_name: str) -> str:
  """predict.references for `object_name`: {category} replaced by the name
  (e.g. data/demo/family_b/{category}/train/good, as eval.references_dir)."""
  return references.replace(modes.CATEGORY, str(object_name).strip())


def run(cfg, workdir: Path, towers, mesh, head=None) -> dict:
  """mode=predict: scores `predict.input` with a `Detector` over `head` (a
  `loading.Head`, None in a neighbour mode) and writes predictions/."""
  if jax.process_count() > 1:
    raise ValueError("mode=predict runs on one process; start it without distributed=True")
  name, scoring = cfg.predict.object_name, cfg.predict.scoring
  # Thresholds being calibrated anew replace the mode's record, which is then
  # not read (nor refused) first.
  det = Detector(cfg, workdir, towers, mesh, head,
                 load_thresholds=not cfg.predict.calibrate_normals)
  if scoring == "zero_shot" and str(name).strip():
    try:                             # the name's prompts fit the text tower, before any image
      det.check_object_names([name])
    except DetectorError as e:
      raise PredictError(f"predict.object_name: {e}") from None
  if scoring == "few_shot":
    refs = references_of(cfg.predict.references, name)
    try:
      count = det.references_from(refs)
    except (FileNotFoundError, UserError) as e:
      raise PredictError(f"predict.references={cfg.predict.references!r}: {e}") from None
    print(f"few_shot: {count} reference images from {refs}", flush=True)
  if cfg.predict.calibrate_normals:
    _calibrate(cfg, det)
  limits = det.thresholds_for(name, scoring)
  origin = _origin(cfg, det, limits)
  result = {"unreadable": [], "thresholds": (limits.image, limits.pixel),
            "threshold_source": limits.source}
  if not cfg.predict.input:          # calibration only
    return dict(result, scores=[])
  # The workdir (its predictions, heatmaps, checkpoints) is never an input.
  excluded: list[str] = []
  skipped: list[str] = []
  paths, unreadable = data.read_image_folder(cfg.predict.input, exclude=[workdir],
                                             excluded=excluded, skipped=skipped)
  if excluded:
    print(f"skipped {len(excluded)} files under the workdir {workdir} (its own outputs "
          "are never inputs)", flush=True)
  if skipped:
    # Listed with the unreadable files: every file of the input not predicted
    # is in unreadable.txt.
    print(f"skipped {len(skipped)} files whose extension is not an image's "
          f"({data_images.extension_counts(skipped)}; read are "
          f"{', '.join(data_images.IMAGE_EXTENSIONS)}); all listed in unreadable.txt",
          flush=True)
    unreadable += [(p, "skipped: not an image extension (read are "
                    f"{', '.join(data_images.IMAGE_EXTENSIONS)})") for p in skipped]
  if not paths:
    # Nothing readable: the previous predictions stay as they are.
    listing = Workdir(workdir).unreadable
    atomic.write_text(listing, "".join(listing_line(p, why) for p, why in unreadable))
    raise PredictError(
        f"predict.input={cfg.predict.input!r}: none of its "
        f"{len(unreadable) - len(skipped)} image files could be read"
        + (f" ({len(skipped)} other files skipped by their extension)" if skipped else "")
        + f" ({_first_few(unreadable)}; all listed in {listing}); "
        "predictions/ is left as it was")
  root = cfg.predict.input if os.path.isdir(cfg.predict.input) else os.path.commonpath(
      [os.path.dirname(p) for p in paths]) if paths else ""
  out_dir = Workdir(workdir).predictions
  # Everything is written to a fresh folder that replaces predictions/ at the
  # end: a rerun leaves no output of an earlier one, a failed or interrupted
  # run leaves the earlier outputs as they were (and no temporary folder).
  with atomic.atomic_dir(out_dir, overwrite=True) as work_dir:
    rows = _predict_into(cfg, work_dir, det, paths, root, unreadable, limits, origin)
  if unreadable:
    print(f"{len(unreadable)} files not predicted ({_first_few(unreadable)}; all listed in "
          f"{Predictions(out_dir).unreadable})")
  print(f"predicted {len(rows)} images -> {Predictions(out_dir).scores}, "
        f"{Predictions(out_dir).index}"
        f" (decision thresholds: {origin})")
  return dict(result, scores=rows, unreadable=unreadable, scoring=cfg.predict.scoring)


def _first_few(unreadable) -> str:
  shown = "; ".join(f"{_one_line(p)}: {_one_line(why)}"
                    for p, why in unreadable[:SHOWN_UNREADABLE])
  return shown + (f"; and {len(unreadable) - SHOWN_UNREADABLE} more"
                  if len(unreadable) > SHOWN_UNREADABLE else "")


def _origin(cfg, det: Detector, limits) -> str:
  """Where this run's thresholds come from, for the console and index.html;
  says so when the object has no threshold of its own, or none at all."""
  scoring = cfg.predict.scoring
  record = det.record_for(scoring)
  if limits.source == "predict.threshold":
    return "predict.threshold"
  if record is None or limits.image is None:
    why = (f"no deployment thresholds for scoring={scoring} "
           f"({Workdir(det.workdir).mode_thresholds(scoring).name})")
    print(f"undecided: {why}; no decisions or masks (evaluate with "
          "eval.set_thresholds=True, calibrate with predict.calibrate_normals, or set "
          "predict.threshold)", flush=True)
    return f"undecided, {why}"
  path = det.record_paths.get(scoring) or "calibrated now"
  names = sorted({n for cats in (record.get("details") or {}).get(
      "per_category", {}).values() for n in cats})
  if names and not limits.source.startswith("category:"):
    print(f"predict.object_name={cfg.predict.object_name!r} has no calibrated threshold of "
          f"its own in {path} (its categories: {', '.join(names) or 'none'}); "
          "using the top-level threshold", flush=True)
  return f"{path} ({record['method']}); image threshold from {limits.source}"


def _calibrate(cfg, det: Detector) -> None:
  """Thresholds from normal images only (`Detector.calibrate`: the
  `calibrate_quantile` quantile of their image and pixel scores), written to
  the workdir's thresholds.json."""
  scoring = cfg.predict.scoring
  try:
    det.calibrate(cfg.predict.calibrate_normals, cfg.predict.calibrate_quantile,
                  object_name=cfg.predict.object_name, scoring=scoring)
  except (FileNotFoundError, UserError) as e:
    raise PredictError(f"predict.calibrate_normals={cfg.predict.calibrate_normals!r}: "
                       f"{e}") from None
  details = det.records[scoring]["details"]
  written = det.save_thresholds(scoring=scoring)
  print(f"calibrated {scoring} on {details['normal_images']} normal image scores "
        f"({details['scored']}; quantile {cfg.predict.calibrate_quantile}) -> {written}",
        flush=True)


def _predict_into(cfg, out_dir: Path, det: Detector, paths, root, unreadable, limits,
                  origin):
  rows = []
  out = Predictions(out_dir)
  progress = run_log.Progress("predict", len(paths))

  def write(r) -> None:            # one scored image: its panel, mask, overlay, row
    name = _output_name(r.path, root)
    # One scale for the run: divided by the pixel threshold (1 = boundary).
    heatmaps.save_png(out.picture("heatmaps", name), heatmaps.panel(
        r.rgb, r.map, scale=heatmaps.scale_for(cfg.predict.scoring, r.pixel_threshold)))
    row = {"path": r.path, "score": f"{r.score:.9g}",
           "heatmap": out.relative("heatmaps", name),
           "decision": "undecided" if r.threshold is None else int(r.decision),
           "threshold_source": r.source}
    if r.mask is not None:
      mask = overlays.binary_mask(r.map, r.pixel_threshold)
      overlays.save_mask_png(out.picture("masks", name), mask)
      overlays.save_overlay_png(out.picture("overlays", name), r.rgb, mask)
      row.update(mask=out.relative("masks", name), overlay=out.relative("overlays", name))
    rows.append(row)

  try:
    pred = det.predict(paths, object_name=cfg.predict.object_name,
                       scoring=cfg.predict.scoring, progress=progress.update, each=write,
                       keep_maps=False)
  except DetectorError as e:
    raise PredictError(f"predict.input={cfg.predict.input!r}: {e}") from None
  progress.close()
  unreadable.extend(pred.unreadable)      # files that changed since they were listed
  buf = io.StringIO()
  fields = ["path", "score", "heatmap", "decision", "threshold_source"] + (
      ["mask", "overlay"] if limits.pixel is not None else [])
  writer = csv.DictWriter(buf, fieldnames=fields)
  writer.writeheader()
  writer.writerows({k: csv_cell(v) if isinstance(v, str) and k != "score" else v
                    for k, v in row.items()} for row in rows)
  atomic.write_text(out.scores, buf.getvalue())
  what = f"{cfg.predict.object_name!r} ({cfg.predict.scoring})"
  atomic.write_text(out.index, html_report.gallery_html(
      f"predictions for {what} (thresholds: {origin})", rows))
  if unreadable:
    atomic.write_text(out.unreadable,
                      "".join(listing_line(p, why) for p, why in unreadable))
  return rows
