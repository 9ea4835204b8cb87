"""Bad input, round 4: inputs a new or careless user gives predict, export,
the data readers and the Detector, on a tiny imported head (fast tier).

Each test names the mutation it catches ("Fails if ...")."""

import csv
import errno
import io
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from adjax.config import load as run_config
from adjax import experiment, export
from adjax.workdir import thresholds
from adjax import predict as predict_lib
from adjax.common import atomic, errors
from adjax.config import check as config_check
from adjax.data import images as data_images
from adjax.data import layouts
from adjax.detector import Detector, DetectorError
from adjax.workdir import Workdir

sys.path.insert(0, str(Path(__file__).parent))
from export_test import run_dir  # noqa: E402,F401  (the fixture: a tiny imported head)


def _img(path, size=(20, 20), seed=0):
  rng = np.random.default_rng(seed)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
      path, format="PNG")


@pytest.fixture(scope="module")
def work(run_dir, tmp_path_factory):
  """A copy of the imported head's workdir, for this module's thresholds files."""
  root = tmp_path_factory.mktemp("bad_input")
  shutil.copytree(run_dir, root / "run")
  return root / "run"


def _predict(workdir, src, name="bottle", **extra):
  cfg = run_config.from_workdir(workdir)
  cfg.mode = "predict"
  cfg.predict.input = str(src)
  cfg.predict.object_name = name
  for k, v in extra.items():
    node = cfg
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return experiment.run(cfg, str(workdir))


def _csv_rows(workdir):
  with open(Workdir(workdir).predictions / "scores.csv", newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def detector(work):
  return Detector.from_workdir(work)


# ---- predict's outputs ------------------------------------------------------
FORMULAS = ["=cmd|' -C calc'!A0.png", "+1.png", "-2.png", "@3.png"]
LONG_A, LONG_B = "a" * 236 + ".png", "a" * 235 + "b.png"
LINKED = ["h#1.png", "q?.png", "p%41.png", "s p.png"]


@pytest.fixture(scope="module")
def tricky(work, tmp_path_factory):
  """One predict run (a relative glob, from a demo config's data.demo.root)
  over a folder of the names and files a careless user has: formula-like
  names, #?% and spaces, two 240-character names, a newline and a tab in
  unreadable files' names, a NaN float TIFF, .gif / .svg / .heic files.
  Returns (result, console, copy of predictions/, the input folder, demo
  preparations run)."""
  import contextlib
  root = tmp_path_factory.mktemp("tricky")
  src = root / "in"
  for i, n in enumerate(FORMULAS + LINKED + [LONG_A, LONG_B, "plain.png"]):
    _img(src / n, seed=i)
  (src / "bad\nname.png").write_bytes(b"not a png")
  (src / "tab\tname.png").write_bytes(b"not a png")
  nan = np.random.default_rng(0).random((16, 16)).astype(np.float32)
  nan[3, 4] = np.nan
  Image.fromarray(nan, "F").save(src / "nan.tif")
  Image.new("RGB", (8, 8)).save(src / "b.gif")
  (src / "c.svg").write_text("<svg/>")
  (src / "d.heic").write_bytes(b"\0" * 16)
  demos, out = [], io.StringIO()
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(src)                     # a relative input: the paths start with the names
    mp.setattr(experiment, "_ensure_demo_data", demos.append)
    with contextlib.redirect_stdout(out):
      result = _predict(work, "*", **{"data.demo.root": str(root / "data" / "demo")})
  shutil.copytree(Workdir(work).predictions, root / "predictions")
  return result, out.getvalue(), root / "predictions", src, demos


def test_scores_csv_never_holds_a_formula(tricky):
  """A file name a spreadsheet would run (=, +, -, @) is written as text.
  Fails if scores.csv cells are written as given."""
  with open(tricky[2] / "scores.csv", newline="") as f:
    paths = {r["path"] for r in csv.DictReader(f)}
  assert {"'" + n for n in FORMULAS} <= paths and "plain.png" in paths
  assert not [p for p in paths if p[0] in "=+-@"]
  for cell in ("\tx", "\rx", "=1+1", "@SUM(A1)"):
    assert predict_lib.csv_cell(cell) == "'" + cell
  assert predict_lib.csv_cell("a=b") == "a=b"


def test_predict_prepares_no_data_set(tricky):
  """predict.input beside a demo config: the demo data are not generated.
  Fails if mode=predict runs the demo data preparation."""
  result, _, _, src, demos = tricky
  assert demos == [] and not (src.parent / "data").exists()
  assert len(result["scores"]) == len(FORMULAS + LINKED) + 3


def test_files_skipped_by_extension_are_counted_and_listed(tricky):
  """.gif / .svg / .heic files of the input are said and listed.
  Fails if the folder walk drops them without a word."""
  _, console, out, _, _ = tricky
  assert "skipped 3 files whose extension is not an image's" in console
  assert ".gif: 1" in console and ".heic: 1" in console and ".svg: 1" in console
  listed = [l.split("\t") for l in (out / "unreadable.txt").read_text().splitlines()]
  assert sorted(p for p, why in listed if why.startswith("skipped")) == [
      "b.gif", "c.svg", "d.heic"]


def test_unreadable_name_with_a_newline_is_one_line(tricky):
  """Fails if unreadable.txt writes a name's newline (or tab) as it is."""
  lines = (tricky[2] / "unreadable.txt").read_text().splitlines()
  assert len(lines) == 6              # 2 bad names, the NaN TIFF, 3 skipped
  assert sum(l.startswith("bad\\nname.png\t") for l in lines) == 1
  assert sum(l.startswith("tab\\tname.png\t") for l in lines) == 1


def test_index_html_links_names_with_hash_question_mark_percent(tricky):
  """Every <img src> of predictions/index.html, URL-decoded, is a file there.
  Fails if the links are HTML-escaped only."""
  import html
  import re
  out = tricky[2]
  srcs = re.findall(r'src="([^"]+)"', (out / "index.html").read_text())
  assert len(srcs) == len(tricky[0]["scores"])
  for s in srcs:
    assert (out / unquote(html.unescape(s))).is_file(), s


def test_long_file_name_is_predicted(tricky):
  """Two 240-character names: their outputs get a shortened, hashed name that
  fits the file system, and stay apart.
  Fails if the output keeps the whole name (the temporary's name is too long)."""
  result, _, out, src, _ = tricky
  heat = {r["path"]: r["heatmap"] for r in result["scores"]}
  a, b = heat[LONG_A], heat[LONG_B]
  assert a != b and heat["plain.png"] == "heatmaps/plain.png.png"
  for h in (a, b):
    assert (out / h).is_file() and len(Path(h).name.encode()) <= atomic.longest_name(src)
    assert h.startswith("heatmaps/aaaa") and h.endswith(".png")
  assert predict_lib._output_name(LONG_A, "") == a[len("heatmaps/"):]   # stable


def test_nan_float_images_are_refused_or_skipped(detector, tricky):
  """A mode-F image with NaN pixels: refused in memory (as NaN arrays are),
  skipped and counted from a folder.
  Fails if the decode's finite check is removed."""
  nan = np.full((16, 16), np.nan, np.float32)
  part = np.random.default_rng(0).random((16, 16)).astype(np.float32)
  part[3, 4] = np.nan
  for a in (nan, part):
    with pytest.raises(DetectorError, match="NaN or infinite"):
      detector.predict(Image.fromarray(a, "F"), object_name="bottle")
  why = dict(tricky[0]["unreadable"])["nan.tif"]
  assert "1 of its 256 pixels are NaN" in why


def test_empty_array_is_refused(detector):
  """Fails if a 0 x 0 array reaches PIL (its bare ValueError)."""
  for shape in ((0, 0, 3), (0, 5, 3), (0, 8, 8, 3)):
    with pytest.raises(DetectorError, match="at least one pixel"):
      detector.predict(np.zeros(shape, np.uint8), object_name="bottle")


def test_empty_category_folder_is_named(tmp_path):
  """Fails if a category folder without images vanishes from the records."""
  _img(tmp_path / "root" / "tile" / "test" / "good" / "0.png")
  (tmp_path / "root" / "wood" / "test" / "good").mkdir(parents=True)
  with pytest.raises(layouts.DataError, match=r"1 category without images: .*wood"):
    layouts.scan_mvtec(tmp_path / "root", masks_optional=True)


def test_workdir_skip_is_by_folder_not_by_prefix(tmp_path):
  """Images in a sibling folder `run2` are inputs for workdir `run`.
  Fails if the workdir rule compares path strings by prefix."""
  _img(tmp_path / "run" / "predictions" / "x.png")
  _img(tmp_path / "run2" / "y.png")
  excluded = []
  paths, _ = data_images.read_image_folder(tmp_path, exclude=[tmp_path / "run"],
                                           excluded=excluded)
  assert [Path(p).name for p in paths] == ["y.png"]
  assert [Path(p).name for p in excluded] == ["x.png"]


# ---- the config and the text tower, before any work -------------------------
def test_predict_threshold_must_be_finite():
  """Fails if predict.threshold=nan passes the config check (and is then ignored)."""
  from adjax.config import defaults
  for bad in (float("nan"), float("inf")):
    cfg = defaults.base_config()
    cfg.predict.threshold = bad
    found = config_check.problems(cfg)
    assert any(p.startswith("predict.threshold=") and "finite" in p for p in found)
  cfg = defaults.base_config()
  cfg.predict.threshold = 0.25
  assert not any(p.startswith("predict.threshold") for p in config_check.problems(cfg))


def test_object_name_longer_than_the_context_refused_before_work(detector, work, tmp_path,
                                                                  monkeypatch):
  """Fails if the name's token length is found only at the first batch."""
  long_name = " ".join(["word"] * 80)
  with pytest.raises(DetectorError, match="more than the text tower's context"):
    detector.predict(np.zeros((8, 8, 3), np.uint8), object_name=long_name)
  from adjax import data
  monkeypatch.setattr(data, "read_image_folder",
                      lambda *a, **k: pytest.fail("images read before the name was checked"))
  with pytest.raises(predict_lib.PredictError, match="predict.object_name: .*context"):
    _predict(work, tmp_path, name=long_name)


# ---- the environment --------------------------------------------------------
def test_read_only_file_system_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
  """EROFS (not EACCES): one line for a command, and export's --out is
  checked before the export's work.
  Fails if EROFS is left to a traceback."""
  e = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run" / ".adjax.lock"))
  msg = errors.environment_error(e)
  assert msg and msg.startswith(f"{e.filename}: read-only file system")

  def boom():
    raise e
  rc, _ = errors.run_command(boom)
  err = capsys.readouterr().err
  assert rc == errors.EXIT_USER_ERROR and err.count("\n") == 1 and "read-only" in err
  import tempfile

  def read_only(*a, **k):
    raise OSError(errno.EROFS, "Read-only file system")
  monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
  monkeypatch.setattr(export, "build", lambda *a, **k: pytest.fail("built before --out"))
  pytest.importorskip("flatbuffers")
  with pytest.raises(export.ExportError, match="cannot write in .*Read-only file system"):
    export.export(run_dir, ["bottle"], "stablehlo", tmp_path / "m.hlo")


def test_export_takes_the_workdir_lock(run_dir, tmp_path, monkeypatch):
  """A training run holding the workdir: export refuses before reading a step.
  Fails if export reads checkpoints without the workdir's lock."""
  from adjax.workdir.lock import WorkdirBusyError, WorkdirLock
  pytest.importorskip("flatbuffers")
  monkeypatch.setattr(export, "build", lambda *a, **k: pytest.fail("read while locked"))
  with WorkdirLock(run_dir, log=lambda *a: None):
    with pytest.raises(WorkdirBusyError, match="in use by process"):
      export.export(run_dir, ["bottle"], "stablehlo", tmp_path / "m.hlo")
  assert not Workdir(run_dir).lock.exists()


def test_thresholds_of_a_damaged_step_say_so():
  """The newest step damaged, an earlier one restored: the refusal names both
  steps and what to do. Fails if it says only "made for another model"."""
  model = {"head_sha256": "a" * 64, "backbone": "b"}
  record = {"image_score": "mean", "model": model, "checkpoint_step": 40,
            "_path": "run/thresholds.json"}
  with pytest.raises(thresholds.ThresholdError,
                     match=r"belong to checkpoint step 40, this head is step 30 .*damaged"):
    thresholds.check(record, image_score="mean", model=dict(model, head_sha256="c" * 64),
                     head_step=30)
  with pytest.raises(thresholds.ThresholdError, match="another model .*backbone"):
    thresholds.check(record, image_score="mean", model=dict(model, backbone="x",
                                                            head_sha256="c" * 64),
                     head_step=30)


# ---- the Detector's decisions and batch mode --------------------------------
def _arrays(n, seed=0, size=24):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (size, size + 4 * i, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def per_object(work, detector):
  """thresholds.json with two objects of different image thresholds, written
  for this head; a Detector that reads it."""
  imgs = _arrays(4, seed=3)
  bottle = detector.predict(imgs, object_name="bottle").scores
  screw = detector.predict(imgs, object_name="screw").scores
  limits = {"bottle": float(np.median(bottle)), "screw": float(np.median(screw)) + 1.0}
  thresholds.write(work, dataset="unit", image_score=detector.model.image_score,
                   checkpoint_step=0, model=detector.scorer.threshold_model(),
                   image=123.0, pixel=0.5,
                   details={"per_category": {"unit": {
                       n: {"image": t, "pixel": 0.5} for n, t in limits.items()}}})
  try:
    yield Detector.from_workdir(work), imgs, limits
  finally:
    Workdir(work).thresholds.unlink()


def test_each_image_is_decided_with_its_own_objects_threshold(per_object):
  """object_names per image; ' bottle' and 'SCREW' are read as the text tower
  reads them (the same prompts), so they take their category's threshold.
  Fails if every image takes the first image's threshold, or if the lookup
  does not normalise the name as the text tower does."""
  det, imgs, limits = per_object
  names = ["screw", "bottle", " bottle", "SCREW "]
  pred = det.predict(imgs, object_names=names)
  want = [limits["screw"], limits["bottle"], limits["bottle"], limits["screw"]]
  assert [t for t, _ in pred.thresholds] == want
  assert pred.threshold_source == ["category:unit/screw", "category:unit/bottle",
                                   "category:unit/bottle", "category:unit/screw"]
  np.testing.assert_array_equal(pred.decisions, pred.scores >= np.array(want))
  each = []
  det.predict(imgs, object_names=names, each=lambda r: each.append(r.threshold))
  assert each == want
  assert det.thresholds_for("tiles").source == "top-level"    # another word is another object


def test_a_score_equal_to_its_threshold_is_anomalous(work, detector):
  """The rule is score >= threshold, on every path of the Detector.
  Fails if a decision uses > (no other test has a score equal to its threshold)."""
  imgs = _arrays(3, seed=5)
  scores = detector.predict(imgs, object_name="bottle").scores
  at = float(scores[1])
  assert at >= 0
  det = Detector.from_workdir(work, predict__threshold=at)
  seen = []
  pred = det.predict(imgs, object_name="bottle", each=lambda r: seen.append(r.decision))
  assert float(pred.scores[1]) == at
  assert bool(pred.decisions[1]) and seen[1] is True
  np.testing.assert_array_equal(pred.decisions, pred.scores >= np.float32(at))


@pytest.fixture(scope="module")
def batch_detectors(work):
  return {b: Detector.from_workdir(work, predict__scoring="batch", predict__batch_size=b)
          for b in (8, 16)}


def test_batch_scores_do_not_depend_on_the_batch_size(batch_detectors):
  """5 images scored against each other at predict.batch_size 8 and 16 (3
  and 11 padding rows): the same maps and scores (1e-5; 0 measured).
  Fails if the last chunk's padding rows join the mutual scoring."""
  imgs = _arrays(5, seed=7)
  a = batch_detectors[8].predict(imgs, scoring="batch")
  b = batch_detectors[16].predict(imgs, scoring="batch")
  np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
  for x, y in zip(a.maps, b.maps):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_rscin_k_above_the_images_is_refused_before_work(work, monkeypatch):
  """MuSc's VisA eval.rscin_k (1, 8, 9) on 5 images: one line, no backbone pass.
  Fails if RsCIN's k is checked only inside refine_scores."""
  det = Detector.from_workdir(work, predict__scoring="batch", eval__rscin_k=(1, 8, 9))
  monkeypatch.setattr(det, "_tokens", lambda batch: pytest.fail("backbone ran"))
  with pytest.raises(DetectorError, match=r"eval.rscin_k=\(1, 8, 9\): give at least 9 "):
    det.predict(_arrays(5), scoring="batch")


def test_export_says_which_step_it_exported(run_dir, tmp_path, monkeypatch, capsys):
  """Fails if the command's last line does not name the checkpoint step."""
  meta = {"bytes": 2**20, "object_names": ["bottle"], "image_size": 32,
          "checkpoint_step": 1035, "image_thresholds": [None]}
  monkeypatch.setattr(export, "export", lambda *a, **k: meta)
  rc = export.main(["--workdir", str(run_dir), "--object-names", "bottle", "--format",
                    "stablehlo", "--out", str(tmp_path / "m.hlo")])
  assert rc == 0 and "checkpoint step 1035" in capsys.readouterr().out


def test_every_target_is_checked_before_the_first_is_scored(monkeypatch, tmp_path):
  """A second data set that cannot be scored (e.g. eval.rscin_k above its
  smallest category) stops the evaluation before the first one's work.
  Fails if each data set is checked only when its turn comes."""
  import types
  from adjax import evaluate
  from adjax.config import defaults
  scored = []

  class Scorer:
    def check(self, handle):
      if handle.display_name == "b":
        raise config_check.ConfigError("b: too small")

  class FakeEvaluator:
    def __init__(self, cfg, workdir, scorer, source):
      self.scorer = scorer

    def evaluate(self, handle):
      scored.append(handle.display_name)
      return {}

  monkeypatch.setattr(evaluate, "ZeroShotScorer", lambda *a: Scorer())
  monkeypatch.setattr(evaluate, "Evaluator", FakeEvaluator)
  monkeypatch.setattr(evaluate.datasets, "prepare",
                      lambda cfg, target: types.SimpleNamespace(display_name=target))
  cfg = defaults.base_config()
  cfg.data.targets = "a,b"
  with pytest.raises(config_check.ConfigError, match="b: too small"):
    evaluate.evaluate_targets(cfg, tmp_path, None, None, None, source=(tmp_path, 0))
  assert scored == []


def test_detector_lists_a_folders_skipped_files(detector, tmp_path):
  """Detector.predict(folder) lists what the folder walk skips, as predict does.
  Fails if files of another extension are dropped without a word."""
  _img(tmp_path / "a.png")
  (tmp_path / "b.svg").write_text("<svg/>")
  pred = detector.predict(str(tmp_path), object_name="bottle")
  assert len(pred) == 1
  assert [(Path(p).name, why.split(":")[0]) for p, why in pred.unreadable] == [
      ("b.svg", "skipped")]


def test_predict_names_the_step_its_thresholds_belong_to(run_dir, detector, tmp_path):
  """thresholds.json of a newer step (damaged, so step 0 was restored): predict
  and the Detector say which steps, not only "another model".
  Fails if the head's step does not reach the thresholds check."""
  work = tmp_path / "run"
  shutil.copytree(run_dir, work)
  model = dict(detector.scorer.threshold_model(), head_sha256="0" * 64)
  thresholds.write(work, dataset="unit", image_score=detector.model.image_score,
                   checkpoint_step=5, model=model, image=0.5)
  said = r"belong to checkpoint step 5, this head is step 0 \(step 5 is newer .*damaged"
  with pytest.raises(thresholds.ThresholdError, match=said):
    Detector.from_workdir(work)
  _img(tmp_path / "in" / "a.png")
  with pytest.raises(thresholds.ThresholdError, match=said):
    _predict(work, tmp_path / "in")
