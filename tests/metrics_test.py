"""Metrics against scikit-learn and brute-force AUPRO, edge cases, streaming."""

import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from adjax import metrics
from adjax.bench import metrics as bench
from adjax.metrics import curves

TOL = 1e-6


def _sk(labels, scores):
  """scikit-learn's AUROC, AP and F1-max over its PR curve (None if undefined)."""
  labels = np.asarray(labels).ravel().astype(int)
  scores = np.asarray(scores).ravel()
  out = dict(auroc=None, ap=None, f1max=None)
  if labels.any():
    out["ap"] = skm.average_precision_score(labels, scores)
    p, r, _ = skm.precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
      f1 = 2 * p * r / (p + r)
    out["f1max"] = float(np.max(f1[np.isfinite(f1)]))
    if not labels.all():
      out["auroc"] = skm.roc_auc_score(labels, scores)
  return out


def _regions(masks):
  """Boolean masks of every 8-connected region, image by image."""
  out = []
  for i, m in enumerate(masks):
    lab, n = ndimage.label(m, structure=np.ones((3, 3)))
    out += [(i, lab == k) for k in range(1, n + 1)]
  return out


def brute_aupro(maps, masks, limit):
  """MVTec AUPRO by its definition: one curve point per distinct threshold."""
  regions = _regions(masks)
  flat = np.concatenate([m.ravel() for m in maps])
  normal = ~np.concatenate([m.ravel() for m in masks])
  xs, ys = [0.0], [0.0]
  for t in np.unique(flat)[::-1]:
    xs.append(np.sum((flat >= t) & normal) / normal.sum())
    ys.append(np.mean([(maps[i][r] >= t).mean() for i, r in regions]))
  x, y = np.array(xs), np.array(ys)
  keep = x <= limit
  area = np.trapezoid(y[keep], x[keep])
  if limit not in x:
    j = np.argmax(x > limit)
    y_lim = y[j - 1] + (y[j] - y[j - 1]) * (limit - x[j - 1]) / (x[j] - x[j - 1])
    area += 0.5 * (y_lim + y[j - 1]) * (limit - x[j - 1])
  return area / limit


def brute_aupro_zsad(maps, masks, limit, steps=200):
  """AnomalyCLIP-style AUPRO: evenly spaced thresholds, FPR < limit, rescaled."""
  regions = _regions(masks)
  flat = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
  normal = ~np.concatenate([m.ravel() for m in masks])
  lo, hi = flat.min(), flat.max()
  fprs, pros = [], []
  for th in np.arange(lo, hi, (hi - lo) / steps):
    fprs.append(np.sum((flat > th) & normal) / normal.sum())
    pros.append(np.mean([(maps[i][r].astype(np.float64) > th).mean()
                         for i, r in regions]))
  fprs, pros = np.array(fprs), np.array(pros)
  keep = fprs < limit
  f = fprs[keep]
  if f.size < 2 or f.max() == f.min():
    return None  # AnomalyCLIP's code would give NaN or 0 here
  f = (f - f.min()) / (f.max() - f.min())
  return skm.auc(f, pros[keep])


def _case(seed, n=8, h=14, w=15, levels=12, p_anom=0.6):
  """Maps with many ties and several blob regions per anomalous image."""
  rng = np.random.default_rng(seed)
  masks = np.zeros((n, h, w), bool)
  labels = rng.random(n) < p_anom
  labels[:2] = [False, True][:n]
  for i in np.flatnonzero(labels):
    for _ in range(rng.integers(1, 5)):
      y, x = rng.integers(0, h), rng.integers(0, w)
      ry, rx = rng.integers(0, 3, 2)
      masks[i, max(0, y - ry):y + ry + 1, max(0, x - rx):x + rx + 1] = True
  masks[labels, 0, 0] = True  # at least one region per anomalous image
  maps = rng.integers(0, levels, (n, h, w)) + 3 * masks * rng.random((n, h, w))
  maps = (np.round(maps * 2) / 2 - 4).astype(np.float32)  # ties, negatives
  scores = np.round(maps.reshape(n, -1).max(1) + rng.normal(size=n), 1)
  return scores, labels.astype(int), maps, masks


def _assert_close(got, want, what):
  if want is None:
    assert got is None, what
  else:
    assert got is not None and abs(got - want) <= TOL, (what, got, want)


@pytest.mark.parametrize("seed", range(4))
def test_against_sklearn_and_brute_force(seed):
  # Heavy ties, moderate ties, almost no ties.
  scores, labels, maps, masks = _case(seed, levels=[12, 3, 12, 1000][seed])
  limit = [0.1, 0.3, 1.0, 0.3][seed]
  got = metrics.compute(scores, labels, maps, masks, fpr_limit=limit,
                        zsad_aupro=True)
  img, px = _sk(labels, scores), _sk(masks, maps)
  for k in ("auroc", "ap", "f1max"):
    _assert_close(got["image_" + k], img[k], "image_" + k)
    _assert_close(got["pixel_" + k], px[k], "pixel_" + k)
  _assert_close(got["pixel_aupro"], brute_aupro(maps, masks, limit), "aupro")
  _assert_close(got["pixel_aupro_zsad"], brute_aupro_zsad(maps, masks, limit),
                "aupro_zsad")
  assert len(_regions(masks)) > len(masks) // 2
  assert all(v is None or 0 <= v <= 1 for v in got.values())


def test_zsad_variant_only_when_asked():
  scores, labels, maps, masks = _case(7)
  assert metrics.ZSAD_KEY not in metrics.compute(scores, labels, maps, masks)
  assert set(metrics.compute(scores, labels, maps, masks)) == set(
      metrics.METRIC_KEYS)


def test_continuous_scores_realistic_size():
  # The benchmark's data and its baseline: MVTec AD's reference AUPRO
  # construction (one argsort of all pixels, 1/region-size weights).
  maps, masks = bench.make_data(16, 192, seed=3)
  got = metrics.compute(maps.max((1, 2)), masks.any((1, 2)), maps, masks)
  px = _sk(masks, maps)
  for k in ("auroc", "ap", "f1max"):
    _assert_close(got["pixel_" + k], px[k], k)
  _assert_close(got["pixel_aupro"], bench.reference_aupro(maps, masks), "aupro")
  assert len(_regions(masks)) >= 10


def test_regions_are_8_connected():
  masks = np.zeros((1, 6, 6), bool)
  masks[0, 1, 1] = masks[0, 2, 2] = True  # diagonal neighbours: one region
  masks[0, 4, 5] = True
  maps = np.zeros((1, 6, 6), np.float32)
  maps[0, 1, 1], maps[0, 4, 5], maps[0, 0, 0] = 3, 2, 1
  got = metrics.compute([1.0], [1], maps, masks, fpr_limit=1.0)
  # Threshold 3 covers half of the diagonal region, 2 all of the other one.
  _assert_close(got["pixel_aupro"], brute_aupro(maps, masks, 1.0), "aupro")
  x = np.array([0, 0, 0, 1 / 33, 1])
  y = np.array([0, 0.25, 0.75, 0.75, 1])
  _assert_close(got["pixel_aupro"], np.trapezoid(y, x), "aupro")


def test_signed_zeros_tie():
  maps = np.array([[[0.0, -0.0], [1.0, -0.0]], [[0.0, 0.5], [-0.0, 0.0]]],
                  np.float32)
  masks = np.array([[[1, 0], [1, 1]], [[0, 0], [1, 0]]], bool)
  got = metrics.compute([0.0, 1.0], [1, 0], maps, masks)
  px = _sk(masks, maps)
  for k in ("auroc", "ap", "f1max"):
    _assert_close(got["pixel_" + k], px[k], k)
  _assert_close(got["pixel_aupro"], brute_aupro(maps, masks, 0.3), "aupro")


def test_float32_keys_preserve_order():
  x = np.array([-np.inf, -3e38, -1.5, -1e-45, 0.0, 1e-45, 1e-38, 2.0, 3e38,
                np.inf], np.float32)
  k = curves.float32_keys(x)
  assert np.all(np.diff(k.astype(np.int64)) > 0)
  np.testing.assert_array_equal(curves.keys_to_float32(k), x)


def test_all_images_normal_gives_missing_pixel_metrics():
  rng = np.random.default_rng(1)
  maps = rng.random((4, 8, 8)).astype(np.float32)
  got = metrics.compute(rng.random(4), np.zeros(4), maps, np.zeros((4, 8, 8)),
                        zsad_aupro=True)
  assert all(v is None for v in got.values()), got


def test_all_images_anomalous_image_auroc_missing():
  scores, _, maps, masks = _case(3)
  got = metrics.compute(scores, np.ones(len(scores)), maps, masks)
  assert got["image_auroc"] is None
  _assert_close(got["image_ap"], 1.0, "ap")


def test_all_scores_equal():
  masks = np.zeros((3, 6, 6), bool)
  masks[0, 1:3, 1:4] = True
  masks[2, 4:, 4:] = True
  maps = np.full(masks.shape, 0.25, np.float32)
  got = metrics.compute(np.ones(3), [1, 0, 1], maps, masks, zsad_aupro=True)
  px, img = _sk(masks, maps), _sk([1, 0, 1], np.ones(3))
  for k in ("auroc", "ap", "f1max"):
    _assert_close(got["pixel_" + k], px[k], k)
    _assert_close(got["image_" + k], img[k], k)
  _assert_close(got["pixel_auroc"], 0.5, "auroc")
  _assert_close(got["pixel_aupro"], brute_aupro(maps, masks, 0.3), "aupro")
  _assert_close(got["pixel_aupro"], 0.15, "aupro")  # straight line to (1, 1)
  assert got[metrics.ZSAD_KEY] is None  # no threshold range


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_map_names_image(bad):
  scores, labels, maps, masks = _case(2)
  maps[5, 3, 4] = bad
  with pytest.raises(ValueError, match=r"anomaly map of image 5 "):
    metrics.compute(scores, labels, maps, masks)
  scores[2] = np.nan
  with pytest.raises(ValueError, match=r"image score of image 2 "):
    metrics.compute(scores, labels, maps, masks)


def test_non_binary_masks_are_binarised_with_warning():
  scores, labels, maps, masks = _case(4)
  want = metrics.compute(scores, labels, maps, masks)
  soft = masks * 0.9 + 0.3 * (~masks) * np.random.default_rng(0).random(masks.shape)
  with pytest.warns(UserWarning, match="binaris"):
    assert metrics.compute(scores, labels, maps, soft) == want
  with pytest.warns(UserWarning, match="binaris"):
    assert metrics.compute(scores, labels, maps, masks.astype(np.uint8) * 255) == want
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert metrics.compute(scores, labels, maps, masks.astype(np.float32)) == want


def test_bad_shapes_and_values():
  scores, labels, maps, masks = _case(5)
  with pytest.raises(ValueError, match="masks must have the shape"):
    metrics.compute(scores, labels, maps, masks[:, :-1])
  with pytest.raises(ValueError, match="anomaly_maps must have shape"):
    metrics.compute(scores[:-1], labels[:-1], maps, masks)
  with pytest.raises(ValueError, match="anomaly_maps must have shape"):
    metrics.compute(scores, labels, maps[:, None], masks[:, None])
  with pytest.raises(ValueError, match="image_labels must have shape"):
    metrics.compute(scores, labels[:-1], maps, masks)
  with pytest.raises(ValueError, match="given together"):
    metrics.compute(scores, labels, maps, None)
  labels[3] = 2
  with pytest.raises(ValueError, match="image label of image 3"):
    metrics.compute(scores, labels, maps, masks)
  with pytest.raises(ValueError, match="fpr_limit"):
    metrics.MetricAccumulator(fpr_limit=0.0)


def test_accumulator_matches_one_shot_with_padding():
  rng = np.random.default_rng(9)
  parts = [_case(s, n=n) for s, n in ((20, 5), (21, 1), (22, 7), (23, 3))]
  want = metrics.compute(*[np.concatenate(a) for a in zip(*parts)],
                         zsad_aupro=True)
  # Tiny sweep blocks so that groups of tied scores meet block edges.
  acc = metrics.MetricAccumulator(zsad_aupro=True, block_size=5)
  for scores, labels, maps, masks in parts:
    # Two padding rows at random places, full of garbage the metrics must
    # never see (NaN scores and maps, invalid labels, all-anomalous masks).
    valid = np.ones(len(scores) + 2, bool)
    valid[rng.choice(valid.size, 2, replace=False)] = False
    def padded(x, fill):
      out = np.full((valid.size,) + x.shape[1:], fill, x.dtype)
      out[valid] = x
      return out
    acc.update(padded(scores, np.nan), padded(labels, 7),
               padded(maps, np.nan), padded(masks, True), valid=valid)
  assert acc.num_images == sum(len(p[0]) for p in parts)
  got = acc.result()
  assert got.keys() == want.keys()
  for k in want:
    _assert_close(got[k], want[k], k)
  assert acc.result() == got  # result() can be asked again


def test_accumulator_mixed_image_sizes_and_error_index():
  a, b = _case(30, n=4, h=10, w=12), _case(31, n=3, h=7, w=9)
  acc = metrics.MetricAccumulator()
  acc.update(*a)
  acc.update(*b)
  got = acc.result()
  flat_masks = np.concatenate([a[3].ravel(), b[3].ravel()])
  flat_maps = np.concatenate([a[2].ravel(), b[2].ravel()])
  px = _sk(flat_masks, flat_maps)
  for k in ("auroc", "ap", "f1max"):
    _assert_close(got["pixel_" + k], px[k], k)
  want = brute_aupro(list(a[2]) + list(b[2]), list(a[3]) + list(b[3]), 0.3)
  _assert_close(got["pixel_aupro"], want, "aupro")
  maps = b[2].copy()
  maps[1, 0, 0] = np.nan
  with pytest.raises(ValueError, match="image 8 "):  # 7 seen before, row 1
    acc.update(b[0], b[1], maps, b[3])
  assert acc.num_images == 7
  assert acc.result() == got  # a failed update leaves the state unchanged


def test_image_only_updates():
  scores, labels, _, _ = _case(6)
  got = metrics.compute(scores, labels, None, None)
  img = _sk(labels, scores)
  for k in ("auroc", "ap", "f1max"):
    _assert_close(got["image_" + k], img[k], k)
  assert got["pixel_auroc"] is None and got["pixel_aupro"] is None


def test_thresholds_and_curves_against_sklearn():
  """`result(details=True)`: the F1-max threshold and the ROC / PR points agree
  with scikit-learn's curves (image level, and pixel level with ties)."""
  from sklearn.metrics import precision_recall_curve, roc_curve
  rng = np.random.default_rng(7)
  n = 40
  labels = (rng.random(n) < 0.4).astype(int)
  scores = np.round(rng.random(n) + 0.5 * labels, 2)       # ties
  maps = np.round(rng.random((n, 8, 8)).astype(np.float32), 2)
  masks = np.zeros((n, 8, 8), np.float32)
  masks[labels == 1, 2:5, 3:6] = 1
  maps = maps + masks * 0.3
  acc = metrics.MetricAccumulator()
  acc.update(scores, labels, maps, masks)
  res = acc.result(details=True)
  for prefix, y, s in (("image", labels, scores.astype(np.float64)),
                       ("pixel", masks.ravel(), maps.ravel().astype(np.float32))):
    prec, rec, thr = precision_recall_curve(y, s)
    f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-300)
    # sklearn's F1-max threshold is an observed score; ours lies strictly
    # between it and the next lower score, deciding every score alike.
    t_sk, t = float(thr[np.argmax(f1)]), res[f"{prefix}_threshold"]
    assert float(s[s < t_sk].max()) < t < t_sk
    np.testing.assert_array_equal(s >= t, s >= s.dtype.type(t_sk))
    pred = s >= res[f"{prefix}_threshold"]
    tp = np.sum(pred & (y == 1))
    assert 2 * tp / (pred.sum() + y.sum()) == pytest.approx(res[f"{prefix}_f1max"])
    curve = res[f"{prefix}_curve"]
    fpr, tpr, roc_thr = roc_curve(y, s, drop_intermediate=False)
    for t, x, r, p in curve:
      i = int(np.flatnonzero(roc_thr == np.float64(t).astype(s.dtype))[0])
      assert (x, r) == pytest.approx((fpr[i], tpr[i]))
      assert p == pytest.approx(np.sum((s >= t) & (y == 1)) / np.sum(s >= t))
