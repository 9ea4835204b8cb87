"""Scoring modes in evaluation (adjax.scoring_modes): checks before work, the
reference choice, and the demo's floors per mode (slow tier)."""

import importlib.util
import json
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from adjax import modes, scoring_modes
from adjax.report import comparison
from adjax.common.errors import UserError as UserErrorTypes
from adjax.config import check as config_check

import demo_run
import doc_blocks

ROOT = Path(__file__).resolve().parent.parent

# The demo (random towers, family b, no training) per mode: README.md's and docs/scoring-modes.md's
# Scoring modes table; issue floors.
BATCH_PIXEL_FLOOR, BATCH_IMAGE_FLOOR, FEW_SHOT_PIXEL_FLOOR = 0.85, 0.70, 0.85


def demo_config():
  """configs/demo.py without its showcase (`demo_run.without_showcase`)."""
  return demo_run.without_showcase(demo_run.demo_config())


def _handle(counts: dict[str, tuple[int, int]]):
  """A stand-in data set handle: category -> (good, defective) images."""
  cats, labels = [], []
  for ci, (good, bad) in enumerate(counts.values()):
    cats += [ci] * (good + bad)
    labels += [0] * good + [1] * bad
  return types.SimpleNamespace(categories=list(counts), display_name="target",
                               example_category=np.array(cats),
                               example_label=np.array(labels))


def test_config_check_names_bad_mode_values():
  cfg = demo_config()
  cfg.mode = "evaluate"
  cfg.eval.scoring = "fewshot"
  cfg.eval.references = -1
  cfg.eval.r_list = (1, 2)
  cfg.eval.combine = "sum"
  found = "\n".join(config_check.problems(cfg))
  for field in ("eval.scoring='fewshot'", "eval.references=-1", "eval.r_list=(1, 2)",
                "eval.combine='sum'"):
    assert field in found, found


def test_config_check_references_all_and_train_split():
  """eval.references=0 (all) needs a bank outside the test split; the train
  split is a few_shot setting, and not beside eval.references_dir."""
  cfg = demo_config()
  cfg.mode, cfg.eval.scoring, cfg.eval.references = "evaluate", "few_shot", 0
  assert any("eval.references=0 (all) leaves no test image" in p
             for p in config_check.problems(cfg))
  cfg.eval.references_split = "train"
  assert not any("references" in p for p in config_check.problems(cfg))
  cfg.eval.references_dir = "refs/{category}"
  assert any("both set" in p for p in config_check.problems(cfg))
  cfg.eval.references_dir, cfg.eval.scoring = "", "batch"
  assert any("eval.references_split=train is set but eval.scoring='batch'" in p
             for p in config_check.problems(cfg))
  cfg.eval.references_split, cfg.eval.scoring, cfg.mode = "test", "batch", "build_bank"
  assert any("mode=build_bank builds the few_shot bank" in p
             for p in config_check.problems(cfg))


def test_head_free_modes_need_no_text_checkpoint():
  cfg = demo_config()
  cfg.mode = "evaluate"
  cfg.text.random_init = False
  cfg.text.checkpoint = "/nonexistent/text"
  cfg.eval.scoring = "batch"
  assert not [p for p in config_check.problems(cfg) if "text" in p]
  cfg.eval.scoring = "zero_shot+batch"
  # With a hub id the missing tower is fetched at start; without one it is a problem.
  assert not [p for p in config_check.problems(cfg) if "text" in p]
  cfg.text.hub_id = ""
  assert [p for p in config_check.problems(cfg) if "text.checkpoint" in p]


def test_problems_refuse_small_categories_and_too_many_references():
  cfg = demo_config()
  handle = _handle({"ok": (3, 3), "small": (2, 2)})
  cfg.eval.scoring = "batch"
  found = scoring_modes.problems(cfg, handle)
  assert found == ["eval.scoring=batch scores each image against the other images of "
                   "its category and needs at least 5 per category; target has fewer in "
                   "small (4)"]
  cfg.eval.scoring = "zero_shot+few_shot"
  cfg.eval.references = 3
  found = scoring_modes.problems(cfg, handle)
  assert found == ["eval.references=3 needs at least 4 good images per category (k "
                   "references and one left to score); target has fewer in ok (3), "
                   "small (2)"]
  cfg.eval.references = 1
  assert scoring_modes.problems(cfg, handle) == []


def test_references_are_good_images_of_the_category_and_fixed():
  handle = _handle({"a": (6, 4), "b": (5, 5)})
  first = scoring_modes.choose_references(handle, 1, 3)
  assert len(first) == 3 and np.all(handle.example_category[first] == 1)
  assert np.all(handle.example_label[first] == 0)
  np.testing.assert_array_equal(first, scoring_modes.choose_references(handle, 1, 3))


def test_normalise_and_upsample():
  x = np.array([[1.0, 3.0], [5.0, 7.0]], np.float32)
  np.testing.assert_allclose(scoring_modes.normalise(x, "minmax"), (x - 1) / 6)
  z = scoring_modes.normalise(x, "zscore")
  assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-6
  up = scoring_modes.upsample(x[None], (3, 3))[0]
  # align_corners=True: the corners are the grid values, the centre their mean.
  np.testing.assert_allclose(up[[0, 0, 2, 2], [0, 2, 0, 2]], [1, 3, 5, 7], rtol=1e-6)
  np.testing.assert_allclose(up[1, 1], 4.0, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("scoring", ["batch", "few_shot"])
def test_demo_neighbour_modes_reach_their_floors(tmp_path, scoring):
  """docs/scoring-modes.md's command of one mode on a fresh workdir, with the
  text tower made absent: no training, no text weights."""
  documented = doc_blocks.commands(doc_blocks.block(
      "docs/scoring-modes.md", "# a fresh workdir: no training, no text weights"))
  (command,) = [c for c in documented if f"--config.eval.scoring={scoring}" in c.split()]
  words = shlex.split(command)
  assert words[:3] == ["python", "-m", "adjax.main"], command
  args = [sys.executable, *words[1:], f"--workdir={tmp_path / 'work'}",
          "--config.text.random_init=False", "--config.text.checkpoint=/nonexistent/text"]
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "work" / "results" / f"family_b.{scoring}.json")
                       .read_text())
  mean, ident = results["mean"], results["identity"]
  assert ident["eval"]["scoring"] == scoring and ident["head"] is None
  assert ident["towers"]["text"] is None
  assert not (tmp_path / "work" / "text_cache").exists()
  # The mode's thresholds sit beside its results; the deployment thresholds.json
  # belongs to a zero-shot head and is not made here.
  thresholds = json.loads((tmp_path / "work" / "results" / f"family_b.{scoring}.thresholds.json")
                          .read_text())
  assert thresholds["model"]["scoring"] == scoring
  assert not (tmp_path / "work" / "thresholds.json").exists()
  if scoring == "batch":
    assert mean["pixel_auroc"] >= BATCH_PIXEL_FLOOR, mean
    assert mean["image_auroc"] >= BATCH_IMAGE_FLOOR, mean
  else:
    assert mean["pixel_auroc"] >= FEW_SHOT_PIXEL_FLOOR, mean
    refs = ident["references"]
    assert sorted(refs) == ["chip", "mesh", "nut", "tile"]
    for cat, paths in refs.items():
      assert len(paths) == 4 and all(p.startswith(f"{cat}/test/good/") for p in paths)
  html = (tmp_path / "work" / "results" / f"family_b.{scoring}.html").read_text()
  assert f"<title>family_b: {scoring} results" in html


def test_comparison_puts_the_modes_side_by_side(tmp_path):
  from adjax.report import tables
  zero = {"a": {"image_auroc": 0.5, "pixel_auroc": 0.6, "pixel_aupro": 0.3}}
  batch = {"a": {"image_auroc": 0.8, "pixel_auroc": 0.9, "pixel_aupro": None}}
  tables.write_reports(zero, tmp_path, "target", {"eval": {}})
  assert comparison.write_comparison(tmp_path, "target") is None   # one mode only
  tables.write_reports(batch, tmp_path, "target.batch", {"eval": {"scoring": "batch"}})
  text = comparison.write_comparison(tmp_path, "target").read_text()
  assert "| category | zero_shot I-AUROC | zero_shot P-AUROC | zero_shot AUPRO | " \
         "batch I-AUROC | batch P-AUROC | batch AUPRO |" in text
  assert "| a | 50.0 | 60.0 | 30.0 | 80.0 | 90.0 | n/a |" in text
  assert "| mean | 50.0 | 60.0 | 30.0 | 80.0 | 90.0 | n/a |" in text


@pytest.mark.slow
def test_predict_few_shot_and_batch_without_a_head(tmp_path):
  """predict.scoring=few_shot: a reference given as input scores 0 (r = 1: every
  patch is in the bank); batch scores every input; both with no head and no
  text weights; a batch of fewer than 5 images is refused in one line."""
  import csv
  from PIL import Image
  from adjax import experiment
  from adjax.data import synthetic
  synthetic.generate(tmp_path / "gen", image_size=64, per_category=6, seed=1,
                     families=["b"])
  cat = sorted((tmp_path / "gen" / "family_b").iterdir())[0] / "test"
  goods = sorted((cat / "good").glob("*.png"))
  refs = tmp_path / "refs"
  refs.mkdir()
  for p in goods[:2]:
    Image.open(p).save(refs / p.name)

  def config(**kw):
    c = demo_config()
    c.mode = "predict"
    c.data.demo.root = ""
    c.image_size = 64
    c.eval.r_list = (1,)
    c.text.random_init = False
    c.text.checkpoint = "/nonexistent/text"
    c.predict.batch_size = 8
    for k, v in kw.items():
      c.predict[k] = v
    return c

  out = experiment.run(config(scoring="few_shot", references=str(refs), input=str(cat)),
                       str(tmp_path / "fs"))
  scores = {Path(r["path"]).name + Path(r["path"]).parent.name: float(r["score"])
            for r in out["scores"]}
  assert len(scores) == len(list(cat.rglob("*.png")))
  for p in goods[:2]:
    assert scores[p.name + "good"] < 2e-3, scores
  assert min(v for k, v in scores.items() if k not in
             {p.name + "good" for p in goods[:2]}) > 1e-2
  with open(tmp_path / "fs" / "predictions" / "scores.csv") as f:
    assert len(list(csv.DictReader(f))) == len(scores)

  out = experiment.run(config(scoring="batch", input=str(cat)), str(tmp_path / "batch"))
  assert len(out["scores"]) == len(scores)
  with pytest.raises(UserErrorTypes, match="needs at least 5"):
    experiment.run(config(scoring="batch", input=str(refs)), str(tmp_path / "small"))


def _image_folder(folder: Path, n: int) -> list[Path]:
  from PIL import Image
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for i in range(n):
    paths.append(folder / f"{i:03d}.png")
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(paths[-1])
  return paths


def test_references_dir_is_refused_before_work(tmp_path):
  cfg = demo_config()
  cfg.mode = "evaluate"
  cfg.eval.scoring = "few_shot"
  cfg.eval.references_dir = str(tmp_path / "absent")
  assert [p for p in config_check.problems(cfg)
          if p.startswith(f"eval.references_dir={str(tmp_path / 'absent')!r}: not a folder")]
  cfg.eval.scoring = "batch"
  cfg.eval.references_dir = str(tmp_path)
  assert [p for p in config_check.problems(cfg)
          if p.startswith("eval.references_dir is set but eval.scoring='batch'")]

  refs = tmp_path / "refs"
  _image_folder(refs / "a", 2)
  (refs / "a" / "broken.png").write_bytes(b"not an image")
  cfg.eval.scoring = "zero_shot+few_shot"
  cfg.eval.references_dir = str(refs)
  cfg.eval.references = 3
  handle = _handle({"a": (1, 3), "b": (1, 3)})   # too few good images of its own: no matter
  assert scoring_modes.problems(cfg, handle) == [
      f"eval.references_dir={str(refs)!r} has no subfolder for b (expected one per "
      "category, named as it)",
      f"eval.references=3 needs at least 3 readable images in each subfolder of "
      f"eval.references_dir={str(refs)!r}; fewer in a (2)"]
  _image_folder(refs / "b", 5)
  cfg.eval.references = 2
  assert scoring_modes.problems(cfg, handle) == []
  found, _ = scoring_modes.folder_references(str(refs), ["a", "b"], 2)
  assert found == {"a": [str(refs / "a" / "000.png"), str(refs / "a" / "001.png")],
                   "b": [str(refs / "b" / "000.png"), str(refs / "b" / "001.png")]}


def test_an_outside_bank_scores_every_image():
  """With a bank from eval.references_dir no image is left out, and the maps
  are each image's against the bank."""
  from adjax import neighbors
  rng = np.random.default_rng(0)
  l, n, k, h, w, d = 2, 5, 3, 4, 4, 8
  got = {"tokens": rng.normal(size=(l, n, h * w, d)).astype(np.float32),
         "index": np.arange(10, 10 + n), "label": np.array([0, 0, 1, 1, 1]),
         "mask": np.zeros((n, 8, 8), np.float32), "has_mask": np.ones(n, bool),
         "glob": np.zeros((n, d), np.float32)}
  bank = rng.normal(size=(l, k, h * w, d)).astype(np.float32)
  fake = types.SimpleNamespace(
      model=types.SimpleNamespace(grid=(h, w), out_hw=(8, 8)), kind="few_shot",
      with_head=False, mesh=types.SimpleNamespace(shape={"data": 1}),
      cfg=types.SimpleNamespace(eval=types.SimpleNamespace(r_list=(1, 3), batch_subset=0,
                                                           coreset=0.0, coreset_seed=0)))
  fake._neighbour_maps = types.MethodType(scoring_modes.NeighbourScorer._neighbour_maps, fake)
  from adjax.workdir import banks
  built = banks.build(bank.reshape(l, k, h, w, d), names=list("abc"), image_digests=list("abc"),
                      backbone="b", layers=(1, 2), image_size=8, r_list=(1, 3))
  rows = scoring_modes.NeighbourScorer._score_category(fake, got, np.zeros(0, int), built)
  np.testing.assert_array_equal(rows["index"], got["index"])
  want = neighbors.reference_maps(got["tokens"].reshape(l, n, h, w, d),
                                  bank.reshape(l, k, h, w, d), (1, 3))
  want = scoring_modes.upsample(np.asarray(want), (8, 8))
  np.testing.assert_allclose(rows["map"], want, rtol=1e-6)
  np.testing.assert_allclose(rows["score"], want.reshape(n, -1).max(-1), rtol=1e-6)


@pytest.mark.slow
def test_demo_few_shot_with_a_references_dir(tmp_path, monkeypatch):
  """few_shot on the demo's family_b against normal images of another draw of
  the generator (seed 1): the identity lists them and the metrics count every
  test image."""
  import shutil
  from adjax import evaluate, experiment
  from adjax.data import synthetic
  synthetic.generate(tmp_path / "gen", image_size=256, per_category=10, seed=1,
                     families=["b"])
  refs = tmp_path / "refs"
  want = {}
  for cat in sorted((tmp_path / "gen" / "family_b").iterdir()):
    (refs / cat.name).mkdir(parents=True)
    for p in sorted((cat / "test" / "good").glob("*.png")):
      shutil.copy(p, refs / cat.name / p.name)
    want[cat.name] = [str(p) for p in sorted((refs / cat.name).glob("*.png"))[:4]]

  counted = []
  consume = evaluate.MetricsConsumer.consume

  def counting(self, rows):
    counted.append(int(np.sum(rows["valid"])))
    return consume(self, rows)

  monkeypatch.setattr(evaluate.MetricsConsumer, "consume", counting)
  monkeypatch.chdir(ROOT)
  cfg = demo_config()
  cfg.mode = "evaluate"
  cfg.eval.scoring = "few_shot"
  cfg.eval.references_dir = str(refs)
  cfg.text.random_init = False
  cfg.text.checkpoint = "/nonexistent/text"
  experiment.run(cfg, str(tmp_path / "work"))
  results = json.loads((tmp_path / "work" / "results" / "family_b.few_shot.json").read_text())
  ident = results["identity"]
  assert ident["references"] == want
  assert ident["eval"]["references_dir"] == str(refs)
  assert sum(counted) == ident["data"]["examples"] == 120
  assert sorted(results["categories"]) == sorted(want)
  assert results["mean"]["pixel_auroc"] >= FEW_SHOT_PIXEL_FLOOR, results["mean"]


def test_comparison_html_has_the_numbers_of_each_mode(tmp_path):
  from html.parser import HTMLParser
  from adjax.report import tables
  per_mode = {
      "zero_shot": {"a": {"image_auroc": 0.5, "pixel_auroc": 0.6, "pixel_aupro": 0.3},
                    "b": {"image_auroc": 0.71234, "pixel_auroc": 0.9, "pixel_aupro": 0.4}},
      "few_shot": {"a": {"image_auroc": 0.8, "pixel_auroc": 0.95, "pixel_aupro": None},
                   "b": {"image_auroc": 0.6, "pixel_auroc": 0.876, "pixel_aupro": 0.55}}}
  for mode, res in per_mode.items():
    stem = "target" if mode == "zero_shot" else f"target.{mode}"
    tables.write_reports(res, tmp_path, stem, {"eval": {"scoring": mode, "references": 4}})
  comparison.write_comparison(tmp_path, "target")

  class Cells(HTMLParser):
    def __init__(self):
      super().__init__()
      self.cells, self.at = {}, None

    def handle_starttag(self, tag, attrs):
      a = dict(attrs)
      if tag == "tr" and "data-category" in a:
        self.cat = a["data-category"]
      self.at = (self.cat, a["data-mode"], a["data-metric"]) if "data-mode" in a else None

    def handle_data(self, data):
      if self.at:
        self.cells[self.at] = data
        self.at = None

  page = Cells()
  page.feed((tmp_path / "target.modes.html").read_text())
  checked = 0
  for mode in per_mode:
    stem = "target" if mode == "zero_shot" else f"target.{mode}"
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    for cat in ("a", "b", tables.MEAN):
      row = saved[tables.MEAN] if cat == tables.MEAN else saved["categories"][cat]
      for key, _ in comparison.COMPARED:
        text = page.cells[(cat, mode, key)]
        if row.get(key) is None:
          assert text == "n/a"
        else:
          assert abs(float(text) - 100 * row[key]) <= 0.05 + 1e-9, (cat, mode, key, text)
        checked += 1
  assert checked == 2 * 3 * 3 and len(page.cells) == checked


def test_problems_refuse_rscin_k_above_a_category():
  """MuSc's VisA setting (1, 8, 9) on a category of 5: refused before work.
  Fails if eval.rscin_k is not checked against the smallest category."""
  cfg = demo_config()
  cfg.eval.scoring = "batch"
  cfg.eval.rscin_k = (1, 8, 9)
  found = scoring_modes.problems(cfg, _handle({"ok": (6, 4), "five": (3, 2)}))
  assert len(found) == 1 and found[0].startswith("eval.rscin_k=(1, 8, 9)")
  assert "at least 9 images" in found[0] and "five (5)" in found[0] and "ok" not in found[0]
  cfg.eval.rscin_k = (0,)                  # RsCIN off
  assert scoring_modes.problems(cfg, _handle({"five": (3, 2)})) == []


# ---- a category scored from given tokens (no towers) ----------------------
H = W = 3
D = 8
SIZE = 12


def _scorer(scoring, combine="zscore", rscin_k=(1, 2, 3)):
  """A NeighbourScorer holding only what scoring a category's tokens reads."""
  from adjax.common import sharding
  cfg = demo_config()
  cfg.eval.scoring, cfg.eval.combine, cfg.eval.rscin_k = scoring, combine, rscin_k
  cfg.eval.r_list = (1, 3)
  s = object.__new__(scoring_modes.NeighbourScorer)
  s.cfg, s.scoring = cfg, scoring
  s.kind = modes.neighbour_kind(scoring)
  s.with_head = modes.needs_head(scoring)
  s.mesh = sharding.make_mesh(1, 1, __import__("jax").devices()[:1])
  s.model = types.SimpleNamespace(grid=(H, W), out_hw=(SIZE, SIZE))
  return s


def _got(n, seed=0):
  rng = np.random.default_rng(seed)
  return {"tokens": rng.normal(size=(2, n, H * W, D)).astype(np.float32),
          "glob": rng.normal(size=(n, 16)).astype(np.float32) + 1.0,
          "head_map": rng.random((n, SIZE, SIZE)).astype(np.float32),
          "label": np.arange(n) % 2, "mask": np.zeros((n, SIZE, SIZE), np.float32),
          "has_mask": np.ones(n, bool), "index": np.arange(n) + 100}


@pytest.mark.parametrize("combine", ["zscore", "minmax"])
def test_combined_modes_normalise_each_map(combine):
  """zero_shot+batch averages the head's and the neighbours' maps each on its
  category's scale: rescaling the head's maps (x 1000 + 5) changes nothing.
  Fails if the raw maps are averaged (0.5 * (head + maps))."""
  s = _scorer("zero_shot+batch", combine)
  got = _got(6)
  rows = s._score_category(got, np.array([], int))
  scaled = dict(got, head_map=got["head_map"] * 1000.0 + 5.0)
  again = s._score_category(scaled, np.array([], int))
  np.testing.assert_allclose(again["map"], rows["map"], rtol=1e-4, atol=1e-4)
  alone = scoring_modes.normalise(got["head_map"], combine)
  assert float(np.abs(rows["map"] - 0.5 * alone).max()) > 1e-2   # the neighbours count


def test_batch_rscin_pairs_each_score_with_its_global_token():
  """The category's image scores are RsCIN over (max of each map, its own
  global token), in the images' order (MuSc's _RsCIN).
  Fails if the global tokens reach RsCIN in another order than the scores."""
  from adjax import neighbors
  s = _scorer("batch")
  got = _got(7, seed=1)
  rows = s._score_category(got, np.array([], int))
  raw = rows["map"].reshape(7, -1).max(-1)
  np.testing.assert_allclose(rows["score"], neighbors.refine_scores(raw, got["glob"], (1, 2, 3)),
                             rtol=1e-6)
  assert not np.allclose(rows["score"],
                         neighbors.refine_scores(raw, got["glob"][::-1], (1, 2, 3)), rtol=1e-3)


def test_few_shot_references_are_not_scored_and_not_leaked():
  """The references (chosen images of the category) leave the rows; every
  other image is scored against them alone, never against itself (a leak
  would score it ~0).
  Fails if a scored image's own tokens reach its bank, or a reference is scored."""
  from adjax import neighbors
  s = _scorer("few_shot")
  got = _got(6, seed=2)
  refs = got["index"][[1, 4]]
  rows = s._score_category(got, refs)
  keep = np.array([0, 2, 3, 5])
  np.testing.assert_array_equal(rows["index"], got["index"][keep])
  tok = got["tokens"].reshape(2, 6, H, W, D)
  want = scoring_modes.upsample(neighbors.reference_maps(tok[:, keep], tok[:, [1, 4]], (1, 3)),
                                (SIZE, SIZE))
  np.testing.assert_allclose(rows["map"], want, rtol=1e-5, atol=1e-6)
  assert float(rows["score"].min()) > 0.1


def test_few_shot_coreset_bank_and_batch_subsets_reach_the_scores():
  """eval.coreset cuts the category's bank (the same maps as
  `reference_maps(..., coreset)`), eval.batch_subset scores each image within
  its subset; both are in the results' identity.
  Fails if either setting does not reach the neighbour functions."""
  from adjax import neighbors
  s = _scorer("few_shot")
  s.cfg.eval.coreset = 0.25
  s.coreset, s.references_dir = {"coreset": 0.25}, ""
  got = _got(6, seed=3)
  refs = got["index"][[1, 4]]
  rows = s._score_category(got, refs)
  tok = got["tokens"].reshape(2, 6, H, W, D)
  keep = np.array([0, 2, 3, 5])
  want = neighbors.reference_maps(tok[:, keep], tok[:, [1, 4]], (1, 3), coreset=0.25)
  np.testing.assert_allclose(rows["map"], scoring_modes.upsample(want, (SIZE, SIZE)),
                             rtol=1e-5, atol=1e-6)
  full = neighbors.reference_maps(tok[:, keep], tok[:, [1, 4]], (1, 3))
  assert float(np.abs(want - full).max()) > 1e-3

  b = _scorer("batch", rscin_k=(0,))
  b.cfg.eval.batch_subset = 5
  got = _got(12, seed=4)
  rows = b._score_category(got, np.array([], int))
  tok = got["tokens"].reshape(2, 12, H, W, D)
  want = neighbors.mutual_maps_subsets(tok, 5, (1, 3))
  np.testing.assert_allclose(rows["map"], scoring_modes.upsample(want, (SIZE, SIZE)),
                             rtol=1e-5, atol=1e-6)
  assert float(np.abs(want - neighbors.mutual_maps(tok, (1, 3))).max()) > 1e-3

  ident = {"eval": {"image_score": "global"}, "towers": {"text": "t"}, "head": "h"}
  b.coreset = None
  assert b.adjust_identity(dict(ident))["eval"]["batch_subset"] == 5
  ev = s.adjust_identity(dict(ident))["eval"]
  assert ev["coreset"] == {"coreset": 0.25} and "batch_subset" not in ev


def test_config_check_names_bad_coreset_and_subset():
  cfg = demo_config()
  cfg.mode = "evaluate"
  cfg.eval.scoring = "few_shot"
  for value, field in ((1.5, "eval.coreset=1.5"), (-0.1, "eval.coreset=-0.1")):
    cfg.eval.coreset = value
    assert any(field in p for p in config_check.problems(cfg)), value
  cfg.eval.coreset = 0.1
  assert not any("coreset" in p for p in config_check.problems(cfg))
  cfg.eval.batch_subset = 8
  assert any("eval.batch_subset is set but eval.scoring='few_shot'" in p
             for p in config_check.problems(cfg))
  cfg.eval.scoring, cfg.eval.coreset = "batch", 0.0
  cfg.eval.batch_subset = 4
  assert any("eval.batch_subset=4" in p for p in config_check.problems(cfg))
  cfg.eval.batch_subset = 8
  assert not any("batch_subset" in p for p in config_check.problems(cfg))
  cfg.eval.coreset = 100
  assert any("eval.coreset is set but eval.scoring='batch'" in p
             for p in config_check.problems(cfg))


def test_references_dir_with_a_category_pattern(tmp_path):
  """eval.references_dir=<root>/{category}/train/good takes each category's
  bank from its own training normals (MVTec layout), and nothing else of the
  category's folder. Fails if the pattern is joined as a subfolder name or
  the category's test images reach its bank."""
  root = tmp_path / "data"
  for cat in ("a", "b"):
    _image_folder(root / cat / "train" / "good", 3)
    _image_folder(root / cat / "test" / "good", 2)
  pattern = str(root / "{category}" / "train" / "good")
  cfg = demo_config()
  cfg.mode = "evaluate"
  cfg.eval.scoring = "few_shot"
  cfg.eval.references_dir = pattern
  cfg.eval.references = 3
  assert not [p for p in config_check.problems(cfg) if "references_dir" in p]
  handle = _handle({"a": (1, 3), "b": (1, 3)})
  assert scoring_modes.problems(cfg, handle) == []
  found, _ = scoring_modes.folder_references(pattern, ["a", "b"], 3)
  assert found == {c: [str(root / c / "train" / "good" / f"00{i}.png") for i in range(3)]
                   for c in ("a", "b")}
  cfg.eval.references = 4
  assert scoring_modes.problems(cfg, handle) == [
      f"eval.references=4 needs at least 4 readable images in each subfolder of "
      f"eval.references_dir={pattern!r}; fewer in a (3), b (3)"]
  cfg.eval.references = 3
  handle = _handle({"a": (1, 3), "c": (1, 3)})
  assert scoring_modes.problems(cfg, handle) == [
      f"eval.references_dir={pattern!r} has no folder for c (expected one per category, "
      "{category} replaced by its name)"]


def _modes_run(tmp_path, compare=("few_shot", "batch")):
  from adjax.config import schema
  cfg = demo_config()
  cfg.data.targets = str(tmp_path / "target")
  cfg.eval.compare = compare
  cfg.eval.references_dir = ""
  cfg.eval.references = 4
  return schema.from_configdict(cfg)


def test_evaluation_in_several_modes_ends_with_their_table(monkeypatch, tmp_path, capsys):
  """eval.compare: each mode evaluated after eval.scoring (the neighbour modes
  without the head, each writing its first deployment record), then one
  table whose figures are each mode's category means, and the report's path
  as the last line. Fails if a mode is skipped, the table's numbers are not
  the results' or anything is printed after the report's path."""
  from adjax import evaluate
  from adjax.workdir import Workdir
  run = _modes_run(tmp_path)
  values = {"zero_shot": (0.5, 0.6, 0.3), "few_shot": (0.8, 0.9, 0.7), "batch": (0.7, 0.95, 0.75)}
  calls = []

  def fake_targets(cfg, workdir, towers, mesh, params, *, source, first_record=False):
    mode = cfg.eval.scoring
    calls.append((mode, params is None, first_record))
    i, p, a = values[mode]
    cats = {"a": dict(image_auroc=i, pixel_auroc=p, pixel_aupro=a),
            "b": dict(image_auroc=i - 0.1, pixel_auroc=p - 0.1, pixel_aupro=None)}
    print(f"{mode} evaluated")
    return {"target": cats}, []

  monkeypatch.setattr(evaluate, "evaluate_targets", fake_targets)
  monkeypatch.setattr(evaluate.datasets, "prepare", lambda cfg, t: _handle({"a": (8, 8)}))
  report = Workdir(tmp_path).results / "target.modes.html"
  report.parent.mkdir(parents=True)
  report.write_text("<html>")
  results, absent = evaluate.evaluate_modes(run, tmp_path, None, None, object(),
                                            source=(tmp_path, 1))
  assert calls == [("zero_shot", False, False), ("few_shot", True, True),
                   ("batch", True, True)]
  assert results["target"]["a"]["pixel_auroc"] == 0.6 and absent == []
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[-1] == f"report (the modes side by side, per category): {report}"
  rows = {line.split()[0]: line.split() for line in lines[-4:-1]}
  assert list(rows) == ["zero_shot", "few_shot", "batch"]
  for mode, (i, p, a) in values.items():
    # Means over the categories (AUPRO: the one category with masks).
    assert rows[mode][1:4] == [f"{100 * (i - 0.05):.1f}", f"{100 * (p - 0.05):.1f}",
                               f"{100 * a:.1f}"]


def test_every_compared_mode_is_checked_before_the_first_evaluation(monkeypatch, tmp_path):
  """A data set too small for a compared mode (batch needs at least 5 images
  per category) is refused before eval.scoring's evaluation starts."""
  from adjax import evaluate
  run = _modes_run(tmp_path)
  started = []
  monkeypatch.setattr(evaluate, "evaluate_targets", lambda *a, **k: started.append(1))
  monkeypatch.setattr(evaluate.datasets, "prepare", lambda cfg, t: _handle({"small": (2, 1)}))
  with pytest.raises(scoring_modes.ScoringError, match="at least 5"):
    evaluate.evaluate_modes(run, tmp_path, None, None, object(), source=(tmp_path, 1))
  assert started == []
