"""Scoring modes in evaluation (adjax.scoring_modes): checks before work, the
reference choice, and the demo's floors per mode (slow tier)."""

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from adjax import config_check, scoring_modes
from adjax.errors import UserError as UserErrorTypes

ROOT = Path(__file__).resolve().parent.parent

# The demo (random towers, family b, no training) per mode: the README's
# Scoring modes table; issue floors.
BATCH_PIXEL_FLOOR, BATCH_IMAGE_FLOOR, FEW_SHOT_PIXEL_FLOOR = 0.85, 0.70, 0.85


def demo_config():
  spec = importlib.util.spec_from_file_location("demo_cfg", ROOT / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


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
  cfg.eval.references = 0
  cfg.eval.r_list = (1, 2)
  cfg.eval.combine = "sum"
  found = "\n".join(config_check.problems(cfg))
  for field in ("eval.scoring='fewshot'", "eval.references=0", "eval.r_list=(1, 2)",
                "eval.combine='sum'"):
    assert field in found, found


def test_head_free_modes_need_no_text_checkpoint():
  cfg = demo_config()
  cfg.mode = "evaluate"
  cfg.text.random_init = False
  cfg.text.checkpoint = "/nonexistent/text"
  cfg.eval.scoring = "batch"
  assert not [p for p in config_check.problems(cfg) if "text" in p]
  cfg.eval.scoring = "zero_shot+batch"
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
  """The README's command on a fresh workdir: no training, no text weights."""
  args = [sys.executable, "-m", "adjax.main", "--config=configs/demo.py",
          "--config.mode=evaluate", f"--config.workdir={tmp_path / 'work'}",
          f"--config.eval.scoring={scoring}", "--config.text.random_init=False",
          "--config.text.checkpoint=/nonexistent/text"]
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "work" / "results" / f"family_b.{scoring}.json")
                       .read_text())
  mean, ident = results["mean"], results["identity"]
  assert ident["eval"]["scoring"] == scoring and ident["head"] is None
  assert ident["towers"]["text"] is None
  assert not (tmp_path / "work" / "text_cache").exists()
  from adjax.workdir import Workdir
  thresholds = json.loads(Workdir(tmp_path / "work").evaluation_thresholds(
      f"family_b.{scoring}").read_text())
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
  from adjax import reports
  zero = {"a": {"image_auroc": 0.5, "pixel_auroc": 0.6, "pixel_aupro": 0.3}}
  batch = {"a": {"image_auroc": 0.8, "pixel_auroc": 0.9, "pixel_aupro": None}}
  reports.write_reports(zero, tmp_path, "target", {"eval": {}})
  assert scoring_modes.write_comparison(tmp_path, "target") is None   # one mode only
  reports.write_reports(batch, tmp_path, "target.batch", {"eval": {"scoring": "batch"}})
  text = scoring_modes.write_comparison(tmp_path, "target").read_text()
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
