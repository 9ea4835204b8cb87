"""Exact ranking metrics from one descending sweep over sorted scores.

Every metric here is a function of, for each distinct threshold `t`, the
number of positives with score >= t (TP), the number of negatives with
score >= t (FP) and, for AUPRO, the sum over positives with score >= t of
`1 / size(region of the pixel)`: summed over the ground-truth regions, the
covered fraction of each region is exactly that sum, so the mean per-region
overlap (PRO) at `t` is it divided by the number of regions. This is the
MVTec AD definition with its exact tie handling: all pixels of equal score
enter together.

Only the distinct *positive* scores need visiting. Between two of them TP
and PRO are constant and FP only grows, so:
- AP (scikit-learn's sum of (R_n - R_{n-1}) P_n) only gains terms where TP
  changes, i.e. at positive scores;
- F1 = 2 TP / (TP + FP + P) is largest at the top of each constant-TP run,
  i.e. at a positive score;
- AUROC is the Mann-Whitney count: each positive scores above `#neg < s` and
  ties half of `#neg == s` negatives;
- the PRO curve between positive scores p' > p is horizontal from
  (#neg >= p') to (#neg > p) and then rises to (#neg >= p, PRO(p)): two
  points per positive score give the same trapezoid area and the same
  interpolated value at the FPR limit as the curve with every threshold.

Negatives are a sorted array and are only looked up with `searchsorted`, so
the sweep needs memory in proportion to the block of positive scores it is
fed, not to the number of pixels.
"""

from __future__ import annotations

import numpy as np

_SIGN = np.uint32(0x80000000)


def float32_keys(values: np.ndarray) -> np.ndarray:
  """Order-preserving uint32 keys of float32 values.

  `-0.0` must have been turned into `+0.0` first (adding 0 does it): the
  keys of the two zeros differ although the values compare equal.
  """
  bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
  # Negative floats: flip every bit (larger magnitude sorts lower);
  # non-negative floats: set the sign bit (so they sort above negatives).
  flip = (np.uint32(0) - (bits >> np.uint32(31))) | _SIGN
  return bits ^ flip


def keys_to_float32(keys: np.ndarray) -> np.ndarray:
  """Inverse of `float32_keys`."""
  keys = np.asarray(keys, dtype=np.uint32)
  flip = ((keys >> np.uint32(31)) - np.uint32(1)) | _SIGN
  return (keys ^ flip).view(np.float32)


# With no observed score on one side, a threshold lies this far (relative) beyond
# the last one: far more than rounding moves a float32 or bfloat16 score.
OPEN_SIDE_MARGIN = 2.0 ** -10


def separating(lo: float | None, hi: float | None) -> float:
  """A float32 threshold strictly between observed scores `lo` < `hi` (their
  float32 midpoint), so `score >= threshold` calls `hi` positive and `lo`
  negative even when another path computes them a few ulps off. When no
  float32 lies strictly between (adjacent values), `hi`. With `lo` None
  (nothing below) `hi` less `OPEN_SIDE_MARGIN` of its magnitude; with `hi`
  None (nothing above) `lo` plus it."""
  def margin(x: float) -> float:
    return max(abs(x) * OPEN_SIDE_MARGIN, 1e-30)
  if lo is None and hi is None:
    raise ValueError("separating needs at least one observed score")
  if lo is None:
    return float(np.float32(hi - margin(hi)))
  if hi is None:
    return float(np.float32(lo + margin(lo)))
  if not lo < hi:
    raise ValueError(f"separating: expected lo < hi, got {lo!r}, {hi!r}")
  mid = np.float32((np.float64(lo) + np.float64(hi)) / 2.0)
  return float(mid) if lo < float(mid) < hi else float(np.float32(hi))


def floor_to_dtype(thresholds: np.ndarray, dtype) -> np.ndarray:
  """Largest value of `dtype` <= each threshold (so `x > t` keeps its meaning)."""
  t = np.asarray(thresholds, dtype=np.float64)
  r = t.astype(dtype)
  above = r.astype(np.float64) > t
  r[above] = np.nextafter(r[above], np.array(-np.inf, r.dtype))
  return r


def zsad_thresholds(lo: float, hi: float, steps: int = 200) -> np.ndarray | None:
  """The ZSAD-papers' thresholds: `np.arange(min, max, (max - min) / steps)`."""
  if not hi > lo:
    return None
  return np.arange(lo, hi, (hi - lo) / steps, dtype=np.float64)


class RankingSweep:
  """Accumulates the metrics over distinct positive scores, highest first.

  Args:
    negatives: all negative scores, sorted ascending (any float dtype; the
      positive scores fed must have the same dtype).
    n_pos: total number of positives (known up front: AP and F1 need it).
    n_regions: number of ground-truth regions (0: no AUPRO).
    fpr_limit: AUPRO integration limit.
    zsad: thresholds of the ZSAD-papers' AUPRO variant (ascending float64),
      or None to skip it.
  """

  def __init__(self, negatives: np.ndarray, n_pos: int, n_regions: int = 0,
               fpr_limit: float = 0.3, zsad: np.ndarray | None = None,
               curve_points: int = 0):
    self._curve_points = int(curve_points)
    self._curve: list[np.ndarray] = []
    self._f1_threshold = None
    self._f1_counts = (0, 0)  # (TP, FP) at the F1-max threshold
    self._neg = negatives
    self._n_neg = int(negatives.shape[0])
    self._n_pos = int(n_pos)
    self._n_regions = int(n_regions)
    self._limit = float(fpr_limit)
    self._tp = 0
    self._w = 0.0
    self._rank_sum = 0  # Python int: exact for any size.
    self._ap = 0.0
    self._f1 = 0.0
    # Last PRO-curve point and the area so far; the curve starts at (0, 0).
    self._x = 0.0
    self._y = 0.0
    self._area = 0.0
    self._pro_done = self._n_neg == 0 or self._n_regions == 0
    self._zsad = zsad
    if zsad is not None:
      # Thresholds rounded down into the score dtype: `score > t` keeps its
      # meaning, and searchsorted never upcasts the big negatives array.
      self._zsad_floor = floor_to_dtype(zsad, negatives.dtype)
      # Sum of region weights of positives scoring > each threshold.
      self._zsad_w = np.zeros(zsad.shape, np.float64)

  def feed(self, values: np.ndarray, counts: np.ndarray,
           weights: np.ndarray | None = None) -> None:
    """Adds one block of distinct positive scores.

    Args:
      values: distinct positive scores in descending order, all below every
        score of earlier blocks.
      counts: number of positives at each score (int64).
      weights: per score, the sum of 1 / region size over its pixels
        (float64); needed when `n_regions` > 0.
    """
    if values.size == 0:
      return
    lo = np.searchsorted(self._neg, values, side="left")
    hi = np.searchsorted(self._neg, values, side="right")
    self._rank_sum += int(np.dot(counts, lo + hi))
    ge = self._n_neg - lo  # negatives >= score
    tp = self._tp + np.cumsum(counts)
    # Precision and recall at each distinct positive score, as scikit-learn.
    self._ap += float(np.sum(counts * (tp / (tp + ge)))) / self._n_pos
    f1 = 2.0 * tp / (tp + ge + self._n_pos)
    best = int(np.argmax(f1))
    if self._f1_threshold is None or f1[best] > self._f1:
      # Predicting "anomalous" for scores >= this value reaches F1-max; ties
      # go to the highest such value (argmax takes the first, and a later,
      # lower block must be strictly better).
      self._f1, self._f1_threshold = float(f1[best]), float(values[best])
      self._f1_counts = (int(tp[best]), int(ge[best]))
    if self._curve_points:
      # (threshold, FPR, recall, precision) at up to curve_points scores per block.
      pick = np.unique(np.linspace(0, values.shape[0] - 1,
                                   min(values.shape[0], self._curve_points)).astype(int))
      self._curve.append(np.stack([values[pick].astype(np.float64),
                                   ge[pick] / max(self._n_neg, 1), tp[pick] / self._n_pos,
                                   tp[pick] / (tp[pick] + ge[pick])], axis=1))
    self._tp = int(tp[-1])
    if self._n_regions:
      cum_w = self._w + np.cumsum(weights)
      if not self._pro_done:
        self._pro_block(self._n_neg - hi, ge, cum_w / self._n_regions)
      if self._zsad is not None:
        self._zsad_block(values, cum_w)
      self._w = float(cum_w[-1])

  def f1_point(self) -> tuple[float, float, float, float] | None:
    """(threshold, F1, precision, recall) at F1-max so far; None before any
    positive score. Scores >= threshold are called positive: the threshold
    lies strictly between the lowest score called positive and the highest
    score below it (`separating`), so it decides every score seen as F1-max
    does, and a score off by a rounding step still falls on its side."""
    if self._f1_threshold is None:
      return None
    tp, ge = self._f1_counts
    return (self.f1_separating(), self._f1, tp / (tp + ge), tp / self._n_pos)

  def f1_separating(self) -> float | None:
    """The F1-max threshold between the two observed scores it separates: the
    F1-max score and the highest score below it, always a negative one (a
    positive with no negative between would raise TP at no cost, so F1 would
    not be at its maximum)."""
    if self._f1_threshold is None:
      return None
    t = self._f1_threshold
    lo = int(np.searchsorted(self._neg, np.asarray(t, self._neg.dtype), side="left"))
    return separating(float(self._neg[lo - 1]) if lo > 0 else None, t)

  def _pro_block(self, gt: np.ndarray, ge: np.ndarray, pro: np.ndarray) -> None:
    m = gt.shape[0]
    x = np.empty(2 * m + 1)
    y = np.empty(2 * m + 1)
    x[0], y[0] = self._x, self._y
    x[1::2] = gt / self._n_neg
    x[2::2] = ge / self._n_neg
    y[1], y[3::2] = self._y, pro[:-1]
    y[2::2] = pro
    self._trapezoid(x, y)

  def _trapezoid(self, x: np.ndarray, y: np.ndarray) -> None:
    """Adds the area under (x, y), stopping at the FPR limit (MVTec rule)."""
    inside = int(np.searchsorted(x, self._limit, side="right"))
    xi, yi = x[:inside], y[:inside]
    self._area += float(np.sum((xi[1:] - xi[:-1]) * (yi[1:] + yi[:-1]))) / 2
    if inside == x.shape[0]:
      self._x, self._y = float(x[-1]), float(y[-1])
      return
    # The limit falls between two points: interpolate the curve there.
    x0, y0, x1, y1 = x[inside - 1], y[inside - 1], x[inside], y[inside]
    y_lim = y0 + (y1 - y0) * (self._limit - x0) / (x1 - x0)
    self._area += 0.5 * (y_lim + y0) * (self._limit - x0)
    self._pro_done = True

  def _zsad_block(self, values: np.ndarray, cum_w: np.ndarray) -> None:
    ascending = values[::-1]
    n_above = ascending.shape[0] - np.searchsorted(
        ascending, self._zsad_floor, side="right")
    hit = n_above > 0
    # Later blocks hold lower scores, so their cumulative sums are larger
    # and overwrite: the last block with a score above t has the full sum.
    self._zsad_w[hit] = cum_w[n_above[hit] - 1]

  def finish(self) -> dict[str, float | None]:
    """Returns auroc, ap, f1max, aupro and aupro_zsad (None where undefined);
    with positives also `f1_threshold` (scores >= it are called anomalous at
    F1-max) and, when `curve_points` was set, `curve`: rows (threshold, FPR,
    recall, precision) at decreasing thresholds, for ROC and PR plots."""
    if self._tp != self._n_pos:
      raise AssertionError(f"fed {self._tp} positives, expected {self._n_pos}")
    out: dict[str, float | None] = dict(
        auroc=None, ap=None, f1max=None, aupro=None, aupro_zsad=None)
    if self._n_pos:
      out["ap"] = _unit(self._ap)
      out["f1max"] = _unit(self._f1)
      if self._n_neg:
        out["auroc"] = _unit(self._rank_sum / (2 * self._n_pos * self._n_neg))
    if self._n_pos:
      out["f1_threshold"] = self.f1_separating()
    if self._curve_points:
      out["curve"] = (np.concatenate(self._curve) if self._curve
                      else np.zeros((0, 4)))
    if self._n_regions and self._n_neg:
      if not self._pro_done:
        # Lowest threshold: every pixel is above it.
        self._trapezoid(np.array([self._x, 1.0]), np.array([self._y, self._y]))
      out["aupro"] = _unit(self._area / self._limit)
      if self._zsad is not None:
        out["aupro_zsad"] = self._finish_zsad()
    return out

  def _finish_zsad(self) -> float | None:
    n_gt = self._n_neg - np.searchsorted(self._neg, self._zsad_floor, side="right")
    fpr = n_gt / self._n_neg
    pro = self._zsad_w / self._n_regions
    keep = fpr < self._limit
    fpr, pro = fpr[keep], pro[keep]
    if fpr.shape[0] < 2 or not fpr.max() > fpr.min():
      return None
    fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    # Thresholds ascend, so the FPR descends: the area comes out negative.
    return _unit(-float(np.sum((fpr[1:] - fpr[:-1]) * (pro[1:] + pro[:-1]))) / 2)


def _unit(v: float) -> float:
  """Clamps rounding noise (1 + 1e-16) back into [0, 1]."""
  return min(max(float(v), 0.0), 1.0)


def distinct_descending(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Distinct values of a small score array, descending, with their counts."""
  values, counts = np.unique(scores, return_counts=True)
  return values[::-1], counts[::-1].astype(np.int64)
