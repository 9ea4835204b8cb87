"""Scorers: the compiled eval step over placed weights (`Scorer`, shared by
evaluation and prediction), the interface every evaluation scorer has
(`ModeScorer`), and zero-shot evaluation's scorer (`ZeroShotScorer`)."""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from adjax import loading, steps
from adjax.common import sharding
from adjax.data import targets as datasets
from adjax.workdir import feature_cache


class Scorer:
  """The compiled eval step over placed weights: images -> (maps, image scores).

  Used by evaluation and by prediction.
  """

  def __init__(self, cfg, towers, mesh, params):
    self.towers, self.mesh = towers, mesh
    self.reference_quirks = bool(cfg.reference_quirks)
    self.model = towers.model(cfg.model)
    self.params = jax.device_put(params, sharding.replicated(mesh))
    backbone_def, self.backbone_state, backbone_sharding = sharding.place_frozen(
        towers.backbone, mesh, cfg.mesh.backbone_sharding)
    self.builder = steps.StepBuilder(self.model, backbone_def, mesh=mesh,
                                     backbone_sharding=backbone_sharding)
    self.step = self.builder.eval_step()

  def maps(self, images: np.ndarray, category_index: np.ndarray, text_table) -> tuple:
    """Local numpy batch -> (maps [B, H, W], scores [B]) for this process's rows."""
    batch = sharding.global_batch({"image": images, "category_index": category_index},
                                  self.mesh)
    amap, score = self.step(self.params, self.backbone_state, text_table,
                            batch["image"], batch["category_index"])
    return sharding.local_rows(amap, 0), sharding.local_rows(score, 0)

  def text_table(self, names: list[str]):
    return jax.device_put(jnp.asarray(self.towers.text_embed(names)),
                          sharding.replicated(self.mesh))


  def threshold_model(self) -> dict:
    """The model a decision threshold belongs to (`thresholds.threshold_model`):
    this head on these towers, at this size."""
    return loading.threshold_model(self.towers, self.model, self.params,
                                   self.reference_quirks)


class ModeScorer(Protocol):
  """What `evaluate.Evaluator` asks of a scoring mode, implemented by
  `ZeroShotScorer` (the trained head) and `scoring_modes.NeighbourScorer`
  (few_shot, batch and the combined modes). One pass of `rows` per data set
  feeds the metrics and the heatmap panels; the rest names and identifies
  what was scored."""

  scoring: str      # the mode (adjax.modes.SCORINGS)
  model: Any        # the ADModel scored with (image size, layers, image-score rule)
  towers: Any       # the towers, for the results' identity

  def adjust_identity(self, ident: dict) -> dict:
    """The results identity of this mode, from the run's."""

  def check(self, handle) -> None:
    """Raises (one line) when `handle` cannot be scored in this mode."""

  def extra_identity(self, handle) -> dict:
    """What the identity adds for `handle` (e.g. the reference images)."""

  def display_name(self, handle) -> str:
    """The results' file stem for `handle` (before any @digest)."""

  def progress_label(self, handle) -> str:
    """The progress line's label while `handle` is scored."""

  def rows(self, handle, to_draw: set, progress) -> Iterator[tuple[dict, list]]:
    """Yields (rows, draws): every process's rows (map, score, mask, label,
    valid, has_mask, category_index, index) and this process's panels
    (category, path, image, map, mask) of the examples in `to_draw`."""

  def finish(self) -> None:
    """After the pass over a data set."""

  def title(self, handle) -> str:
    """The report's title."""

  def announce(self, handle, stem: str, results: dict, table_text: str) -> None:
    """Prints the data set's results."""

  def threshold_model(self) -> dict:
    """The `model` a thresholds record of this mode is made for."""

  def threshold_image_score(self) -> str:
    """The image-score rule recorded with the thresholds."""

  def threshold_banks(self, handle) -> dict[str, dict]:
    """Per category, the identity of its few-shot bank (empty without one)."""


class ZeroShotScorer:
  """Zero-shot scoring: a data set's rows from the trained head (it holds a
  `Scorer`), one pass over the data set through the evaluation feature cache.

  A `ModeScorer`, as `scoring_modes.NeighbourScorer` is.
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
                          datasets.as_str(local["path"][i]), local["image"][i], amap[i],
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
    cache = feature_cache.open_cache("disk", feature_cache.evaluation_dir(cfg), self.towers.backbone_id, self.model,
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
