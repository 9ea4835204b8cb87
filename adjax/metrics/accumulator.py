"""Streaming per-category evaluation: batches in, exact metrics out.

`MetricAccumulator` takes the evaluation batches as they come (padding rows
of the last batch masked out by `valid`), keeps what the exact metrics need
in compact form, and computes everything at the end with one in-place sort
of the normal-pixel scores and one of the anomalous-pixel keys (see
`curves.py` for why that is enough). `compute` is the one-shot form.

What is kept per pixel: a normal pixel is its float32 score (4 bytes); an
anomalous pixel is one uint64 whose high half is the score's
order-preserving bit pattern and whose low half is the size of its
ground-truth region (8-connected, labelled per image with
`scipy.ndimage.label` as the batch arrives), so sorting the keys orders the
scores and carries each pixel's region weight along without an argsort.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage

from adjax.metrics import curves

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc",
               "pixel_ap", "pixel_f1max", "pixel_aupro")
ZSAD_KEY = "pixel_aupro_zsad"

# 8-connectivity inside each image and none across the batch axis, so one
# label() call numbers the regions of a whole batch.
_STRUCTURE = np.zeros((3, 3, 3), bool)
_STRUCTURE[1] = True
_LOW32 = np.uint64(0xFFFFFFFF)


class _Pages:
  """Append-only storage in fixed 64 MB pages.

  Large pages are returned to the OS when freed, so gathering them into one
  contiguous array (for the in-place sort) costs one page of extra memory,
  not a second copy of everything.
  """

  def __init__(self, dtype, page: int = 1 << 24):
    self._dtype = np.dtype(dtype)
    self._page = page
    self._pages: list[np.ndarray] = []
    self._fill = 0  # used length of the last page
    self.size = 0

  def append(self, values: np.ndarray) -> None:
    values = values.ravel()
    while values.size:
      if not self._pages or self._fill == self._pages[-1].size:
        # np.empty is committed lazily: an unused tail costs no memory.
        self._pages.append(np.empty(max(self._page, 0), self._dtype))
        self._fill = 0
      n = min(values.size, self._pages[-1].size - self._fill)
      self._pages[-1][self._fill:self._fill + n] = values[:n]
      self._fill += n
      self.size += n
      values = values[n:]

  def gather(self) -> np.ndarray:
    """Returns all values as one array, which then becomes the only page."""
    if len(self._pages) == 1 and self._fill == self._pages[0].size:
      return self._pages[0]
    out = np.empty(self.size, self._dtype)
    pos = 0
    pages, self._pages = self._pages, []
    for i, page in enumerate(pages):
      n = self._fill if i == len(pages) - 1 else page.size
      out[pos:pos + n] = page[:n]
      pos += n
      pages[i] = None  # free each page as soon as it is copied
    self._pages, self._fill = [out], out.size
    return out


# Points per sweep block kept for the ROC / PR plots of the reports.
CURVE_POINTS = 256


class MetricAccumulator:
  """Exact image- and pixel-level metrics of one category, fed in batches.

  `result()` equals `compute()` on the concatenation of all valid rows.
  Missing (undefined) metrics are `None`: image AUROC when all images have
  one label; image AP / F1-max without anomalous images; every pixel metric
  without anomalous pixels; pixel AUROC and AUPRO without normal pixels.

  Pixel scores are compared as float32 (maps are cast to float32); the
  metrics are exact for those values, ties included. Image scores are used
  in float64.

  Memory: 4 bytes per normal pixel plus 8 bytes per anomalous pixel plus
  9 bytes per image, held until `result()` (a VisA category at 512x512,
  ~100 M pixels, mostly normal: ~0.4 GB). `result()` sorts that storage in
  place and needs on top about one 64 MB storage page and O(`block_size`)
  working arrays (~40 bytes per entry); `update()` needs about 15 bytes per
  pixel of the batch it is given.

  Args:
    fpr_limit: AUPRO integration limit, in (0, 1].
    zsad_aupro: also report `pixel_aupro_zsad`, the variant of AnomalyCLIP
      and followers (see `compute`).
    zsad_steps: number of thresholds of that variant.
    block_size: anomalous pixels swept per block in `result()`.
  """

  def __init__(self, fpr_limit: float = 0.3, zsad_aupro: bool = False,
               zsad_steps: int = 200, block_size: int = 1 << 20):
    if not 0.0 < fpr_limit <= 1.0:
      raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    self.fpr_limit = float(fpr_limit)
    self.zsad_aupro = bool(zsad_aupro)
    self.zsad_steps = int(zsad_steps)
    self.block_size = int(block_size)
    self._image_scores: list[np.ndarray] = []
    self._image_labels: list[np.ndarray] = []
    self._num_images = 0
    self._has_maps: bool | None = None
    self._normal = _Pages(np.float32)
    self._anomalous = _Pages(np.uint64, page=1 << 23)
    self._num_regions = 0

  @property
  def num_images(self) -> int:
    return self._num_images

  def update(self, image_scores, image_labels, anomaly_maps=None, masks=None,
             valid=None) -> None:
    """Adds one batch.

    Args:
      image_scores: [B] image anomaly scores.
      image_labels: [B] 0 (normal) / 1 (anomalous), bool or integer.
      anomaly_maps: [B, H, W] pixel scores, or None for image metrics only
        (then for every batch).
      masks: [B, H, W] ground truth, 0/1 or bool; other values are
        binarised at 0.5 with a warning. None exactly when maps are None.
      valid: optional [B] bool, False for padding rows (ignored entirely).

    Raises:
      ValueError: on shape mismatches, labels other than 0/1, or NaN/inf
        in a score or map (naming the image's index in the category). The
        accumulator is unchanged when update() raises.
    """
    scores = np.asarray(image_scores)
    labels = np.asarray(image_labels)
    if scores.ndim != 1:
      raise ValueError(f"image_scores must have shape [B], got {scores.shape}")
    b = scores.shape[0]
    if labels.shape != (b,):
      raise ValueError(
          f"image_labels must have shape {(b,)} like image_scores, got {labels.shape}")
    if (anomaly_maps is None) != (masks is None):
      raise ValueError("anomaly_maps and masks must be given together")
    has_maps = anomaly_maps is not None
    if self._has_maps is not None and has_maps != self._has_maps:
      raise ValueError("anomaly_maps were given in some updates and not in others")
    if valid is None:
      rows = slice(None)
    else:
      valid = np.asarray(valid)
      if valid.shape != (b,) or valid.dtype != bool:
        raise ValueError(
            f"valid must be a bool array of shape {(b,)}, "
            f"got {valid.dtype} {valid.shape}")
      rows = valid
    scores = scores[rows].astype(np.float64)
    labels = _binary_labels(labels[rows], self._num_images)
    _check_finite(scores.reshape(-1, 1), "image score", self._num_images)
    if has_maps:
      maps, masks = _check_maps(np.asarray(anomaly_maps), np.asarray(masks), b)
    if has_maps and scores.size:
      maps = np.asarray(maps[rows], dtype=np.float32)
      _check_finite(maps.reshape(maps.shape[0], -1), "anomaly map",
                    self._num_images)
      gt = _binary_masks(masks[rows])
      regions, n_regions = ndimage.label(gt, structure=_STRUCTURE)
      region_of = regions[gt]
      del regions
      sizes = np.bincount(region_of, minlength=n_regions + 1).astype(np.uint64)
      pos = maps[gt]
      pos += np.float32(0)  # -0.0 -> +0.0, so equal scores get equal keys
      keys = curves.float32_keys(pos).astype(np.uint64) << np.uint64(32)
      keys |= sizes[region_of]
      self._normal.append(maps[~gt])
      self._anomalous.append(keys)
      self._num_regions += int(n_regions)
    self._has_maps = has_maps
    self._image_scores.append(scores)
    self._image_labels.append(labels)
    self._num_images += scores.shape[0]

  def result(self, details: bool = False) -> dict[str, float | None]:
    """Metrics over everything added so far (floats in [0, 1] or None).

    With `details`, also `image_threshold` / `pixel_threshold` (the score at
    which F1-max is reached: scores >= it are anomalous) and `image_curve` /
    `pixel_curve` (rows of threshold, FPR, recall, precision; see
    `curves.RankingSweep`), where defined.
    """
    out = dict.fromkeys(METRIC_KEYS)
    points = CURVE_POINTS if details else 0
    if self.zsad_aupro:
      out[ZSAD_KEY] = None
    if self._num_images:
      scores = np.concatenate(self._image_scores)
      labels = np.concatenate(self._image_labels)
      sweep = curves.RankingSweep(np.sort(scores[~labels]), int(labels.sum()),
                                  curve_points=points)
      sweep.feed(*curves.distinct_descending(scores[labels]))
      image = sweep.finish()
      out.update(image_auroc=image["auroc"], image_ap=image["ap"],
                 image_f1max=image["f1max"])
      if details:
        out.update(image_threshold=image.get("f1_threshold"), image_curve=image["curve"])
    if self._has_maps:
      pixel = self._pixel_metrics(points)
      out.update(pixel_auroc=pixel["auroc"], pixel_ap=pixel["ap"],
                 pixel_f1max=pixel["f1max"], pixel_aupro=pixel["aupro"])
      if self.zsad_aupro:
        out[ZSAD_KEY] = pixel["aupro_zsad"]
      if details:
        out.update(pixel_threshold=pixel.get("f1_threshold"), pixel_curve=pixel["curve"])
    return out

  def _pixel_metrics(self, curve_points: int = 0) -> dict[str, float | None]:
    normal = self._normal.gather()
    normal.sort()
    keys = self._anomalous.gather()
    keys.sort()
    zsad = None
    if self.zsad_aupro and keys.size:
      ends = curves.keys_to_float32(
          (keys[[0, -1]] >> np.uint64(32)).astype(np.uint32))
      lo, hi = float(ends[0]), float(ends[1])
      if normal.size:
        lo, hi = min(lo, float(normal[0])), max(hi, float(normal[-1]))
      zsad = curves.zsad_thresholds(lo, hi, self.zsad_steps)
    sweep = curves.RankingSweep(normal, keys.size, self._num_regions,
                                self.fpr_limit, zsad, curve_points=curve_points)
    for block in _blocks_descending(keys, self.block_size):
      sweep.feed(*block)
    return sweep.finish()


def _blocks_descending(keys: np.ndarray, block_size: int):
  """Yields (distinct scores, counts, region weights), highest scores first.

  Blocks hold about `block_size` keys and never split a group of equal
  scores (the sweep needs each distinct score once).
  """
  end = keys.size
  while end > 0:
    start = max(0, end - block_size)
    if start > 0:
      group = (keys[start] >> np.uint64(32)) << np.uint64(32)
      start = int(np.searchsorted(keys[:end], group, side="left"))
    block = keys[start:end]
    score_keys = (block >> np.uint64(32)).astype(np.uint32)
    firsts = np.flatnonzero(score_keys[1:] != score_keys[:-1]) + 1
    firsts = np.concatenate([[0], firsts])
    counts = np.diff(np.append(firsts, block.size)).astype(np.int64)
    weights = np.add.reduceat(1.0 / (block & _LOW32), firsts)
    values = curves.keys_to_float32(score_keys[firsts])
    yield values[::-1], counts[::-1], weights[::-1]
    end = start


def _check_maps(maps: np.ndarray, masks: np.ndarray, b: int):
  if maps.ndim != 3 or maps.shape[0] != b:
    raise ValueError(f"anomaly_maps must have shape [{b}, H, W], got {maps.shape}")
  if masks.shape != maps.shape:
    raise ValueError(
        f"masks must have the shape of anomaly_maps {maps.shape}, got {masks.shape}")
  return maps, masks


def _check_finite(values: np.ndarray, what: str, first_index: int) -> None:
  ok = np.isfinite(values).all(axis=1)
  if not ok.all():
    i = int(np.argmin(ok))
    raise ValueError(
        f"{what} of image {first_index + i} contains NaN or inf")


def _binary_labels(labels: np.ndarray, first_index: int) -> np.ndarray:
  if labels.dtype == bool:
    return labels
  bad = (labels != 0) & (labels != 1)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(
        f"image label of image {first_index + i} is {labels[i]!r}; expected 0 or 1")
  return labels == 1


def _binary_masks(masks: np.ndarray) -> np.ndarray:
  if masks.dtype == bool:
    return masks
  if not ((masks == 0) | (masks == 1)).all():
    warnings.warn(
        f"masks are not 0/1 (values from {masks.min()} to {masks.max()}); "
        "binarising at 0.5 (mask > 0.5 is anomalous)", stacklevel=3)
    return masks > 0.5
  return masks == 1


def compute(image_scores, image_labels, anomaly_maps, masks,
            fpr_limit: float = 0.3, zsad_aupro: bool = False
            ) -> dict[str, float | None]:
  """Image- and pixel-level metrics of one category, in one call.

  Args:
    image_scores: [N] image anomaly scores.
    image_labels: [N] 0/1 (or bool) image labels.
    anomaly_maps: [N, H, W] pixel scores (compared as float32), or None.
    masks: [N, H, W] ground truth (0/1 or bool; otherwise binarised at 0.5
      with a warning), or None.
    fpr_limit: AUPRO integration limit.
    zsad_aupro: also return `pixel_aupro_zsad`, the AUPRO of AnomalyCLIP and
      followers: thresholds `np.arange(min, max, (max - min) / 200)` over all
      pixel scores, a pixel counts when its score is > the threshold, points
      with FPR < `fpr_limit` kept, FPR min-max rescaled to [0, 1], then the
      trapezoid area. It is not the MVTec AUPRO; never compare the two.

  Returns:
    {image_auroc, image_ap, image_f1max, pixel_auroc, pixel_ap, pixel_f1max,
    pixel_aupro[, pixel_aupro_zsad]}: floats in [0, 1], None where undefined
    (see `MetricAccumulator`). AUROC and AP are scikit-learn's
    `roc_auc_score` and `average_precision_score`; F1-max is the largest
    2PR/(P+R) over scikit-learn's precision-recall curve; AUPRO is the MVTec
    AD definition (8-connected regions over all images, FPR over all normal
    pixels, trapezoid to `fpr_limit` with the point at the limit
    interpolated, divided by `fpr_limit`).
  """
  acc = MetricAccumulator(fpr_limit=fpr_limit, zsad_aupro=zsad_aupro)
  acc.update(image_scores, image_labels, anomaly_maps, masks)
  return acc.result()
