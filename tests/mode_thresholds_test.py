"""Thresholds per scoring mode (adjax.workdir.thresholds, Detector, predict): records
of another mode or bank refused; the demo's few-shot and batch modes decide in
mode=predict as their evaluation did, and calibration from normal images only
gives about the chosen false-positive rate (slow tier)."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import demo_run
from adjax import experiment
from adjax.workdir import thresholds

ROOT = Path(__file__).resolve().parent.parent


def _demo(tmp: Path, **overrides):
  c = demo_run.without_showcase(demo_run.demo_config())
  c.data.demo.root = str(tmp / "demo")
  c.data.train = str(tmp / "demo" / "family_a")
  c.data.targets = str(tmp / "demo" / "family_b")
  c.data.data_dir = str(tmp / "tfds")
  c.text.random_init = False
  c.text.checkpoint = "/nonexistent/text"
  c.eval.heatmaps_per_category = 0
  return demo_run.apply_overrides(c, overrides)


def _predict(c, workdir: Path, **predict) -> list[dict]:
  c = c.copy_and_resolve_references()
  c.mode = "predict"
  for k, v in predict.items():
    c.predict[k] = v
  experiment.run(c, str(workdir))
  if not c.predict.input:            # calibration only
    return []
  with open(workdir / "predictions" / "scores.csv") as f:
    return list(csv.DictReader(f))


def _f1(rows) -> float:
  labels = np.array(["/good/" not in r["path"] for r in rows])
  pred = np.array([r["decision"] == "1" for r in rows])
  tp = int(np.sum(pred & labels))
  return 2 * tp / (int(pred.sum()) + int(labels.sum()))


@pytest.mark.slow
@pytest.mark.parametrize("scoring", ["few_shot", "batch"])
def test_demo_mode_decides_as_evaluated_and_calibrates_from_normals(tmp_path, scoring, capsys):
  """Evaluate with eval.set_thresholds=True, then mode=predict per category
  (few_shot: against the evaluation's references) reaches the evaluation's
  image F1 within 0.02; calibration on half of each category's good images
  flags about 1 - quantile of the other half."""
  work = tmp_path / "work"
  c = _demo(tmp_path, **{"eval.scoring": scoring, "eval.references": 4,
                         "eval.set_thresholds": True})
  c.mode = "evaluate"
  experiment.run(c, str(work))
  record = thresholds.read(work / f"thresholds.{scoring}.json")
  assert record["scoring"] == scoring
  results = json.loads((work / "results" / f"family_b.{scoring}.json").read_text())
  family = tmp_path / "demo" / "family_b"
  gaps, flagged, held, expected, variance = [], 0, 0, 0.0, 0.0
  quantile = 0.9
  for cat in sorted(results["categories"]):
    test = family / cat / "test"
    kw = {"input": str(test), "object_name": cat, "scoring": scoring}
    refs = None
    if scoring == "few_shot":
      refs = tmp_path / "refs" / cat
      refs.mkdir(parents=True)
      for rel in results["identity"]["references"][cat]:
        shutil.copy(family / rel, refs / Path(rel).name)
      kw["references"] = str(refs)
    rows = _predict(c, work, **kw)
    assert {r["threshold_source"] for r in rows} == {f"category:family_b/{cat}"}
    # The references themselves score 0 (normal): F1 does not count them.
    gaps.append(abs(_f1(rows) - results["categories"][cat]["image_f1max"]))
    # Normals only: calibrate on half the good images, predict the other half.
    goods = sorted(p for p in (test / "good").glob("*.png")
                   if refs is None or not (refs / p.name).exists())
    cal, rest = tmp_path / "cal" / scoring / cat, tmp_path / "rest" / scoring / cat
    for folder, part in ((cal, goods[::2]), (rest, goods[1::2])):
      folder.mkdir(parents=True)
      for p in part:
        shutil.copy(p, folder / p.name)
    cal_work = tmp_path / f"cal_{scoring}_{cat}"
    extra = {"references": str(refs)} if refs else {}
    _predict(c, cal_work, scoring=scoring, object_name=cat, calibrate_normals=str(cal),
             calibrate_quantile=quantile, input="", **extra)
    rows = _predict(c, cal_work, scoring=scoring, object_name=cat, input=str(rest), **extra)
    flagged += sum(r["decision"] == "1" for r in rows)
    held += len(rows)
    # Exchangeable normals: a fresh one lies above the k-th of n calibration
    # scores (the "higher" quantile, k = ceil(q (n - 1)) + 1) with probability
    # (n - k + 1) / (n + 1): 1 / (n + 1) when the quantile is their maximum.
    n = len(goods[::2])
    k = int(np.ceil(quantile * (n - 1))) + 1
    p = (n - k + 1) / (n + 1)
    expected += p * len(rows)
    variance += p * (1 - p) * len(rows)
  fpr = flagged / held
  with capsys.disabled():
    print(f"\n{scoring}: |F1(predict) - F1(evaluate)| per category "
          f"{[round(g, 4) for g in gaps]}; normals-only calibration (q={quantile}) "
          f"false-positive rate on held-out good images {flagged}/{held} = {fpr:.3f} "
          f"(expected from the calibration sets' sizes {expected / held:.3f})")
  assert max(gaps) <= 0.02, gaps
  assert abs(flagged - expected) <= 3 * np.sqrt(variance) + 1, (flagged, expected)


@pytest.mark.slow
def test_few_shot_calibration_leaves_each_reference_out(tmp_path):
  """calibrate(None, scoring="few_shot") scores each reference against the
  others (what use_references of the others then predict gives), and so
  does calibrating on the references' own folder; what cannot be calibrated
  is refused in one line."""
  from PIL import Image
  from adjax import Detector, metrics
  from adjax.detector import DetectorError
  rng = np.random.default_rng(8)
  refs = tmp_path / "refs"
  refs.mkdir()
  base = rng.integers(60, 200, (64, 64, 3), dtype=np.uint8)
  paths = []
  for i in range(3):
    im = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
    paths.append(refs / f"r{i}.png")
    Image.fromarray(im).save(paths[-1])
  c = demo_run.without_showcase(demo_run.demo_config())
  c.data.demo.root = ""
  c.image_size = 64
  c.text.random_init = False
  c.text.checkpoint = "/nonexistent/text"
  c.predict.scoring = "few_shot"
  det = Detector.from_config(c, tmp_path / "work")
  left_out = []
  for i, p in enumerate(paths):
    det.use_references([str(q) for j, q in enumerate(paths) if j != i])
    left_out.append(float(det.predict(str(p), scoring="few_shot").scores[0]))
  det.use_references(str(refs))
  image_t, _ = det.calibrate(None, 1.0, scoring="few_shot")
  assert image_t == pytest.approx(metrics.quantile_threshold(left_out, 1.0), rel=1e-5)
  assert max(left_out) < image_t
  again, _ = det.calibrate(str(refs), 1.0, scoring="few_shot")
  assert again == pytest.approx(image_t, rel=1e-6)
  assert "each against the others" in det.records["few_shot"]["details"]["scored"]
  assert det.records["few_shot"]["bank"] == det.bank
  det.use_references(str(paths[0]))
  for normals, scoring, needle in ((None, "few_shot", "needs at least 2 references"),
                                   (str(paths[0]), "few_shot", "other than the references"),
                                   (str(refs), "zero_shot+few_shot", "come from evaluation"),
                                   (str(paths[0]), "batch", "needs at least 5")):
    with pytest.raises(DetectorError, match=needle) as err:
      det.calibrate(normals, 0.9, scoring=scoring)
    assert "\n" not in str(err.value)
