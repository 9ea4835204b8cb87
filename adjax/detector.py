"""`Detector`: the Python API over a trained (or imported) workdir.

    from adjax import Detector
    det = Detector.from_workdir("runs/demo")
    pred = det.predict(["a.png", "b.png"], object_name="tile")
    pred.scores, pred.maps[0].shape, pred.decisions

It builds what `--config.mode=predict` builds (the config checks, the towers,
the head of the latest checkpoint with its identity check, the compiled eval
step of `adjax.scorer.Scorer`, the checked `thresholds.json`) once, and then
scores any number of images: paths, folders, globs, PIL images and uint8
arrays, of any size. Images are preprocessed as the prediction reader does
(`adjax.data.images`), batched at `predict.batch_size` (the last batch padded,
so the step compiles once), and each map is resized to its image's own size.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from adjax.errors import UserError

# Scoring modes `Detector.predict` supports (the page's mode selector lists them).
SCORING_MODES = ("zero_shot",)


class DetectorError(UserError, ValueError):
  """Unusable input to the Detector (the message names it)."""


def map_at(amap: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """A model-size map [S, S] -> float32 [H, W]: PIL bilinear resize to (H, W)."""
  img = Image.fromarray(np.asarray(amap, np.float32), mode="F")
  return np.asarray(img.resize((hw[1], hw[0]), Image.BILINEAR), np.float32)


def _resolve_threshold(record: dict | None, object_name: str
                       ) -> tuple[float | None, float | None, str]:
  """(image threshold, pixel threshold, source) for one object name.

  `record` is a checked `thresholds.json` (or None: no thresholds). A category
  an evaluation saw under this name has its own F1-max thresholds in
  `details.per_category[<data set>][<name>]` (the last data set listing it
  wins, as in predict); each of its two values is used when present (0.0 is
  a threshold), else the file's top-level value. The source names the file,
  its method and, for a per-category value, the data set and category.
  """
  if record is None:
    return None, None, "none"
  image, pixel = record["image_threshold"], record["pixel_threshold"]
  where = f"{record.get('_path', 'thresholds.json')} ({record.get('method', '?')})"
  own_from = None
  for dataset, cats in record.get("details", {}).get("per_category", {}).items():
    own = cats.get(object_name, {})
    if own.get("image") is not None or own.get("pixel") is not None:
      own_from = dataset
    image = own["image"] if own.get("image") is not None else image
    pixel = own["pixel"] if own.get("pixel") is not None else pixel
  if own_from is not None:
    where += f" per category {own_from}/{object_name}"
  return image, pixel, where


@dataclasses.dataclass
class Prediction:
  """What `Detector.predict` returns, one entry per readable image, in input order.

  scores: float32 [N] image scores. maps: float32 [H, W] per image, at that
  image's own size. masks: bool [H, W] per image (map >= pixel threshold),
  None without a pixel threshold. decisions: bool [N] (score >= image
  threshold), None without an image threshold. thresholds: (image, pixel)
  per image; threshold_source: where they come from, per image. paths: the
  file of each image (None for an in-memory image). unreadable: (path,
  reason) for listed files that could not be decoded.
  """
  scores: np.ndarray
  maps: list
  masks: list | None
  decisions: np.ndarray | None
  thresholds: list
  threshold_source: list
  paths: list
  object_names: list
  unreadable: list = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return len(self.scores)


def _override_strings(overrides: dict[str, Any]) -> list[str]:
  """`predict__batch_size=4` or `**{"predict.batch_size": 4}` -> "predict.batch_size=4"."""
  return [f"{key.replace('__', '.')}={value!r}" if not isinstance(value, str)
          else f"{key.replace('__', '.')}={value}" for key, value in overrides.items()]


class Detector:
  """A trained head on its towers, ready to score images (see the module doc)."""

  scoring_modes = SCORING_MODES

  def __init__(self, cfg, workdir: Path, towers, mesh, params, step: int | None = None):
    from adjax import thresholds
    from adjax.scorer import Scorer
    self.cfg, self.workdir, self.step = cfg, Path(workdir), step
    self.scorer = Scorer(cfg, towers, mesh, params)
    self.image_size = int(self.scorer.model.image_size)
    self.batch_size = int(cfg.predict.batch_size)
    self._tables: dict[tuple[str, ...], Any] = {}
    self.record = None
    path = self.workdir / thresholds.FILE_NAME
    if path.exists():
      self.record = thresholds.read(path)
      thresholds.check(self.record, image_score=self.scorer.model.image_score,
                       model=self.scorer.threshold_identity())
    self._pending: dict | None = None   # calibrated, not yet saved

  # ---------------------------------------------------------------- building

  @classmethod
  def from_workdir(cls, path: str | os.PathLike, **overrides) -> "Detector":
    """The head of a trained or imported workdir, with its `config.json`.

    `overrides` are config fields, dotted or with `__` for the dots:
    `Detector.from_workdir(w, predict__batch_size=4)`. The config, the head's
    identity (`identity.check_model`) and `thresholds.json` are checked as
    `--config.mode=predict` checks them.
    """
    from adjax import run_config
    workdir = Path(path)
    cfg = run_config.from_workdir(workdir, _override_strings(overrides))
    if not cfg.workdir:
      cfg.workdir = str(workdir)
    return cls.from_config(cfg, workdir)

  @classmethod
  def from_config(cls, cfg, workdir: str | os.PathLike | None = None) -> "Detector":
    """A Detector from a resolved run config (its `workdir` or `init_from` holds the head)."""
    import jax

    from adjax import config_check, experiment, sharding
    from adjax import towers as towers_lib
    cfg = cfg.copy_and_resolve_references() if hasattr(
        cfg, "copy_and_resolve_references") else cfg
    cfg.mode = "predict"
    workdir = Path(workdir) if workdir is not None else experiment.resolve_workdir(cfg, None)
    # mode=predict's checks; the images come per call, not from predict.input.
    checked = cfg.copy_and_resolve_references()
    checked.predict.input = checked.predict.input or "<images given to predict()>"
    config_check.check(checked, device_count=jax.device_count(),
                       process_count=jax.process_count())
    if jax.process_count() > 1:
      raise DetectorError("the Detector runs on one process; start it without "
                          "distributed=True")
    if not cfg.init_from and not experiment._has_checkpoints(workdir):  # pylint: disable=protected-access
      raise config_check.ConfigError(
          f"{workdir} holds no trained checkpoint; pass a trained or imported workdir "
          "(or set init_from to one)")
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model)
    towers = towers_lib.build(cfg, workdir)
    params, _, step = experiment.trained_params(cfg, workdir, towers, mesh)
    return cls(cfg, workdir, towers, mesh, params, step)

  # ---------------------------------------------------------------- inputs

  def _items(self, images) -> tuple[list, list]:
    """Flattens `images` into [(path or None, PIL image or None)] and unreadable files."""
    from adjax import data
    items, unreadable = [], []

    def add(x):
      if isinstance(x, (str, os.PathLike)):
        paths, bad = data.read_image_folder(x)
        items.extend((p, None) for p in paths)
        unreadable.extend(bad)
      elif isinstance(x, Image.Image):
        items.append((None, x))
      elif isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or x.shape[-1] != 3:
          raise DetectorError(f"an image array must be uint8 [H, W, 3] or [N, H, W, 3]; "
                              f"got {x.dtype} {list(x.shape)}")
        for a in (x if x.ndim == 4 else x[None]):
          items.append((None, Image.fromarray(a, "RGB")))
      elif isinstance(x, (list, tuple)):
        for y in x:
          if isinstance(y, (list, tuple)):
            raise DetectorError("images: a list of paths, PIL images or arrays (not nested)")
          add(y)
      else:
        raise DetectorError(f"images: expected a path, folder, PIL image, uint8 array or a "
                            f"list of these; got {type(x).__name__}")

    add(images)
    if not items:
      raise DetectorError("no readable images given" + (
          f" ({len(unreadable)} unreadable: {unreadable[0][0]}: {unreadable[0][1]})"
          if unreadable else ""))
    return items, unreadable

  def _load(self, item) -> tuple[np.ndarray, tuple[int, int], str]:
    """(uint8 [S, S, 3], (H, W), error): exactly the prediction reader's preprocessing."""
    from adjax.data import images as data_images
    path, img = item
    if path is not None:
      loaded = data_images.load_for_prediction(path, self.image_size)
      h, w = (int(v) for v in loaded["orig_size"])
      return loaded["image"], (h, w), loaded["error"]
    w, h = img.size
    return data_images.preprocess_image(img, self.image_size), (h, w), ""

  def _table(self, names: tuple[str, ...]):
    if names not in self._tables:
      self._tables[names] = self.scorer.text_table(list(names))
    return self._tables[names]

  def _raw(self, items, names: list[str]):
    """Yields (item index, model-size map, score, (H, W)) batch by batch."""
    distinct = tuple(sorted(set(names)))
    table = self._table(distinct)
    index = np.array([distinct.index(n) for n in names], np.int32)
    b, s = self.batch_size, self.image_size
    for start in range(0, len(items), b):
      chunk = list(range(start, min(start + b, len(items))))
      batch = np.zeros((b, s, s, 3), np.uint8)     # padded: one compiled shape
      cats = np.zeros(b, np.int32)
      loaded = []
      for j, i in enumerate(chunk):
        batch[j], hw, error = self._load(items[i])
        cats[j] = index[i]
        loaded.append((hw, error))
      amap, score = self.scorer.maps(batch, cats, table)
      amap, score = np.asarray(amap), np.asarray(score)
      for j, i in enumerate(chunk):
        yield i, amap[j], float(score[j]), loaded[j][0], loaded[j][1]

  def _names(self, n: int, object_name, object_names) -> list[str]:
    if object_names is not None:
      names = [str(x) for x in object_names]
      if object_name is not None:
        raise DetectorError("give object_name or object_names, not both")
      if len(names) != n:
        raise DetectorError(f"object_names has {len(names)} names for {n} images")
    else:
      name = self.cfg.predict.object_name if object_name is None else str(object_name)
      names = [name] * n
    if any(not x.strip() for x in names):
      raise DetectorError("object name is empty: name the object in the images "
                          "(e.g. object_name='bottle')")
    return names

  # ---------------------------------------------------------------- API

  def thresholds_for(self, object_name: str) -> tuple[float | None, float | None, str]:
    """(image threshold, pixel threshold, source) used for `object_name`.

    `predict.threshold >= 0` overrides the image threshold, as in predict.
    """
    image, pixel, source = _resolve_threshold(self.record, object_name)
    if self.cfg.predict.threshold >= 0:
      image, source = float(self.cfg.predict.threshold), "predict.threshold"
    return image, pixel, source

  def predict(self, images, object_name: str | None = None,
              object_names: Sequence[str] | None = None,
              mode: str = "zero_shot") -> Prediction:
    """Scores `images` (see the module doc) for `object_name` (default:
    `predict.object_name`), or one name per image with `object_names`."""
    if mode not in SCORING_MODES:
      raise DetectorError(f"mode={mode!r}: expected one of {', '.join(SCORING_MODES)}")
    items, unreadable = self._items(images)
    names = self._names(len(items), object_name, object_names)
    scores, maps, paths, kept = [], [], [], []
    for i, amap, score, hw, error in self._raw(items, names):
      if error:                       # a file that changed since it was listed
        unreadable.append((items[i][0], error))
        continue
      scores.append(score)
      maps.append(map_at(amap, hw))
      paths.append(items[i][0])
      kept.append(names[i])
    limits = [self.thresholds_for(n) for n in kept]
    masks = decisions = None
    if limits and all(p is not None for _, p, _ in limits):
      masks = [m >= p for m, (_, p, _) in zip(maps, limits)]
    if limits and all(t is not None for t, _, _ in limits):
      decisions = np.array([s >= t for s, (t, _, _) in zip(scores, limits)], bool)
    return Prediction(
        scores=np.asarray(scores, np.float32), maps=maps, masks=masks, decisions=decisions,
        thresholds=[(t, p) for t, p, _ in limits],
        threshold_source=[src for _, _, src in limits], paths=paths, object_names=kept,
        unreadable=unreadable)

  def calibrate(self, normal_images, quantile: float = 0.99,
                object_name: str | None = None) -> tuple[float, float]:
    """Thresholds from normal images only (as `predict.calibrate_normals`): the
    `quantile` of their image scores and of their pixels' scores (at the model's
    size, as predict calibrates). They are used from now on by this Detector;
    `save_thresholds()` writes them to the workdir's thresholds.json."""
    from adjax import thresholds
    if not 0.0 < quantile <= 1.0:
      raise DetectorError(f"quantile={quantile!r}: expected a value in (0, 1]")
    items, unreadable = self._items(normal_images)
    names = self._names(len(items), object_name, None)
    scores, pixels = [], []
    for _, amap, score, _, error in self._raw(items, names):
      if not error:
        scores.append(score)
        pixels.append(amap.ravel())
    if not scores:
      raise DetectorError("calibrate: no readable normal images")
    image = thresholds.quantile_threshold(np.asarray(scores), quantile)
    pixel = thresholds.quantile_threshold(np.concatenate(pixels), quantile)
    if isinstance(normal_images, (str, os.PathLike)):
      dataset = f"normals:{os.fspath(normal_images)}"    # as predict.calibrate_normals
    else:
      dataset = f"normals:{len(scores)} images given to calibrate()"
    self._pending = dict(
        dataset=dataset,
        image_score=self.scorer.model.image_score, checkpoint_step=-1,
        model=self.scorer.threshold_identity(), image=image, pixel=pixel,
        method=f"normal-quantile {quantile}",
        details={"normal_images": len(scores), "unreadable": [p for p, _ in unreadable]})
    self.record = {"format_version": thresholds.FORMAT_VERSION,
                   "dataset": self._pending["dataset"], "image_score": self._pending[
                       "image_score"], "checkpoint_step": -1,
                   "model": self._pending["model"], "method": self._pending["method"],
                   "image_threshold": image, "pixel_threshold": pixel,
                   "details": self._pending["details"], "_path": "calibrated (not saved)"}
    return image, pixel

  def save_thresholds(self, path: str | os.PathLike | None = None) -> Path:
    """Writes the calibrated thresholds to thresholds.json (the workdir's by
    default), atomically, with the identity `check` verifies on later use."""
    from adjax import thresholds
    if self._pending is None:
      raise DetectorError("save_thresholds: nothing calibrated; call calibrate() first")
    written = thresholds.write(path or self.workdir, **self._pending)
    self.record = thresholds.read(written)
    self._pending = None
    return written

  @property
  def object_names(self) -> list[str]:
    """Object names with their own thresholds in thresholds.json (sorted)."""
    found = set()
    if self.record is not None:
      for cats in self.record.get("details", {}).get("per_category", {}).values():
        found.update(cats)
    return sorted(found)
