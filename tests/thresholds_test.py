"""adjax.metrics.f1_optimal / quantile_threshold, adjax.workdir.thresholds and
adjax.report.overlays against brute-force computations."""

import json

import numpy as np
import pytest
from PIL import Image

from adjax import metrics
from adjax.workdir import thresholds
from adjax.report import overlays


def brute_f1(scores, labels):
  """Every observed score as a threshold; F1 of `score >= t`; ties to the highest t."""
  best = (-1.0, None)
  for t in sorted(set(scores.tolist()), reverse=True):
    pred = scores >= t
    tp = np.sum(pred & labels)
    fp = np.sum(pred & ~labels)
    fn = np.sum(~pred & labels)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    if f1 > best[0] + 1e-15:
      best = (f1, t)
  return best


def assert_separates(threshold, scores, t):
  """`threshold` calls exactly the scores >= t anomalous and lies strictly
  between t and the highest score below it (never on an observed score)."""
  scores = np.asarray(scores, np.float64)
  below = scores[scores < t]
  assert threshold < t and (below.size == 0 or threshold > below.max()), (threshold, t)
  assert threshold not in scores
  np.testing.assert_array_equal(scores >= threshold, scores >= t)


@pytest.mark.parametrize("seed", range(5))
def test_f1_optimal_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  n = 200
  labels = rng.random(n) < 0.3
  scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
  if seed % 2:
    scores = np.round(scores, 1)           # many ties
  got = metrics.f1_optimal(scores, labels)
  f1, t = brute_f1(scores, labels)
  assert got.f1 == pytest.approx(f1)
  assert_separates(got.threshold, scores, t)
  pred = scores >= got.threshold
  assert got.precision == pytest.approx(np.sum(pred & labels) / pred.sum())
  assert got.recall == pytest.approx(np.sum(pred & labels) / labels.sum())


def test_f1_optimal_exact_ties_go_to_the_highest_threshold():
  """F1 in exact fractions: equal F1 at several thresholds (common with few
  examples) goes to the highest one, never to one that rounding favours."""
  from fractions import Fraction
  rng = np.random.default_rng(11)
  for _ in range(300):
    n = int(rng.integers(4, 40))
    labels = rng.random(n) < 0.5
    labels[0] = True
    scores = np.round(rng.normal(size=n) + labels, 1)
    best = (Fraction(-1), None)
    for t in sorted(set(scores.tolist()), reverse=True):
      tp = int(np.sum((scores >= t) & labels))
      f1 = Fraction(2 * tp, int(np.sum(scores >= t)) + int(labels.sum()))
      if f1 > best[0]:
        best = (f1, t)
    got = metrics.f1_optimal(scores, labels)
    assert got.f1 == float(best[0])
    assert_separates(got.threshold, scores, best[1])


def test_pixel_f1_ties_go_to_the_highest_threshold_across_blocks():
  """The evaluation's pixel threshold sweeps anomalous pixels in blocks; an
  equal F1 in a later (lower-scoring) block keeps the earlier, higher threshold.

  Fails if an F1 tie in a later block replaces the threshold (`>=` for `>`
  between blocks), or if argmax within a block takes the last maximum.
  """
  from fractions import Fraction
  rng = np.random.default_rng(12)
  ties = 0
  for _ in range(200):
    masks = rng.random((2, 2, 3)) < 0.3
    masks[1, 0, 0] = True
    maps = np.round(rng.normal(size=masks.shape) + masks).astype(np.float32)
    flat, truth = maps.ravel().astype(np.float64), masks.ravel()
    f1s = {}
    for t in sorted(set(flat.tolist()), reverse=True):
      tp = int(np.sum((flat >= t) & truth))
      f1s[t] = Fraction(2 * tp, int(np.sum(flat >= t)) + int(truth.sum()))
    best = max(f1s.values())
    want = max(t for t, f in f1s.items() if f == best)
    ties += sum(f == best for f in f1s.values()) > 1
    for block_size in (1, 2, 3, 1 << 20):
      acc = metrics.MetricAccumulator(block_size=block_size)
      acc.update(maps.reshape(2, -1).max(1), masks.any((1, 2)), maps, masks)
      got = acc.result(details=True)
      assert_separates(got["pixel_threshold"], flat, want)
      assert got["pixel_f1max"] == pytest.approx(float(best), abs=1e-12)
  assert ties >= 10         # the draws do exercise the rule


def test_f1_optimal_refuses_bad_input():
  with pytest.raises(ValueError, match="at least one anomalous"):
    metrics.f1_optimal([0.1, 0.2], [0, 0])
  with pytest.raises(ValueError, match="NaN"):
    metrics.f1_optimal([np.nan, 0.2], [0, 1])


def test_f1_optimal_is_the_evaluation_threshold():
  """One sweep: f1_optimal gives the threshold and F1 that the evaluation's
  MetricAccumulator reports (image level, float64 and float32 with ties)."""
  rng = np.random.default_rng(3)
  for dtype in (np.float64, np.float32):
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + 0.4 * labels, 2).astype(dtype)
    acc = metrics.MetricAccumulator()
    acc.update(scores, labels)
    res = acc.result(details=True)
    got = metrics.f1_optimal(scores, labels)
    assert got.threshold == res["image_threshold"]
    assert got.f1 == pytest.approx(res["image_f1max"], abs=1e-12)


def test_quantile_threshold():
  rng = np.random.default_rng(2)
  normal = rng.normal(size=1000)
  t = metrics.quantile_threshold(normal, 0.99)
  v = np.sort(normal)[int(np.ceil(0.99 * 999))]       # the "higher" quantile
  assert t not in normal
  # Called anomalous (>= t): exactly the normals above v, at most 1%.
  np.testing.assert_array_equal(normal >= t, normal > v)
  assert np.mean(normal >= t) <= 0.01
  assert v < t < normal[normal > v].min()
  # The largest normal as the quantile: the threshold lies just above it.
  top = metrics.quantile_threshold(normal, 1.0)
  assert normal.max() < top <= normal.max() + abs(normal.max()) * 2 ** -9
  assert not (normal >= top).any()
  with pytest.raises(ValueError):
    metrics.quantile_threshold([], 0.9)
  with pytest.raises(ValueError):
    metrics.quantile_threshold([1.0], 0.0)


MODEL = thresholds.threshold_model(backbone_id="random:vits16:seed0", text_id="t",
                                   layers=(2, 5, 8, 11), image_size=224,
                                   reference_quirks=False, head_sha256="ab" * 32)


def test_file_round_trip_and_check(tmp_path):
  path = thresholds.write(tmp_path, dataset="mvtec_ad", image_score="global",
                          checkpoint_step=1200, model=MODEL, image=0.42, pixel=0.5,
                          details={"image_f1": 0.9})
  assert path.name == "thresholds.json"
  rec = thresholds.read(tmp_path)
  assert rec["image_threshold"] == 0.42 and rec["pixel_threshold"] == 0.5
  assert rec["dataset"] == "mvtec_ad" and rec["checkpoint_step"] == 1200
  thresholds.check(rec, image_score="global", model=MODEL, checkpoint_step=1200)
  with pytest.raises(thresholds.ThresholdError, match="image_score='global'.*'max'"):
    thresholds.check(rec, image_score="max", model=MODEL)
  other = dict(MODEL, backbone="random:vitl16:seed0")
  with pytest.raises(thresholds.ThresholdError, match="another model.*backbone: file"):
    thresholds.check(rec, image_score="global", model=other)
  with pytest.raises(thresholds.ThresholdError, match="step 1200"):
    thresholds.check(rec, image_score="global", model=MODEL, checkpoint_step=5)
  bad = json.loads(path.read_text())
  del bad["model"]
  path.write_text(json.dumps(bad))
  with pytest.raises(thresholds.ThresholdError, match=r"missing fields \['model'\]"):
    thresholds.read(path)


def test_params_hash_sees_every_value():
  a = {"x": np.zeros((2, 3), np.float32), "y": np.ones(4, np.float32)}
  b = {"x": np.zeros((2, 3), np.float32), "y": np.ones(4, np.float32)}
  assert thresholds.params_sha256(a) == thresholds.params_sha256(b)
  b["y"][2] = 1.0000001
  assert thresholds.params_sha256(a) != thresholds.params_sha256(b)


def brute_contour(m):
  h, w = m.shape
  out = np.zeros_like(m)
  for y in range(h):
    for x in range(w):
      if not m[y, x]:
        continue
      for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        yy, xx = y + dy, x + dx
        if not (0 <= yy < h and 0 <= xx < w) or not m[yy, xx]:
          out[y, x] = True
  return out


def test_contour_and_overlay_match_brute_force(tmp_path):
  rng = np.random.default_rng(3)
  amap = rng.random((20, 24)).astype(np.float32)
  mask = overlays.binary_mask(amap, 0.6)
  np.testing.assert_array_equal(mask == 255, amap >= 0.6)
  np.testing.assert_array_equal(overlays.contour(mask), brute_contour(amap >= 0.6))
  rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
  drawn = overlays.draw_contour(rgb, mask, color=(0, 255, 0), thickness=1)
  edge = brute_contour(amap >= 0.6)
  assert (drawn[edge] == [0, 255, 0]).all()
  np.testing.assert_array_equal(drawn[~edge], rgb[~edge])
  thick = overlays.draw_contour(rgb, mask, thickness=3)
  changed = np.any(thick != rgb, -1)
  assert changed[edge & np.any(rgb != [255, 0, 0], -1)].all()
  assert not changed[mask == 0].any()                  # drawn inside the mask only

  overlays.save_mask_png(tmp_path / "m.png", mask)
  overlays.save_overlay_png(tmp_path / "o.png", rgb, mask)
  back = np.asarray(Image.open(tmp_path / "m.png"))
  assert back.dtype == np.uint8 and set(np.unique(back)) <= {0, 255}
  np.testing.assert_array_equal(back, mask)
  assert Image.open(tmp_path / "o.png").size == (24, 20)
  # A mask at map resolution is drawn on a larger image.
  big = np.zeros((40, 48, 3), np.uint8)
  assert overlays.draw_contour(big, mask).shape == (40, 48, 3)


def test_resolve_one_rule_for_every_decision_path():
  rec = {"image_threshold": 0.3, "pixel_threshold": 0.6,
         "details": {"per_category": {"a": {"chip": {"image": 0.0, "pixel": None},
                                            "nut": {"image": None, "pixel": 0.2}},
                                      "b": {"chip": {"image": 0.9, "pixel": 0.7}}}}}
  # A category's own threshold (0.0 is a threshold); the first data set that has
  # a value wins, per threshold.
  assert thresholds.resolve(rec, "chip") == (0.0, 0.7, "category:a/chip")
  assert thresholds.resolve(rec, "nut") == (0.3, 0.2, "top-level")
  assert thresholds.resolve(rec, "bracket") == (0.3, 0.6, "top-level")
  assert thresholds.resolve(rec, "chip", 0.5) == (0.5, 0.7, "predict.threshold")
  assert thresholds.resolve(rec, "chip", -1.0).source == "category:a/chip"
  assert thresholds.resolve(None, "chip") == (None, None, "none")
  assert thresholds.resolve(None, "chip", 0.4) == (0.4, None, "predict.threshold")
  assert thresholds.resolve(dict(rec, image_threshold=None), "bracket").source == "none"


def _bank(*names):
  import zlib
  return thresholds.bank_identity(thresholds.image_digest(
      np.full((4, 4, 3), zlib.crc32(n.encode()) % 251, np.uint8)) for n in names)


def test_a_coreset_bank_is_another_bank(tmp_path):
  """eval.coreset joins the bank's identity: a record made with the whole
  bank (or another coreset) is refused for a coreset bank of the same
  images, naming the coreset; without a coreset the identity is as before."""
  import hashlib
  import zlib
  from adjax import coreset
  digests = [thresholds.image_digest(np.full((4, 4, 3), zlib.crc32(n.encode()) % 251,
                                             np.uint8)) for n in ("a1", "a2")]
  whole = thresholds.bank_identity(digests)
  assert whole == {"digest": hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest(),
                   "images": 2}
  core = thresholds.bank_identity(digests, coreset.settings(0.1, 0))
  other = thresholds.bank_identity(digests, coreset.settings(0.1, 1))
  assert len({whole["digest"], core["digest"], other["digest"]}) == 3
  assert core["coreset"] == coreset.settings(0.1, 0)
  few = thresholds.model_for("few_shot", backbone_id="b", layers=(2,), image_size=64,
                             reference_quirks=False, r_list=(1,))
  thresholds.write(tmp_path, dataset="fam", image_score="few_shot:max", checkpoint_step=-1,
                   model=few, image=0.4, pixel=0.3, scoring="few_shot",
                   details={"per_category": {"fam": {"tile": {"image": 0.5, "pixel": 0.35,
                                                              "bank": whole}}}})
  rec = thresholds.read(tmp_path / "thresholds.few_shot.json")
  assert thresholds.resolve(rec, "tile", scoring="few_shot", bank=whole).image == 0.5
  for bank in (core, other):
    with pytest.raises(thresholds.ThresholdError, match="coreset 0.1 seed") as err:
      thresholds.resolve(rec, "tile", scoring="few_shot", bank=bank)
    assert "\n" not in str(err.value)


def test_records_per_mode_and_bank(tmp_path):
  """Each mode has its own deployment file; `resolve` refuses a record of
  another mode, and a few-shot record of another bank, in one line naming
  both; a few-shot object takes the category made with its bank."""
  from adjax.workdir import Workdir
  few = thresholds.model_for("few_shot", backbone_id="b", layers=(2, 5), image_size=64,
                             reference_quirks=False, r_list=(1,))
  assert few["scoring"] == "few_shot" and few["text"] == "none" and few["r_list"] == [1]
  batch = thresholds.model_for("batch", backbone_id="b", layers=(2, 5), image_size=64,
                               reference_quirks=False, r_list=(1,), rscin_k=(0,))
  assert batch["rscin_k"] == [0]
  assert thresholds.model_for("zero_shot", backbone_id="b", layers=(2,), image_size=64,
                              reference_quirks=False, head=MODEL) == MODEL
  bank_a, bank_b, bank_c = _bank("a1", "a2"), _bank("b1"), _bank("c1", "c2", "c3")
  assert bank_a == _bank("a2", "a1") and bank_a != bank_b        # order does not matter
  path = thresholds.write(tmp_path, dataset="fam", image_score="few_shot:max",
                          checkpoint_step=-1, model=few, image=0.4, pixel=0.3,
                          scoring="few_shot", details={"per_category": {"fam": {
                              "tile": {"image": 0.5, "pixel": 0.35, "bank": bank_a},
                              "nut": {"image": 0.7, "pixel": 0.45, "bank": bank_b}}}})
  assert path == Workdir(tmp_path).mode_thresholds("few_shot")
  assert path.name == "thresholds.few_shot.json"
  assert Workdir(tmp_path).mode_thresholds("zero_shot").name == "thresholds.json"
  rec = thresholds.read(tmp_path / "thresholds.few_shot.json")
  assert rec["scoring"] == "few_shot"
  thresholds.check(rec, image_score="few_shot:max", model=few, scoring="few_shot")
  with pytest.raises(thresholds.ThresholdError, match="'few_shot'.*'batch'"):
    thresholds.check(rec, image_score="few_shot:max", model=few, scoring="batch")
  with pytest.raises(thresholds.ThresholdError, match="r_list: file"):
    thresholds.check(rec, image_score="few_shot:max", model=dict(few, r_list=[1, 3]),
                     scoring="few_shot")
  # The object's own category, with its bank.
  assert thresholds.resolve(rec, "tile", scoring="few_shot", bank=bank_a) == (
      0.5, 0.35, "category:fam/tile")
  # An unseen object name: the category made with this bank.
  assert thresholds.resolve(rec, "", scoring="few_shot", bank=bank_b) == (
      0.7, 0.45, "category:fam/nut")
  for name, bank in (("tile", bank_b), ("mesh", bank_c)):
    with pytest.raises(thresholds.ThresholdError) as err:
      thresholds.resolve(rec, name, scoring="few_shot", bank=bank)
    line = str(err.value)
    assert "\n" not in line and bank["digest"][:12] in line, line
  assert bank_a["digest"][:12] in str(pytest.raises(
      thresholds.ThresholdError, thresholds.resolve, rec, "tile", scoring="few_shot",
      bank=bank_b).value)
  with pytest.raises(thresholds.ThresholdError, match="no references are in use"):
    thresholds.resolve(rec, "tile", scoring="few_shot", bank=None)
  # Another mode's scores never use it; a record without `scoring` is zero_shot.
  with pytest.raises(thresholds.ThresholdError, match="made for scoring mode 'few_shot', "
                     "these scores are 'batch'"):
    thresholds.resolve(rec, "tile", scoring="batch")
  old = thresholds.write(tmp_path / "old.json", dataset="d", image_score="mean",
                         checkpoint_step=1, model=MODEL, image=0.2)
  legacy = json.loads(old.read_text())
  del legacy["scoring"]
  old.write_text(json.dumps(legacy))
  assert thresholds.read(old)["scoring"] == "zero_shot"
  with pytest.raises(thresholds.ThresholdError, match="'zero_shot', these scores are "
                     "'few_shot'"):
    thresholds.resolve(thresholds.read(old), "tile", scoring="few_shot", bank=bank_a)
  # A calibrated record: its top-level thresholds hold for its own bank only.
  cal = thresholds.write(tmp_path / "cal.json", dataset="normals", scoring="few_shot",
                         image_score="few_shot:max", checkpoint_step=-1, model=few,
                         image=0.6, pixel=0.25, bank=bank_c)
  cal = thresholds.read(cal)
  assert thresholds.resolve(cal, "any", scoring="few_shot", bank=bank_c) == (
      0.6, 0.25, "top-level")
  assert thresholds.resolve(cal, "any", 0.9, scoring="few_shot", bank=bank_c) == (
      0.9, 0.25, "predict.threshold")
  with pytest.raises(thresholds.ThresholdError, match="made with bank"):
    thresholds.resolve(cal, "any", scoring="few_shot", bank=bank_a)


def test_separating_threshold_survives_rounding():
  """A score that defined the threshold, computed one float32 ulp lower or
  higher by another path, is still decided alike."""
  from adjax.metrics import curves
  rng = np.random.default_rng(5)
  for _ in range(200):
    scores = np.sort(rng.random(6).astype(np.float32))
    lo, hi = float(scores[2]), float(scores[3])
    t = curves.separating(lo, hi)
    assert lo < t < hi and np.float32(t) == t
    for s, want in ((hi, True), (lo, False)):
      for ulps in (-1, 1):
        other = np.nextafter(np.float32(s), np.float32(np.inf if ulps > 0 else -np.inf))
        assert (other >= t) == want
  # Adjacent float32 values: no float32 between them, the upper one decides.
  a = np.float32(0.5)
  b = np.nextafter(a, np.float32(1))
  assert curves.separating(float(a), float(b)) == float(b)
  assert curves.separating(None, 1.0) < 1.0 and curves.separating(1.0, None) > 1.0
  assert curves.separating(0.0, None) > 0.0
