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

import io
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from adjax import data, datasets, metrics, sharding, thresholds
from adjax.common import atomic
from adjax.report import heatmaps, tables
from adjax.report import html as html_report
from adjax.scorer import Scorer
from adjax.workdir import feature_cache, identity, run_log
from adjax.workdir import Workdir


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


# ---- the row source of zero-shot scoring --------------------------------------
class ZeroShotScorer:
  """Zero-shot scoring: a data set's rows from the trained head (it holds a
  `Scorer`), one pass over the data set through the evaluation feature cache.

  The interface every evaluation scorer has (see `scoring_modes.NeighbourScorer`):
  `scoring`, `model`, `adjust_identity`, `check`, `extra_identity`,
  `display_name`, `progress_label`, `rows`, `finish`, `title`, `announce`,
  `threshold_model`, `threshold_image_score`.
  """

  scoring = "zero_shot"

  def __init__(self, cfg, towers, mesh, params):
    self.cfg, self.towers, self.mesh = cfg, towers, mesh
    self.scorer = Scorer(cfg, towers, mesh, params)
    self.model = self.scorer.model
    self._steps_cached = None
    self._cache = None

  def adjust_identity(self, ident: dict) -> dict:
    return ident

  def check(self, handle) -> None:
    """Raises when `handle` cannot be scored; zero-shot scores any data set."""

  def extra_identity(self, handle) -> dict:
    return {}

  def display_name(self, handle) -> str:
    return handle.display_name

  def progress_label(self, handle) -> str:
    return f"evaluate {handle.display_name}"

  def rows(self, handle, to_draw: set, progress):
    """Yields (rows, draws) per batch: `rows` holds every process's rows (map,
    score, mask, label, valid, has_mask, category_index, index); `draws` the
    panels this process draws from its own rows (it has their images): (category,
    path, image, map, mask) of the examples in `to_draw`."""
    cfg = self.cfg
    table = self.scorer.text_table(handle.categories)
    loader = datasets.loader(cfg, handle, self.model, batch_size=cfg.eval.batch_size,
                            train=False)
    self._cache = cache = self._feature_cache(handle)
    for local in loader:
      amap, score = self._batch_maps(local, table, cache)
      mine = {"map": amap, "score": score, **{k: local[k] for k in (
          "mask", "label", "valid", "has_mask", "category_index", "index")}}
      rows = {k: sharding.all_rows(v) for k, v in mine.items()}
      progress.update(int(rows["valid"].sum()))
      draws = []
      if to_draw:
        for i in np.flatnonzero(local["valid"]):
          if int(local["index"][i]) in to_draw:
            draws.append((handle.categories[local["category_index"][i]],
                          _as_str(local["path"][i]), local["image"][i], amap[i],
                          local["mask"][i]))
      yield rows, draws

  def finish(self) -> None:
    """After the pass: publishes a cache this evaluation filled."""
    if self._cache is not None and not self._cache.complete:
      self._cache.finish_epoch()
    self._cache = None

  def title(self, handle) -> str:
    return f"{handle.display_name}: zero-shot results"

  def announce(self, handle, stem: str, results: dict, table_text: str) -> None:
    if stem != handle.display_name:
      print(f"\nresults/{handle.display_name}.json holds another evaluation's results; "
            f"these go to results/{stem}.*", flush=True)
    print(f"\n{handle.display_name}: zero-shot results ({len(results)} categories)\n"
          f"{table_text}", flush=True)

  def threshold_model(self) -> dict:
    return self.scorer.threshold_model()

  def threshold_image_score(self) -> str:
    """The image-score rule recorded with the thresholds."""
    return self.model.image_score

  def threshold_banks(self, handle) -> dict[str, dict]:
    """Reference banks per category (few-shot modes only)."""
    return {}

  def _feature_cache(self, handle):
    """The target's backbone features on disk (eval.feature_cache=disk), shared by
    every head evaluated over the same backbone, image size and layers."""
    cfg = self.cfg
    if cfg.eval.feature_cache == "none":
      return None
    cache = feature_cache.open_cache("disk", evaluation_cache_dir(cfg), self.towers.backbone_id, self.model,
                                     handle, dtype=cfg.eval.feature_cache_dtype,
                                     backbone_dtype=cfg.backbone.dtype)
    if jax.process_index() == 0:
      state = ("complete: the backbone is not run" if cache.complete
               else "filled by this evaluation")
      print(f"evaluation feature cache {cache.dir}: {state}", flush=True)
    if not self._steps_cached:
      builder = self.scorer.builder
      self._steps_cached = (
          builder.eval_step(return_features=True,
                            cache_dtype=jnp.dtype(cfg.eval.feature_cache_dtype)),
          builder.eval_features_step())
    return cache

  def _batch_maps(self, local: dict, table, cache) -> tuple[np.ndarray, np.ndarray]:
    scorer = self.scorer
    if cache is None:
      return scorer.maps(local["image"], local["category_index"], table)
    filling, head_only = self._steps_cached
    categories = sharding.global_batch({"category_index": local["category_index"]},
                                       self.mesh)["category_index"]

    def from_features(batch):
      return head_only(scorer.params, table, batch["patches"], batch["cls"], categories)

    def from_images(batch):
      amap, score, features = filling(scorer.params, scorer.backbone_state, table,
                                      batch["image"], categories)
      return (amap, score), features

    amap, score = feature_cache.run_batch(cache, local, self.mesh, cache.complete,
                                          from_features, from_images)
    return sharding.local_rows(amap, 0), sharding.local_rows(score, 0)


# ---- the consumers of the rows ------------------------------------------------
def evaluation_cache_dir(cfg) -> Path:
  """Where evaluation's caches live (`eval.feature_cache_dir`, by default
  `<data.data_dir>/feature_cache`, beside the prepared data, not in a run
  folder: every run over the data shares them)."""
  return (Path(cfg.eval.feature_cache_dir) if cfg.eval.feature_cache_dir
          else Path(cfg.data.data_dir) / "feature_cache")


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
        (f"{kind} score {score:.9g}: {_as_str(handle.source[index]['path'])} "
         f"(colours: {scale.label})",
         heatmaps.png_bytes(heatmaps.panel(_image_at(handle, index, image_size), amap, mask,
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


def _image_at(handle, index: int, image_size: int) -> np.ndarray:
  with Image.open(io.BytesIO(handle.source[index]["image"])) as img:
    return data.images.preprocess_image(img, image_size)


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

  Zero-shot by default (`ZeroShotScorer`); `scoring_modes.ModeEvaluator` holds
  a neighbour-mode scorer (`scoring_modes.NeighbourScorer`).
  """

  def __init__(self, cfg, workdir: Path, towers, mesh, params, source: tuple[Path, int],
               scorer=None):
    self.cfg, self.workdir = cfg, workdir
    self.scorer = scorer if scorer is not None else ZeroShotScorer(cfg, towers, mesh, params)
    self.results_identity = self.scorer.adjust_identity(results_identity(cfg, towers, source))
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


def _as_str(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def evaluate_targets(cfg, workdir: Path, towers, mesh, params, *,
                     source: tuple[Path, int]) -> tuple[dict, list]:
  """Evaluates every configured target that is present; lists the absent ones.

  `source` is (the workdir the head comes from, its step): part of the
  results' identity. Returns (results by data set, [(absent target, why)]).
  """
  if cfg.eval.scoring == "zero_shot":
    evaluator = Evaluator(cfg, workdir, towers, mesh, params, source)
  else:
    from adjax import scoring_modes
    evaluator = scoring_modes.ModeEvaluator(cfg, workdir, towers, mesh, params, source)
  all_results, absent, handles = {}, [], []
  for target in [t.strip() for t in cfg.data.targets.split(",") if t.strip()]:
    try:
      handles.append(datasets.prepare(cfg, target))
    except data.DatasetNotFoundError as e:
      absent.append((target, str(e).splitlines()[0]))
  # Every data set's refusals (too few images for the mode, for eval.rscin_k)
  # before the first one is scored.
  for handle in handles:
    evaluator.scorer.check(handle)
  for handle in handles:
    all_results[handle.display_name] = evaluator.evaluate(handle)
    if jax.process_index() == 0:
      from adjax import scoring_modes
      scoring_modes.write_comparison(Workdir(workdir).results, handle.display_name)
  # The deployment record of the mode evaluated (thresholds.json for the
  # zero-shot head, thresholds.<mode>.json otherwise) is replaced only when
  # chosen, or made by a training run's first evaluation.
  if jax.process_index() == 0 and all_results:
    deploy = Workdir(workdir).mode_thresholds(cfg.eval.scoring)
    first = cfg.mode == "train" and not deploy.exists() and cfg.eval.scoring == "zero_shot"
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
