"""Decision thresholds for deployment: choose them, record them, check them.

Pure functions over scores, labels, maps and masks (numpy only):
- `f1_optimal(scores, labels)`: the threshold that maximises F1 when
  `score >= threshold` is called anomalous, with its precision and recall;
- `PixelF1Sweep`: the same for pixels, fed batch by batch (maps and masks
  are never held all at once); exact below `max_exact` distinct values, then
  on a fine fixed grid (the returned F1 is the F1 of the returned threshold);
- `quantile_threshold(normal_scores, q)`: from normal images only (no
  anomalous examples), e.g. q=0.99 flags about 1% of normal images.

A threshold only means something for the model, the image-score mode and the
checkpoint it was computed with. `thresholds.json` records those beside the
numbers (`write` / `read`), and `check` refuses a file made for another
model or mode with a message that says which field differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np

from adjax.common import atomic
from adjax.common.errors import UserError
from adjax.workdir import THRESHOLDS_FILE, Workdir

FORMAT_VERSION = 1


class ThresholdError(UserError, ValueError):
  """A threshold file is missing fields or was made for another model or mode."""


# ------------------------------------------------------------- choosing

@dataclasses.dataclass(frozen=True)
class F1Threshold:
  threshold: float      # anomalous when value >= threshold
  f1: float
  precision: float
  recall: float


def _f1_from_counts(values_desc, tp, fp, n_pos) -> F1Threshold:
  """Best threshold among `values_desc` (descending, distinct) with cumulative counts."""
  precision = tp / np.maximum(tp + fp, 1)
  recall = tp / n_pos
  denom = precision + recall
  f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
  i = int(np.argmax(f1))
  return F1Threshold(float(values_desc[i]), float(f1[i]), float(precision[i]),
                     float(recall[i]))


def f1_optimal(scores, labels) -> F1Threshold:
  """The threshold with the largest F1 of `score >= threshold` (label 1 = anomalous).

  Ties go to the highest such threshold (fewest alarms).
  """
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(labels).ravel().astype(bool)
  if scores.shape != labels.shape:
    raise ValueError(f"{scores.size} scores but {labels.size} labels")
  if not labels.any():
    raise ValueError("F1 needs at least one anomalous example; use quantile_threshold "
                     "for normal-only data")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or infinity")
  values, inverse = np.unique(-scores, return_inverse=True)   # descending scores
  pos = np.bincount(inverse, weights=labels, minlength=values.size)
  tot = np.bincount(inverse, minlength=values.size)
  tp = np.cumsum(pos)
  return _f1_from_counts(-values, tp, np.cumsum(tot) - tp, labels.sum())


class PixelF1Sweep:
  """F1-optimal pixel threshold from batches of maps and masks.

  Keeps per-value counts of anomalous and normal pixels. Maps of float32
  probabilities have many distinct values; while there are at most
  `max_exact` of them the sweep is exact, after that values are binned on a
  grid of `bins` steps over [lo, hi] (maps are probabilities: [0, 1]) and
  each bin's threshold is its lower edge, so the result is the exact F1 of
  the threshold returned, at most one bin from the best.
  """

  def __init__(self, lo: float = 0.0, hi: float = 1.0, bins: int = 1 << 20,
               max_exact: int = 1 << 22):
    self.lo, self.hi, self.bins, self.max_exact = float(lo), float(hi), int(bins), max_exact
    self._exact: dict[str, np.ndarray] | None = {
        "values": np.zeros(0, np.float32), "pos": np.zeros(0, np.int64),
        "neg": np.zeros(0, np.int64)}
    self._hist: tuple[np.ndarray, np.ndarray] | None = None

  def update(self, maps, masks) -> None:
    maps = np.asarray(maps, np.float32).ravel()
    masks = np.asarray(masks).ravel() > 0.5
    if maps.shape != masks.shape:
      raise ValueError(f"maps have {maps.size} pixels, masks {masks.size}")
    if self._exact is not None:
      values, inverse = np.unique(np.concatenate([self._exact["values"], maps]),
                                  return_inverse=True)
      old = inverse[: self._exact["values"].size]
      new = inverse[self._exact["values"].size:]
      pos = np.bincount(new, weights=masks, minlength=values.size).astype(np.int64)
      neg = np.bincount(new, weights=~masks, minlength=values.size).astype(np.int64)
      pos[old] += self._exact["pos"]
      neg[old] += self._exact["neg"]
      self._exact = {"values": values, "pos": pos, "neg": neg}
      if values.size > self.max_exact:
        self._to_hist()
      return
    self._add_hist(maps, masks.astype(np.int64), (~masks).astype(np.int64))

  def _bin(self, values: np.ndarray) -> np.ndarray:
    scaled = (values.astype(np.float64) - self.lo) / (self.hi - self.lo) * self.bins
    return np.clip(np.floor(scaled), 0, self.bins - 1).astype(np.int64)

  def _add_hist(self, values, pos, neg) -> None:
    if self._hist is None:
      self._hist = (np.zeros(self.bins, np.int64), np.zeros(self.bins, np.int64))
    b = self._bin(values)
    self._hist[0][:] += np.bincount(b, weights=pos, minlength=self.bins).astype(np.int64)
    self._hist[1][:] += np.bincount(b, weights=neg, minlength=self.bins).astype(np.int64)

  def _to_hist(self) -> None:
    e, self._exact = self._exact, None
    self._add_hist(e["values"], e["pos"], e["neg"])

  def result(self) -> F1Threshold:
    if self._exact is not None:
      values, pos, neg = (self._exact[k][::-1] for k in ("values", "pos", "neg"))
    else:
      pos, neg = self._hist[0][::-1], self._hist[1][::-1]
      edges = self.lo + (self.hi - self.lo) * np.arange(self.bins) / self.bins
      values = edges[::-1]
      keep = (pos + neg) > 0
      values, pos, neg = values[keep], pos[keep], neg[keep]
    n_pos = int(pos.sum())
    if n_pos == 0:
      raise ValueError("F1 needs at least one anomalous pixel")
    return _f1_from_counts(values, np.cumsum(pos), np.cumsum(neg), n_pos)


def quantile_threshold(normal_scores, q: float = 0.99) -> float:
  """The q-quantile of scores from normal images only (a false-alarm budget of 1 - q).

  Uses the empirical quantile that never interpolates upwards past an
  observed value ("higher"), so at most a fraction 1 - q of these normal
  scores lie strictly above the threshold.
  """
  scores = np.asarray(normal_scores, np.float64).ravel()
  if scores.size == 0:
    raise ValueError("quantile_threshold needs at least one normal score")
  if not 0.0 < q <= 1.0:
    raise ValueError(f"q={q}: expected 0 < q <= 1")
  return float(np.quantile(scores, q, method="higher"))


# ------------------------------------------------------------- identity

def params_sha256(params) -> str:
  """A stable hash of a parameter pytree (paths, shapes, dtypes and bytes)."""
  import jax
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def model_identity(*, backbone_id: str, text_id: str, layers, image_size: int,
                   reference_quirks: bool, head_sha256: str) -> dict[str, Any]:
  """What must be equal for a threshold to carry over from one run to another."""
  return {"backbone": str(backbone_id), "text": str(text_id),
          "layers": [int(l) for l in layers], "image_size": int(image_size),
          "reference_quirks": bool(reference_quirks), "head_sha256": str(head_sha256)}


# ------------------------------------------------------------- the file

def write(path: str | Path, *, dataset: str, image_score: str, checkpoint_step: int,
          model: Mapping[str, Any], image: float | None = None, pixel: float | None = None,
          method: str = "f1", details: Mapping[str, Any] | None = None) -> Path:
  """Writes `thresholds.json` atomically (a workdir gets its deployment
  thresholds, `Workdir.thresholds`)."""
  path = Path(path)
  if path.is_dir():
    path = Workdir(path).thresholds
  if image is None and pixel is None:
    raise ValueError("nothing to write: give an image and/or a pixel threshold")
  record = {"format_version": FORMAT_VERSION, "dataset": str(dataset),
            "image_score": str(image_score), "checkpoint_step": int(checkpoint_step),
            "model": dict(model), "method": method,
            "image_threshold": None if image is None else float(image),
            "pixel_threshold": None if pixel is None else float(pixel),
            "details": dict(details or {})}
  atomic.write_text(path, json.dumps(record, indent=2, sort_keys=True))
  return path


_REQUIRED = ("format_version", "dataset", "image_score", "checkpoint_step", "model",
             "image_threshold", "pixel_threshold")


def read(path: str | Path) -> dict[str, Any]:
  path = Path(path)
  if path.is_dir():
    path = Workdir(path).thresholds
  try:
    record = json.loads(path.read_text())
  except FileNotFoundError:
    raise ThresholdError(f"{path}: no such file") from None
  except json.JSONDecodeError as e:
    raise ThresholdError(f"{path}: not valid JSON ({e})") from None
  missing = [k for k in _REQUIRED if k not in record]
  if missing:
    raise ThresholdError(f"{path}: missing fields {missing}")
  if record["format_version"] != FORMAT_VERSION:
    raise ThresholdError(f"{path}: format_version {record['format_version']}, expected "
                         f"{FORMAT_VERSION}")
  record["_path"] = str(path)
  return record


def deployment_path(workdir: str | Path, init_from: str | Path | None = None) -> Path | None:
  """The deployment thresholds a run decides with: `<workdir>/thresholds.json`,
  else (a run started with `init_from`) the trained run's own; None when
  neither exists. The caller `check`s it against the model as any other."""
  for d in (workdir, init_from):
    if d and Workdir(d).thresholds.is_file():
      return Workdir(d).thresholds
  return None


class Resolved(NamedTuple):
  """The thresholds one object is decided with, and where the image one comes from."""
  image: float | None
  pixel: float | None
  source: str         # "category:<data set>/<name>", "top-level", "predict.threshold", "none"


def resolve(record: Mapping[str, Any] | None, object_name: str,
            cli_override: float | None = None) -> Resolved:
  """The one rule that turns a thresholds record into an object's thresholds.

  `predict`, `adjax.export` and any other decision path call this, so they
  decide alike. `record` is what `read` returns (already `check`ed), or
  None when there is no thresholds file.
  - A category the record's evaluation saw (`details.per_category[<data
    set>][object_name]`) has its own F1-max image and pixel thresholds; the
    first data set (in the record's order) that has a value wins, and a
    threshold of 0.0 is a threshold (only a missing one falls back).
  - Otherwise the record's top-level `image_threshold` / `pixel_threshold`.
  - `cli_override` (`predict.threshold`), when not None and >= 0, replaces
    the image threshold (the pixel one is kept).
  `source` names where the image threshold comes from: "category:<data
  set>/<name>", "top-level", "predict.threshold" or "none" (no image
  threshold: no decision).
  """
  image = pixel = None
  source = "none"
  if record is not None:
    image, pixel = record.get("image_threshold"), record.get("pixel_threshold")
    source = "top-level" if image is not None else "none"
    own_image = own_pixel = None
    for dataset, cats in (record.get("details") or {}).get("per_category", {}).items():
      own = (cats or {}).get(object_name) or {}
      if own_image is None and own.get("image") is not None:
        own_image = (float(own["image"]), f"category:{dataset}/{object_name}")
      if own_pixel is None and own.get("pixel") is not None:
        own_pixel = float(own["pixel"])
    if own_image is not None:
      image, source = own_image
    if own_pixel is not None:
      pixel = own_pixel
  if cli_override is not None and cli_override >= 0:
    image, source = float(cli_override), "predict.threshold"
  return Resolved(None if image is None else float(image),
                  None if pixel is None else float(pixel), source)


def check(record: Mapping[str, Any], *, image_score: str, model: Mapping[str, Any],
          checkpoint_step: int | None = None) -> None:
  """Refuses thresholds made for another model, image-score mode or checkpoint."""
  where = record.get("_path", THRESHOLDS_FILE)
  if record["image_score"] != image_score:
    raise ThresholdError(
        f"{where}: its thresholds were chosen for eval.image_score={record['image_score']!r}"
        f", this model scores images with {image_score!r}; scores of different modes are "
        "not comparable: choose thresholds again for this mode")
  stored = record["model"]
  differ = sorted(k for k in set(stored) | set(model) if stored.get(k) != model.get(k))
  if differ:
    detail = "; ".join(f"{k}: file {stored.get(k)!r}, model {model.get(k)!r}" for k in differ)
    raise ThresholdError(f"{where}: made for another model ({detail}); choose thresholds "
                         "again for this one")
  if checkpoint_step is not None and record["checkpoint_step"] != checkpoint_step:
    raise ThresholdError(f"{where}: made at checkpoint step {record['checkpoint_step']}, "
                         f"this head is step {checkpoint_step}")
