"""adjax.Detector, called as a user would: the same numbers as mode=predict and
the ONNX export, every input kind, maps at each image's own size, thresholds
per object, calibration and the documented examples."""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adjax import experiment
from adjax.workdir import thresholds
from adjax import Detector
from adjax.config import schema
from adjax.detector import DetectorError
from adjax.workdir import Workdir

import doc_blocks

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64

# Every test here uses a trained demo workdir (an end-to-end run, shared by the
# session): the slow tier, like tests/experiment_test.py.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(demo_workdir, tmp_path_factory):
  """A folder of mixed sizes and modes: demo test images and random ones."""
  _, _, data = demo_workdir
  src = tmp_path_factory.mktemp("detector_images")
  picked = sorted((data / "family_b" / "tile" / "test").rglob("*.png"))[:3]
  for i, p in enumerate(picked):
    shutil.copy(p, src / f"tile_{i}.png")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(src / "wide.png")
  Image.fromarray(rng.integers(0, 255, (90, 40), dtype=np.uint8)).save(src / "gray.png")
  Image.fromarray(rng.integers(0, 255, (30, 60, 4), dtype=np.uint8), "RGBA").save(
      src / "rgba.png")
  return src


@pytest.fixture(scope="module")
def detector(demo_workdir):
  return Detector.from_workdir(demo_workdir[1])


@pytest.fixture(scope="module")
def folder_prediction(detector, images):
  return detector.predict(str(images), object_name="tile")


def _sizes(paths):
  out = []
  for p in paths:
    with Image.open(p) as img:
      out.append((img.height, img.width))
  return out


def test_same_scores_decisions_and_masks_as_predict_mode(demo_workdir, images,
                                                          folder_prediction, monkeypatch):
  cfg, workdir, _ = demo_workdir
  cfg = cfg.copy_and_resolve_references()
  cfg.mode = "predict"
  cfg.predict.input = str(images)
  cfg.predict.object_name = "tile"
  # mode=predict scores through Detector.predict (one call for the folder)
  # and writes what it returns: no second scoring path.
  calls = []
  original = Detector.predict

  def counted(self, images, *args, **kwargs):
    calls.append(list(images))
    return original(self, images, *args, **kwargs)

  monkeypatch.setattr(Detector, "predict", counted)
  experiment.run(cfg, str(workdir))
  monkeypatch.undo()
  assert len(calls) == 1 and sorted(calls[0]) == sorted(folder_prediction.paths)
  with open(workdir / "predictions" / "scores.csv") as f:
    rows = {r["path"]: r for r in csv.DictReader(f)}
  pred = folder_prediction
  assert sorted(rows) == sorted(pred.paths) and len(pred) == 6
  for i, path in enumerate(pred.paths):
    assert abs(float(rows[path]["score"]) - float(pred.scores[i])) <= 1e-6, path
    assert int(rows[path]["decision"]) == int(pred.decisions[i])
    with Image.open(workdir / "predictions" / rows[path]["mask"]) as m:
      np.testing.assert_array_equal(np.asarray(m) > 0, pred.masks[i])
  # tile has its own F1-max thresholds from the evaluation of family_b.
  record = thresholds.read(workdir)
  own = record["details"]["per_category"]["family_b"]["tile"]
  assert pred.thresholds[0] == (own["image"], own["pixel"])
  assert pred.threshold_source[0] == "category:family_b/tile"
  assert {r["threshold_source"] for r in rows.values()} == {"category:family_b/tile"}


def test_maps_have_each_images_size(folder_prediction):
  pred = folder_prediction
  assert [m.shape for m in pred.maps] == _sizes(pred.paths)
  assert all(m.dtype == np.float32 for m in pred.maps)
  assert [m.shape for m in pred.masks] == _sizes(pred.paths)
  assert pred.scores.shape == (6,) and pred.decisions.shape == (6,)


def test_every_input_kind_gives_the_same_scores(detector, images, folder_prediction):
  want = dict(zip(folder_prediction.paths, folder_prediction.scores))
  paths = sorted(str(p) for p in images.iterdir())
  pils = [Image.open(p) for p in paths]
  arrays = [np.asarray(im.convert("RGB")) for im in pils]
  expected = np.array([want[p] for p in paths])
  kinds = {
      "one path": (paths[0], expected[:1]),
      "paths": (paths, expected),
      "glob": (str(images / "tile_*.png"), expected[[paths.index(str(images / f"tile_{i}.png"))
                                                     for i in range(3)]]),
      "PIL images": (pils, expected),
      "one PIL image": (pils[1], expected[1:2]),
      "arrays of mixed sizes": (arrays, None),
      "one array": (arrays[0], None),
      "mixed list": ([paths[0], pils[1], arrays[2]], expected[:3]),
  }
  for kind, (given, want_scores) in kinds.items():
    pred = detector.predict(given, object_name="tile")
    if want_scores is not None:
      np.testing.assert_allclose(pred.scores, want_scores, atol=1e-6, rtol=0, err_msg=kind)
  # Arrays are RGB already; RGBA and gray files go through to_rgb like the
  # reader, so compare arrays with the RGB files only.
  rgb = [i for i, p in enumerate(paths) if Image.open(p).mode == "RGB"]
  pred = detector.predict([arrays[i] for i in rgb], object_name="tile")
  np.testing.assert_allclose(pred.scores, expected[rgb], atol=1e-6, rtol=0)
  assert [m.shape for m in pred.maps] == [arrays[i].shape[:2] for i in rgb]
  assert pred.paths == [None] * len(rgb)
  # A stacked [N, H, W, 3] array of one size.
  tiles = [arrays[paths.index(str(images / f"tile_{i}.png"))] for i in range(3)]
  pred = detector.predict(np.stack(tiles), object_name="tile")
  np.testing.assert_allclose(pred.scores, [want[str(images / f"tile_{i}.png")]
                                           for i in range(3)], atol=1e-6, rtol=0)


def test_object_names_per_image_and_threshold_rule(detector, images, demo_workdir):
  paths = sorted(str(p) for p in images.glob("tile_*.png"))
  pred = detector.predict(paths, object_names=["tile", "nut", "no such object"])
  single = [detector.predict(p, object_name=n).scores[0]
            for p, n in zip(paths, ["tile", "nut", "no such object"])]
  np.testing.assert_allclose(pred.scores, single, atol=1e-6, rtol=0)
  record = thresholds.read(demo_workdir[1])
  cats = record["details"]["per_category"]["family_b"]
  assert pred.thresholds[1] == (cats["nut"]["image"], cats["nut"]["pixel"])
  # A name the evaluation did not see: the file's top-level thresholds.
  assert pred.thresholds[2] == (record["image_threshold"], record["pixel_threshold"])
  assert pred.threshold_source == ["category:family_b/tile", "category:family_b/nut",
                                   "top-level"]
  np.testing.assert_array_equal(
      pred.decisions, [s >= t for s, (t, _) in zip(pred.scores, pred.thresholds)])
  # 0.0 is a threshold; a missing value falls back field by field.
  rec = {"image_threshold": 0.5, "pixel_threshold": 0.4, "method": "f1",
         "details": {"per_category": {"d": {"x": {"image": 0.0, "pixel": None}}}}}
  assert thresholds.resolve(rec, "x") == (0.0, 0.4, "category:d/x")
  assert thresholds.resolve(rec, "y") == (0.5, 0.4, "top-level")
  assert thresholds.resolve(None, "x") == (None, None, "none")
  assert detector.object_names == ["chip", "mesh", "nut", "tile"]


def test_bad_inputs_are_refused(detector, tmp_path):
  with pytest.raises(DetectorError, match="uint8"):
    detector.predict(np.zeros((8, 8, 3), np.float32), object_name="tile")
  with pytest.raises(DetectorError, match="2 names for 1 images"):
    detector.predict(np.zeros((8, 8, 3), np.uint8), object_names=["a", "b"])
  with pytest.raises(DetectorError, match="object name is empty"):
    detector.predict(np.zeros((8, 8, 3), np.uint8), object_name=" ")
  with pytest.raises(DetectorError, match="scoring='fewshot': expected one of zero_shot"):
    detector.predict(np.zeros((8, 8, 3), np.uint8), object_name="a", scoring="fewshot")
  (tmp_path / "bad.png").write_bytes(b"not a png")
  with pytest.raises(DetectorError, match="no readable images.*bad.png"):
    detector.predict(str(tmp_path), object_name="tile")
  with pytest.raises(FileNotFoundError):
    detector.predict(str(tmp_path / "missing"), object_name="tile")


def test_calibrate_and_save_thresholds(demo_workdir, tmp_path):
  _, workdir, data = demo_workdir
  det = Detector.from_workdir(workdir)
  normals = data / "family_b" / "tile" / "test" / "good"
  image_t, pixel_t = det.calibrate(str(normals), 0.75, object_name="tile")
  # Independently: the quantile of the normals' scores from predict.
  pred = det.predict(str(normals), object_name="tile")
  scores = pred.scores.astype(np.float64)
  v = float(np.quantile(scores, 0.75, method="higher"))
  # Between the quantile and the next higher normal score (never on a score).
  above = scores[scores > v]
  assert v < image_t and (above.size == 0 or image_t < above.min())
  assert pred.thresholds[0] == (image_t, pixel_t)
  assert pred.decisions.sum() <= np.ceil(0.25 * len(pred) + 1e-9)
  np.testing.assert_array_equal(pred.decisions, scores > v)
  # mode=predict's calibration (on a copy of the workdir) chooses the same thresholds.
  cfg = demo_workdir[0].copy_and_resolve_references()
  copy = tmp_path / "work"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("predictions*"))
  cfg.mode = "predict"
  cfg.predict.input = ""
  cfg.predict.calibrate_normals = str(normals)
  cfg.predict.calibrate_quantile = 0.75
  cfg.predict.object_name = "tile"
  experiment.run(cfg, str(copy))
  by_predict = thresholds.read(copy)
  assert abs(by_predict["image_threshold"] - image_t) <= 1e-6
  assert abs(by_predict["pixel_threshold"] - pixel_t) <= 1e-6
  written = det.save_thresholds(tmp_path)
  record = thresholds.read(written)
  assert record["dataset"] == by_predict["dataset"] == f"normals:{normals}"
  thresholds.check(record, image_score=det.scorer.model.image_score,
                   model=det.scorer.threshold_model())
  assert (record["image_threshold"], record["pixel_threshold"]) == (image_t, pixel_t)
  assert record["method"] == "normal-quantile 0.75"
  assert oct(os.stat(written).st_mode & 0o777) == oct(0o666 & ~_umask())
  with pytest.raises(DetectorError, match="nothing calibrated"):
    det.save_thresholds(tmp_path)


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_thresholds_of_another_head_are_refused(demo_workdir, tmp_path):
  _, workdir, _ = demo_workdir
  copy = tmp_path / "work"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("predictions*"))
  record = thresholds.read(copy)
  model = dict(record["model"], head_sha256="0" * 64)
  thresholds.write(copy, dataset="x", image_score=record["image_score"],
                   checkpoint_step=0, model=model, image=0.5)
  with pytest.raises(thresholds.ThresholdError, match="another model .*head_sha256"):
    Detector.from_workdir(copy)


def test_from_config_and_light_import(demo_workdir, detector, images):
  cfg, workdir, _ = demo_workdir
  cfg = cfg.copy_and_resolve_references()
  cfg.workdir = str(workdir)
  det = Detector.from_config(cfg)
  paths = sorted(str(p) for p in images.glob("tile_*.png"))
  np.testing.assert_allclose(det.predict(paths, object_name="tile").scores,
                             detector.predict(paths, object_name="tile").scores,
                             atol=1e-6, rtol=0)
  # `import adjax` stays light: the Detector (and JAX) load on first use.
  done = subprocess.run(
      [sys.executable, "-c", "import sys, adjax; assert 'jax' not in sys.modules; "
       "assert 'adjax.detector' not in sys.modules; from adjax import Detector"],
      env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr


def test_init_from_run_decides_with_the_trained_runs_thresholds(demo_workdir, tmp_path):
  """As mode=predict: a workdir started with init_from and no thresholds.json
  of its own decides with the trained run's (checked against the head)."""
  cfg, workdir, _ = demo_workdir
  cfg = cfg.copy_and_resolve_references()
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  cfg.workdir = str(fresh)
  cfg.init_from = str(workdir)
  det = Detector.from_config(cfg)
  assert det.thresholds_path == Workdir(workdir).thresholds
  want = thresholds.resolve(thresholds.read(workdir), "tile")
  assert det.thresholds_for("tile") == want and want.source == "category:family_b/tile"
  pred = det.predict(np.zeros((20, 30, 3), np.uint8), object_name="tile")
  assert pred.thresholds[0] == (want.image, want.pixel)
  # Its own thresholds.json, once there, comes first.
  record = thresholds.read(workdir)
  thresholds.write(fresh, dataset="own", image_score=record["image_score"],
                   checkpoint_step=0, model=record["model"], image=0.123)
  det = Detector.from_config(cfg)
  assert det.thresholds_path == Workdir(fresh).thresholds
  assert det.thresholds_for("tile") == (0.123, None, "top-level")


def test_overrides_and_missing_checkpoint(demo_workdir, tmp_path):
  _, workdir, _ = demo_workdir
  det = Detector.from_workdir(workdir, predict__threshold=0.25)
  pred = det.predict(np.zeros((20, 30, 3), np.uint8), object_name="tile")
  assert pred.thresholds[0][0] == 0.25 and pred.threshold_source == ["predict.threshold"]
  from adjax.config import check as config_check
  from adjax.config import load as run_config
  with pytest.raises(run_config.RunConfigError, match="no field 'predict.nope'"):
    Detector.from_workdir(workdir, **{"predict.nope": 1})
  (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
  with pytest.raises(config_check.ConfigError, match="no trained checkpoint"):
    Detector.from_workdir(tmp_path)


@pytest.mark.slow
def test_same_scores_as_the_onnx_export(demo_workdir, detector, images, tmp_path):
  ort = pytest.importorskip("onnxruntime")
  pytest.importorskip("jax2onnx")
  from adjax import export
  from adjax.data import images as data_images
  _, workdir, _ = demo_workdir
  out = tmp_path / "model.onnx"
  export.export(workdir, ["tile"], "onnx", out)
  so = ort.SessionOptions()
  so.log_severity_level = 3
  sess = ort.InferenceSession(str(out), so)
  paths = sorted(str(p) for p in images.iterdir())
  batch = np.stack([data_images.preprocess_image(Image.open(p), SIZE) for p in paths])
  amap, score = sess.run(["anomaly_map", "image_score"], {"images": batch, "object_index": np.zeros(len(paths), np.int32)})
  pred = detector.predict(paths, object_name="tile")
  assert float(np.max(np.abs(score - pred.scores))) <= 1e-4
  from adjax.detector import map_at
  for i, p in enumerate(paths):
    assert float(np.max(np.abs(map_at(amap[i], pred.maps[i].shape) - pred.maps[i]))) <= 1e-4


def _run_example(code: str, demo_workdir, tmp_path) -> str:
  """A documented example, with its workdir and image folder pointed at the test's."""
  _, workdir, data = demo_workdir
  code = code.replace("runs/demo", str(workdir)).replace(
      "data/demo/family_b/tile/test", str(data / "family_b" / "tile" / "test")).replace(
      # The test's small demo data has no train split: its good test images.
      "data/demo/family_b/tile/train/good", str(data / "family_b" / "tile" / "test" / "good"))
  (tmp_path / "example.py").write_text(code)
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_docs_python_example_runs(demo_workdir, tmp_path):
  """docs/api.md's example runs as written (paths pointed at the test's)."""
  out = _run_example(doc_blocks.block("docs/api.md", "Detector.from_workdir"), demo_workdir,
                     tmp_path)
  assert "tile" in out and "score" in out


def test_readme_python_example_runs(demo_workdir, detector, tmp_path):
  """README.md's three lines print the Detector's scores of the tile folder."""
  out = _run_example(doc_blocks.block("README.md", "Detector.from_workdir"), demo_workdir,
                     tmp_path)
  want = detector.predict(str(demo_workdir[2] / "family_b" / "tile" / "test"),
                          object_name="tile").scores
  got = np.array([float(x) for x in re.findall(r"[-+]?\d*\.\d+(?:e[-+]?\d+)?", out)])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_predict_module_has_no_scoring_of_its_own():
  """mode=predict's scoring, batching, map resizing and threshold choice are
  the Detector's: adjax/predict.py calls none of the lower layers itself."""
  source = (ROOT / "adjax" / "predict.py").read_text()
  for name in ("Scorer", "scorer.", "prediction_batches", "load_for_prediction",
               ".maps(", "text_table", "resize(", "thresholds.resolve", "thresholds.read",
               "quantile_threshold", "Image.open"):
    assert name not in source, name
  assert "det.predict(" in source and "det.calibrate(" in source


# ---- neighbour scoring modes (few_shot, batch) ----------------------------
@pytest.fixture(scope="module")
def head_free(demo_workdir, tmp_path_factory):
  """A Detector for the neighbour modes over a folder with no checkpoint and a
  text checkpoint that does not exist: neither the head nor the text tower is built."""
  _, workdir, _ = demo_workdir
  bare = tmp_path_factory.mktemp("head_free")
  (bare / "config.json").write_text((workdir / "config.json").read_text())
  return Detector.from_workdir(bare, predict__scoring="few_shot", text__random_init=False,
                               text__checkpoint="/nonexistent/text")


def test_head_free_detector_scores_few_shot_against_its_references(
    head_free, detector, images, demo_workdir):
  assert head_free.scorer is None and head_free.towers.text_embed is None
  assert head_free.scoring_modes == ("few_shot", "batch")
  with pytest.raises(DetectorError, match="needs a trained head"):
    head_free.predict(str(images), object_name="tile", scoring="zero_shot")
  with pytest.raises(DetectorError, match="call use_references"):
    head_free.predict(str(images), scoring="few_shot")
  with pytest.raises(DetectorError, match="call use_references"):   # its default mode
    head_free.predict(str(images))
  with pytest.raises(DetectorError, match="calibrate.*no head"):
    head_free.calibrate(str(images))
  paths = sorted(str(p) for p in images.iterdir())
  refs = paths[:2]
  assert head_free.use_references(refs) == 2
  pred = head_free.predict(paths, scoring="few_shot")
  # A reference given as input has its own patches in the bank: score 0.
  assert float(pred.scores[:2].max()) < 2e-3, pred.scores
  assert float(pred.scores[2:].min()) > 1e-2, pred.scores
  assert [m.shape for m in pred.maps] == _sizes(paths)
  # No decisions: no few-shot record (thresholds.json is the zero-shot head's).
  assert pred.decisions is None and pred.threshold_source == ["none"] * len(paths)
  # One image at a time gives the same numbers as the folder in one call.
  for i in (0, 4):
    one = head_free.predict(paths[i], scoring="few_shot")
    np.testing.assert_allclose(one.scores, pred.scores[i:i + 1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(one.maps[0], pred.maps[i], atol=1e-5, rtol=0)
  # The trained Detector scores few_shot alike (its head is not used).
  detector.use_references(refs)
  same = detector.predict(paths, object_name="tile", scoring="few_shot")
  np.testing.assert_allclose(same.scores, pred.scores, atol=1e-5, rtol=0)
  assert same.decisions is None


def test_batch_mode_and_the_threshold_override(head_free, images, demo_workdir):
  paths = sorted(str(p) for p in images.iterdir())
  assert len(paths) >= 5
  pred = head_free.predict(paths, scoring="batch")
  assert len(pred) == len(paths) and np.all(np.isfinite(pred.scores))
  # Scored together: the order of the images does not change any image's score.
  order = [3, 0, 5, 1, 4, 2][:len(paths)]
  shuffled = head_free.predict([paths[i] for i in order], scoring="batch")
  np.testing.assert_allclose(shuffled.scores, pred.scores[order], atol=1e-5, rtol=0)
  with pytest.raises(DetectorError, match="needs at least 5; got 4"):
    head_free.predict(paths[:4], scoring="batch")
  _, workdir, _ = demo_workdir
  det = Detector.from_workdir(head_free.workdir, predict__scoring="batch",
                              predict__threshold=0.05)
  decided = det.predict(paths, scoring="batch")
  np.testing.assert_allclose(decided.scores, pred.scores, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(decided.decisions, decided.scores >= 0.05)
  assert decided.threshold_source == ["predict.threshold"] * len(paths)


def test_batch_subsets_score_each_image_within_its_subset(head_free, demo_workdir):
  """eval.batch_subset=5 over 10 images: each image's score and map are those
  of its subset scored alone as a batch (RsCIN off), not the whole call's.
  Fails if the Detector ignores eval.batch_subset or puts a subset's maps on
  other images."""
  from adjax import neighbors
  _, _, data = demo_workdir
  paths = sorted(str(p) for p in (data / "family_b").rglob("test/*/*.png"))[:10]
  assert len(paths) == 10
  before = head_free.cfg
  try:
    # The resolved config is frozen: a variant is a replacement.
    head_free.cfg = schema.replace(before, **{"eval.rscin_k": (0,), "eval.batch_subset": 5})
    pred = head_free.predict(paths, scoring="batch")
    head_free.cfg = schema.replace(head_free.cfg, **{"eval.batch_subset": 0})
    for idx in neighbors.subsets(10, 5):
      alone = head_free.predict([paths[i] for i in idx], scoring="batch")
      np.testing.assert_allclose(pred.scores[idx], alone.scores, atol=1e-5, rtol=0)
      for k, i in enumerate(idx):
        np.testing.assert_allclose(pred.maps[i], alone.maps[k], atol=1e-5, rtol=0)
    whole = head_free.predict(paths, scoring="batch")
    assert float(np.abs(whole.scores - pred.scores).max()) > 1e-3
  finally:
    head_free.cfg = before


def test_the_config_chooses_the_mode_scored_by_default(demo_workdir, images):
  """predict.scoring (few_shot in configs/demo.py) is the mode predict()
  scores in when none is named: it asks for references first, then gives
  the few_shot scores. Fails if the default stays zero_shot."""
  _, workdir, data = demo_workdir
  det = Detector.from_workdir(workdir, predict__scoring="few_shot")
  assert det.default_scoring == "few_shot" and det.scoring_modes == ("few_shot", "batch")
  with pytest.raises(DetectorError, match="use_references"):
    det.predict(str(images), object_name="tile")
  refs = sorted((data / "family_b" / "tile" / "test" / "good").glob("*.png"))[:2]
  det.use_references([str(p) for p in refs])
  np.testing.assert_array_equal(
      det.predict(str(images), object_name="tile").scores,
      det.predict(str(images), object_name="tile", scoring="few_shot").scores)
