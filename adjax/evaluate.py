"""Zero-shot evaluation of a trained head on target data sets.

For every category: image AUROC / AP / F1-max and pixel AUROC / AP / F1-max /
AUPRO through the streaming accumulator, written to
`<workdir>/results/<dataset>.{json,md,csv}` and printed as a table, its
F1-max thresholds to `results/<dataset>.thresholds.json`; plus a few heatmap
panels per category under `<workdir>/heatmaps/<dataset>/<category>/` (on the
mode's fixed colour scale, `heatmaps.scale_for`). The deployment record of
the mode evaluated (`Workdir.mode_thresholds`: `thresholds.json` for the
zero-shot head, `thresholds.<mode>.json` otherwise) is written only when
chosen (`eval.set_thresholds=True`) or, zero-shot, when a training run's
evaluation finds none.
"""

from __future__ import annotations

import logging
from pathlib import Path
import shutil
import time

import jax
import numpy as np

from adjax import metrics, modes, scoring_modes
from adjax.common import atomic
from adjax.config import schema
from adjax.data import targets as datasets
from adjax.report import comparison, heatmaps
from adjax.report import html as html_report
from adjax.report import tables
from adjax.scorer import ModeScorer, ZeroShotScorer
from adjax.workdir import Workdir, identity, run_log, thresholds


class CategoryMetrics:
  """Image metrics over every image; pixel metrics over images with a mask.

  A user's folder may have defect images without ground truth: they count
  for the image-level metrics and are left out of the pixel-level ones.
  """

  def __init__(self, fpr_limit: float, zsad_aupro: bool, extremes: int = 0):
    self.images = metrics.MetricAccumulator(fpr_limit=fpr_limit)
    self.pixels = metrics.MetricAccumulator(fpr_limit=fpr_limit, zsad_aupro=zsad_aupro)
    self.extremes = extremes
    # (score, example index, map, mask) of the highest- and lowest-scoring images.
    self.high: list[tuple] = []
    self.low: list[tuple] = []

  def update(self, rows: dict, sel: np.ndarray) -> None:
    self.images.update(rows["score"][sel], rows["label"][sel])
    known = sel & rows["has_mask"]
    if known.any():
      self.pixels.update(rows["score"][known], rows["label"][known], rows["map"][known],
                         rows["mask"][known])
    if self.extremes:
      for i in np.flatnonzero(sel):
        item = (float(rows["score"][i]), int(rows["index"][i]), rows["map"][i],
                rows["mask"][i])
        self.high = sorted(self.high + [item], key=lambda t: -t[0])[:self.extremes]
        self.low = sorted(self.low + [item], key=lambda t: t[0])[:self.extremes]

  def result(self) -> tuple[dict, dict]:
    """(metrics, details): details holds the F1-max thresholds and the curves."""
    pixel = self.pixels.result(details=True)
    image = self.images.result(details=True)
    out = {k: v for k, v in pixel.items() if k in metrics.METRIC_KEYS + (metrics.ZSAD_KEY,)
           and k.startswith("pixel_")}
    out.update({k: v for k, v in image.items() if k in metrics.METRIC_KEYS
                and k.startswith("image_")})
    details = {"image_threshold": image.get("image_threshold"),
               "pixel_threshold": pixel.get("pixel_threshold"),
               "image_curve": image.get("image_curve"), "pixel_curve": pixel.get("pixel_curve")}
    return out, details


def results_identity(cfg, towers, source: tuple[Path, int]) -> dict:
  """The results identity: what these results came from (stored in each
  results/<stem>.json; `identity.results_stem` names the files by it)."""
  return {
      "head": {"workdir": str(Path(source[0]).resolve()), "step": int(source[1])},
      "model": identity.model_fields(cfg),
      "towers": {"backbone": towers.backbone_id,
                 "text": getattr(towers.text_embed, "model_id", None)},
      "eval": dict({k: getattr(cfg.eval, k) for k in ("image_score", "fpr_limit", "aupro_zsad")},
                   backbone_dtype=cfg.backbone.dtype,
                   feature_precision=("bfloat16" if cfg.eval.feature_cache == "disk" and
                                      cfg.eval.feature_cache_dtype == "bfloat16"
                                      else "float32")),
      "image_size": int(cfg.image_size),
  }


# ---- the consumers of the rows ------------------------------------------------
class MetricsConsumer:
  """Rows -> CategoryMetrics per category and the image scores and labels."""

  def __init__(self, cfg, categories: list[str]):
    self.cfg, self.categories = cfg, categories
    self.accs: dict[str, CategoryMetrics] = {}
    self.image_scores: list[tuple[np.ndarray, np.ndarray]] = []

  def consume(self, rows: dict) -> None:
    cfg = self.cfg
    valid = rows["valid"]
    for ci in np.unique(rows["category_index"][valid]):
      name = self.categories[ci]
      sel = valid & (rows["category_index"] == ci)
      acc = self.accs.setdefault(name, CategoryMetrics(cfg.eval.fpr_limit, cfg.eval.aupro_zsad,
                                                       cfg.eval.report_panels))
      acc.update(rows, sel)
    self.image_scores.append((rows["score"][valid], rows["label"][valid]))

  def result(self) -> tuple[dict, dict]:
    """(metrics by category, details by category), categories sorted."""
    outcome = {name: self.accs[name].result() for name in sorted(self.accs)}
    return ({name: res for name, (res, _) in outcome.items()},
            {name: d for name, (_, d) in outcome.items()})


class HeatmapConsumer:
  """Draws (category, path, image, map, mask) panels under one evaluation's
  heatmaps folder, which it empties first (process 0): panels of an earlier
  evaluation would mislead. The other processes draw only after the first
  eval step, which waits for process 0."""

  def __init__(self, heat_dir: Path, main: bool, scoring: str = "zero_shot"):
    self.heat_dir = heat_dir
    # Drawn during the pass, before any threshold: the mode's fixed scale.
    self.scale = heatmaps.scale_for(scoring)
    if main and heat_dir.exists():
      shutil.rmtree(heat_dir)

  def consume(self, draws) -> None:
    for name, path, image, amap, mask in draws:
      stem = Path(path).with_suffix("").as_posix().replace("/", "__")
      heatmaps.save_png(self.heat_dir / name / f"{stem}.png",
                        heatmaps.panel(image, amap, mask, self.scale))


def heatmap_indices(cfg, handle) -> set[int]:
  """Examples to draw: evenly spread over each category's (path-sorted) list,
  so the panels show several defect kinds and normal images."""
  k = cfg.eval.heatmaps_per_category
  chosen: set[int] = set()
  if k <= 0:
    return chosen
  for ci in range(len(handle.categories)):
    idx = np.flatnonzero(handle.example_category == ci)
    if len(idx):
      chosen.update(int(i) for i in idx[np.linspace(0, len(idx) - 1, min(k, len(idx)))
                                        .round().astype(int)])
  return chosen


def write_report(workdir: Path, handle, stem: str, ident: dict, title: str, results: dict,
                 details: dict, accs: dict, image_size: int,
                 scoring: str = "zero_shot") -> str:
  """results/<stem>.{json,md,csv} (tables) and results/<stem>.html (table, ROC /
  PR curves and extreme panels per category, each category's panels on one
  scale: divided by its F1-max pixel threshold). -> the table's text."""
  table_text = tables.write_reports(results, Workdir(workdir).results, stem, ident)
  panels = {}
  for name, acc in accs.items():
    scale = heatmaps.scale_for(scoring, (details.get(name) or {}).get("pixel_threshold"))
    panels[name] = [
        (f"{kind} score {score:.9g}: {datasets.as_str(handle.source[index]['path'])} "
         f"(colours: {scale.label})",
         heatmaps.png_bytes(heatmaps.panel(datasets.image_at(handle, index, image_size), amap, mask,
                                           scale)))
        for kind, items in (("highest", acc.high), ("lowest", acc.low))
        for score, index, amap, mask in items]
  curves = {name: {"image": d["image_curve"], "pixel": d["pixel_curve"]}
            for name, d in details.items()}
  summary = tables.summarize(results)
  note = summary.get("mean_note")
  page = html_report.evaluation_html(
      title + (f" ({tables.MEAN}: {note})" if note else ""),
      {**summary["categories"], "mean": summary["mean"]}, curves, panels, ident,
      list(summary["mean"]))
  atomic.write_text(Workdir(workdir).evaluation_page(stem), page)
  return table_text


class ThresholdBook:
  """The F1-max thresholds of each evaluation: written beside its results
  (`results/<stem>.thresholds.json`) and kept for the deployment thresholds."""

  def __init__(self, workdir: Path, source, head_step: int):
    self.workdir, self.source, self.head_step = workdir, source, head_step
    # data set -> category -> {"image", "pixel"}: the F1-max thresholds.
    self.category_thresholds: dict[str, dict] = {}
    # data set -> (its image scores and labels, its results/<stem>.thresholds.json).
    self.per_target: dict[str, tuple[list, Path | None]] = {}

  def record(self, handle, stem: str, details: dict, image_scores: list) -> None:
    """This evaluation's thresholds, beside its results (never the deployment file)."""
    banks = self.source.threshold_banks(handle)
    self.category_thresholds[handle.display_name] = {
        name: dict({"image": d["image_threshold"], "pixel": d["pixel_threshold"]},
                   **({"bank": banks[name]} if name in banks else {}))
        for name, d in details.items()}
    record = self._record(
        image_scores, {handle.display_name: self.category_thresholds[handle.display_name]})
    own = None
    if record is not None:
      own = thresholds.write(Workdir(self.workdir).evaluation_thresholds(stem), **record)
    self.per_target[handle.display_name] = (list(image_scores), own)

  def write_deployment(self) -> Path | None:
    """The deployment <workdir>/thresholds.json from every evaluated target
    (process 0); called only when the user chose it (eval.set_thresholds) or
    for a training run's first evaluation. Records the per-evaluation files
    it was made from."""
    record = self._record([x for scored, _ in self.per_target.values() for x in scored],
                          self.category_thresholds)
    if record is None:
      return None
    record["details"]["made_from"] = [str(p) for _, p in self.per_target.values() if p]
    return thresholds.write(Workdir(self.workdir).mode_thresholds(record["scoring"]),
                            **record)

  def _record(self, scored, found) -> dict | None:
    """thresholds.write's arguments for image scores `scored` [(scores, labels)]
    and per-data-set category thresholds `found`: the F1-optimal image
    threshold over every image and the median of the categories' pixel
    thresholds at the top (what `predict` uses for an object name the
    evaluation did not see), the categories' own in `details.per_category`."""
    if not scored:
      return None
    scores = np.concatenate([s for s, _ in scored])
    labels = np.concatenate([l for _, l in scored])
    image = (metrics.f1_optimal(scores, labels).threshold
             if 0 < labels.sum() < labels.size else None)
    pixels = [t["pixel"] for cats in found.values() for t in cats.values()
              if t["pixel"] is not None]
    pixel = float(np.median(pixels)) if pixels else None
    if image is None and pixel is None:
      return None
    return dict(dataset=",".join(found), image_score=self.source.threshold_image_score(),
                checkpoint_step=self.head_step, model=self.source.threshold_model(),
                image=image, pixel=pixel, method="f1", details={"per_category": dict(found)},
                scoring=self.source.scoring)


# ---- the evaluator ------------------------------------------------------------
class Evaluator:
  """Evaluates one data set at a time: one pass of its scorer per data set, its rows consumed by the metrics and
  the heatmap panels, then the reports and the thresholds.

  `scorer` is a `scorer.ModeScorer`: `scorer.ZeroShotScorer` (the head) or
  `scoring_modes.NeighbourScorer` (the other modes).
  """

  def __init__(self, cfg, workdir: Path, scorer: ModeScorer, source: tuple[Path, int]):
    self.cfg, self.workdir = cfg, workdir
    self.scorer = scorer
    self.results_identity = scorer.adjust_identity(results_identity(cfg, scorer.towers,
                                                                    source))
    self.thresholds = ThresholdBook(workdir, self.scorer,
                                    (self.results_identity["head"] or {"step": -1})["step"])

  @property
  def category_thresholds(self) -> dict[str, dict]:
    return self.thresholds.category_thresholds

  def write_thresholds(self) -> Path | None:
    return self.thresholds.write_deployment()

  def evaluate(self, handle) -> dict[str, dict[str, float]]:
    cfg, src = self.cfg, self.scorer
    src.check(handle)
    to_draw = heatmap_indices(cfg, handle)
    main = jax.process_index() == 0
    ident = dict(self.results_identity, data={
        "name": handle.name, "examples": handle.num_examples, "prepared": str(handle.data_dir)})
    ident.update(src.extra_identity(handle))
    # Results of another evaluation (another head, step, model or setting)
    # are never overwritten: this one then goes beside them, as name@digest.
    stem = identity.results_stem(Workdir(self.workdir).results, src.display_name(handle), ident)
    pictures = HeatmapConsumer(Workdir(self.workdir).evaluation_heatmaps(stem), main,
                               src.scoring)
    scores = MetricsConsumer(cfg, handle.categories)
    progress = run_log.Progress(src.progress_label(handle), handle.num_examples, enabled=main)
    for rows, draws in src.rows(handle, to_draw, progress):
      pictures.consume(draws)
      if main:   # process 0 accumulates the metrics of every row
        scores.consume(rows)
    progress.close()
    src.finish()
    if not main:
      return {}
    results, details = scores.result()
    table_text = write_report(self.workdir, handle, stem, ident, src.title(handle), results,
                              details, scores.accs, self.scorer.model.image_size,
                              src.scoring)
    self.thresholds.record(handle, stem, details, scores.image_scores)
    src.announce(handle, stem, results, table_text)
    return results


def evaluate_modes(cfg, workdir: Path, towers, mesh, params, *,
                   source: tuple[Path, int] | None) -> tuple[dict, list]:
  """`evaluate_targets` in eval.scoring, then in each mode of eval.compare
  (a training run's evaluation gives each its first deployment record);
  with eval.compare, ends with the modes table of each target and the path
  of the report that shows them side by side. Returns eval.scoring's
  (results by data set, absent targets)."""
  _check_compared(cfg)
  absent: list = []
  by_mode: dict[str, tuple[dict, float]] = {}
  for mode in modes.evaluated(cfg):
    run = cfg if mode == cfg.eval.scoring else schema.replace(cfg, **{"eval.scoring": mode})
    start = time.perf_counter()
    results, missing = evaluate_targets(run, workdir, towers, mesh,
                                        params if modes.needs_head(mode) else None,
                                        source=source, first_record=mode != cfg.eval.scoring)
    by_mode[mode] = (results, time.perf_counter() - start)
    if mode == cfg.eval.scoring:
      absent = missing
  if len(by_mode) > 1 and jax.process_index() == 0 and by_mode[cfg.eval.scoring][0]:
    results_dir = Workdir(workdir).results
    for name in by_mode[cfg.eval.scoring][0]:
      table = comparison.console_table(
          name, {m: (r.get(name), seconds) for m, (r, seconds) in by_mode.items()})
      print(f"\n{table}", flush=True)
      report = results_dir / f"{name}.modes.html"
      if report.exists():
        print(f"report (the modes side by side, per category): {report}", flush=True)
  return by_mode[cfg.eval.scoring][0], absent


def _check_compared(cfg) -> None:
  """Every present target scorable in every neighbour mode of eval.compare,
  before the first evaluation starts (eval.scoring's are checked as always)."""
  compared = [m for m in modes.evaluated(cfg)[1:] if modes.neighbour_kind(m)]
  found: list[str] = []
  for target in datasets.targets(cfg) if compared else ():
    try:
      handle = datasets.prepare(cfg, target)
    except datasets.data.DatasetNotFoundError:
      continue                       # listed as absent by its evaluation
    for mode in compared:
      found += scoring_modes.problems(schema.replace(cfg, **{"eval.scoring": mode}), handle)
  if found:
    raise scoring_modes.ScoringError("; ".join(found))


def evaluate_targets(cfg, workdir: Path, towers, mesh, params, *,
                     source: tuple[Path, int] | None,
                     first_record: bool = False) -> tuple[dict, list]:
  """Evaluates every configured target that is present; lists the absent ones.

  `source` is (the workdir the head comes from, its step): part of the
  results' identity. `first_record`: a training run's evaluation writes
  this mode's deployment record when there is none (zero_shot always does).
  Returns (results by data set, [(absent target, why)]).
  """
  if cfg.eval.scoring == "zero_shot":
    scorer = ZeroShotScorer(cfg, towers, mesh, params)
  else:
    scorer = scoring_modes.NeighbourScorer(cfg, towers, mesh, params, workdir)
  evaluator = Evaluator(cfg, workdir, scorer, source if source is not None else (workdir, 0))
  all_results, absent, handles = {}, [], []
  for target in datasets.targets(cfg):
    try:
      handles.append(datasets.prepare(cfg, target))
    except datasets.data.DatasetNotFoundError as e:
      absent.append((target, str(e).splitlines()[0]))
  # Every data set's refusals (too few images for the mode, for eval.rscin_k)
  # before the first one is scored.
  for handle in handles:
    evaluator.scorer.check(handle)
  for handle in handles:
    all_results[handle.display_name] = evaluator.evaluate(handle)
    if jax.process_index() == 0:
      comparison.write_comparison(Workdir(workdir).results, handle.display_name)
  # The deployment record of the mode evaluated (thresholds.json for the
  # zero-shot head, thresholds.<mode>.json otherwise) is replaced only when
  # chosen, or made by a training run's first evaluation.
  if jax.process_index() == 0 and all_results:
    deploy = Workdir(workdir).mode_thresholds(cfg.eval.scoring)
    first = cfg.mode == "train" and not deploy.exists() and (
        cfg.eval.scoring == "zero_shot" or first_record)
    if cfg.eval.set_thresholds or first:
      written = evaluator.write_thresholds()
      if written:
        why = "eval.set_thresholds" if cfg.eval.set_thresholds else "the run had none"
        print(f"decision thresholds of {cfg.eval.scoring} (F1-max) -> {written} ({why})",
              flush=True)
    elif deploy.exists():
      print(f"{deploy} kept (this evaluation's thresholds are in results/*.thresholds.json;"
            " --config.eval.set_thresholds=True makes them the deployment thresholds)",
            flush=True)
    else:
      print(f"no deployment thresholds for {cfg.eval.scoring} ({deploy.name}); this "
            "evaluation's are in results/*.thresholds.json (--config.eval.set_thresholds="
            "True makes them the deployment thresholds)", flush=True)
  if absent and jax.process_index() == 0:
    print("\nTargets not evaluated (data not present):")
    for target, why in absent:
      print(f"  {target}: {why}")
  logging.info("evaluated %d targets, %d absent", len(all_results), len(absent))
  return all_results, absent
