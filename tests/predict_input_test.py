"""mode=predict reads only what it should: never the workdir, symlinked folders
once each, EXIF orientation applied; nothing readable is an error that keeps
the previous predictions; an object name without its own threshold is said."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adjax import experiment, export
from adjax.workdir import thresholds
from adjax import predict as predict_lib
from adjax.config import check as config_check
from adjax.config import load as run_config
from adjax.data import images as data_images
from adjax.workdir import THRESHOLDS_FILE

sys.path.insert(0, str(Path(__file__).parent))
from export_test import run_dir  # noqa: E402,F401  (the fixture: a tiny imported head)


def _img(path, size=(20, 20), seed=0):
  rng = np.random.default_rng(seed)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _predict(run_dir, src, name="bottle", **extra):
  cfg = run_config.from_workdir(run_dir)
  cfg.mode = "predict"
  cfg.predict.input = str(src)
  cfg.predict.object_name = name
  for k, v in extra.items():
    cfg.predict[k] = v
  return experiment.run(cfg, str(run_dir))


@pytest.fixture(scope="module")
def home(run_dir, tmp_path_factory):
  """A folder holding the images and, inside it, a copy of the run's workdir."""
  import shutil
  root = tmp_path_factory.mktemp("home")
  shutil.copytree(run_dir, root / "run")
  for i in range(3):
    _img(root / "photos" / f"{i}.png", seed=i)
  return root


def test_workdir_is_never_an_input(home, capsys):
  first = _predict(home / "run", home)
  assert len(first["scores"]) == 3
  again = _predict(home / "run", home)     # predictions/ now holds 3 panels
  out = capsys.readouterr().out
  assert len(again["scores"]) == 3
  assert "skipped" in out and "under the workdir" in out


def test_symlinked_folders_followed_once(home, tmp_path):
  src = tmp_path / "src"
  _img(src / "real" / "a.png")
  _img(tmp_path / "elsewhere" / "b.png", seed=5)
  os.symlink(tmp_path / "elsewhere", src / "linked")
  os.symlink(src, src / "real" / "loop")                # a loop back to the top
  os.symlink(src / "real", src / "again")               # the same folder twice
  paths, bad = data_images.read_image_folder(src)
  assert not bad
  assert sorted(Path(p).name for p in paths) == ["a.png", "b.png"]


def test_nothing_readable_fails_and_keeps_previous_predictions(home, tmp_path):
  _predict(home / "run", home / "photos")
  before = (home / "run" / "predictions" / "scores.csv").read_bytes()
  bad = tmp_path / "bad"
  bad.mkdir()
  for i in range(5):
    (bad / f"{i}.png").write_bytes(b"not a png")
  with pytest.raises(predict_lib.PredictError) as e:
    _predict(home / "run", bad)
  msg = str(e.value)
  assert "\n" not in msg and "none of its 5 image files" in msg and "and 2 more" in msg
  assert "object at 0x" not in msg
  assert (home / "run" / "predictions" / "scores.csv").read_bytes() == before
  assert len((home / "run" / "unreadable.txt").read_text().splitlines()) == 5


def test_exif_orientation_applied(home, tmp_path):
  src = tmp_path / "exif"
  src.mkdir()
  img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 40, 3), np.uint8))
  exif = img.getexif()
  exif[0x0112] = 6                 # stored landscape 40x20, seen portrait 20x40
  img.save(src / "portrait.jpg", exif=exif)
  with Image.open(src / "portrait.jpg") as im:
    assert data_images.upright(im).size == (20, 40)
  _predict(home / "run", src)
  with Image.open(home / "run" / "predictions" / "heatmaps" / "portrait.jpg.png") as panel:
    assert panel.size[1] == 40     # the panel has the upright image's height


def test_object_name_required_and_unknown_name_said(home, capsys):
  cfg = run_config.from_workdir(home / "run")
  cfg.mode = "predict"
  cfg.predict.input = str(home / "photos")
  cfg.predict.object_name = ""
  with pytest.raises(config_check.ConfigError, match="predict.object_name is empty"):
    config_check.check(cfg)
  out = _predict(home / "run", home / "photos", name="bottle")
  assert out["threshold_source"] == "none"
  exp = export.build(home / "run", ["bottle"])
  thresholds.write(home / "run", dataset="unit", image_score="mean", checkpoint_step=0,
                   model=exp.metadata["model"], image=0.5,
                   details={"per_category": {"unit": {"chip": {"image": 0.4, "pixel": None}}}})
  capsys.readouterr()
  out = _predict(home / "run", home / "photos", name="chpi")
  said = capsys.readouterr().out
  assert out["threshold_source"] == "top-level"
  assert "'chpi' has no calibrated threshold of its own" in said and "chip" in said
  (home / "run" / THRESHOLDS_FILE).unlink()


def test_error_text_has_no_object_reprs():
  import io
  try:
    Image.open(io.BytesIO(b"junk"))
  except Exception as e:    # noqa: BLE001
    text = data_images.describe_error(e)
  assert "object at 0x" not in text and text.startswith("UnidentifiedImageError")


@pytest.mark.slow      # a whole `adjax.main` predict run in a child process
def test_ctrl_c_in_predict_says_what_fits(home, tmp_path):
  """Ctrl-C during predict: exit 130, a message about predictions (not about
  resuming from a checkpoint), and the previous predictions left as they were."""
  import signal
  import subprocess
  import textwrap
  _predict(home / "run", home / "photos")
  before = (home / "run" / "predictions" / "scores.csv").read_bytes()
  (tmp_path / "cfg.py").write_text(textwrap.dedent(f"""
      from adjax.config import load as run_config
      def get_config(arg=None):
        return run_config.from_workdir({str(home / 'run')!r})
      """))
  code = textwrap.dedent("""
      import runpy, sys, time
      from adjax.models import dinov3
      from adjax import predict
      dinov3.VARIANTS["export-test-tiny"] = dinov3.DinoV3Config(
          64, 4, 2, "mlp", 128, name="export-test-tiny")
      def paused(*a, **k):
        print("READY", flush=True)
        while True:
          time.sleep(0.05)   # short: a signal taken by another thread runs its handler here
      predict._predict_into = paused
      sys.argv = ["adjax.main"] + sys.argv[1:]
      runpy.run_module("adjax.main", run_name="__main__", alter_sys=True)
      """)
  root = Path(__file__).resolve().parent.parent
  env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  p = subprocess.Popen(
      [sys.executable, "-c", code, f"--config={tmp_path / 'cfg.py'}",
       f"--workdir={home / 'run'}", "--config.mode=predict",
       f"--config.predict.input={home / 'photos'}", "--config.predict.object_name=bottle"],
      cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in p.stdout:
    if line.strip() == "READY":
      break
  p.send_signal(signal.SIGINT)
  _, err = p.communicate(timeout=900)
  assert p.returncode == 130, err[-2000:]
  assert "resume from the last checkpoint" not in err
  assert "predictions/ is left as it was" in err and "Traceback" not in err
  assert (home / "run" / "predictions" / "scores.csv").read_bytes() == before


def test_each_image_decoded_once_for_its_score_and_panel(home, tmp_path, monkeypatch):
  """After the listing (which checks every file), each image is decoded once:
  the same decode gives the model's input and the full-size panel."""
  src = tmp_path / "once"
  for i in range(3):
    _img(src / f"{i}.png", size=(30 + i, 20), seed=i)
  opened = []
  real_open = Image.open

  def counting_open(fp, *args, **kwargs):
    opened.append(os.path.basename(str(fp)))
    return real_open(fp, *args, **kwargs)

  monkeypatch.setattr(Image, "open", counting_open)
  out = _predict(home / "run", src)
  monkeypatch.undo()
  assert len(out["scores"]) == 3
  for i in range(3):          # one open to list it, one to score and draw it
    assert opened.count(f"{i}.png") == 2, opened
  for i in range(3):
    with Image.open(home / "run" / "predictions" / "heatmaps" / f"{i}.png.png") as panel:
      assert panel.size[1] == 20


def test_undecided_without_thresholds_and_scores_that_decide_again(home, capsys):
  """No threshold: every output says undecided and nothing is decided or
  masked. scores.csv's scores (`%.9g`) are the float32 scores exactly: read
  back as float32 they decide again as its decision column, even against a
  threshold equal to a written score."""
  import csv
  assert not (home / "run" / THRESHOLDS_FILE).exists()
  capsys.readouterr()
  _predict(home / "run", home / "photos")
  said = capsys.readouterr().out
  pred = home / "run" / "predictions"
  with open(pred / "scores.csv") as f:
    rows = list(csv.DictReader(f))
  assert "undecided: no deployment thresholds for scoring=zero_shot" in said
  assert [(r["decision"], r["threshold_source"]) for r in rows] == [("undecided", "none")] * 3
  assert "mask" not in rows[0] and not (pred / "masks").exists()
  assert not (pred / "overlays").exists()
  index = (pred / "index.html").read_text()
  assert index.count('class="undecided"') == 3 and "undecided, no deployment" in index
  assert 'class="anomalous"' not in index and 'class="normal"' not in index
  # The written scores are float32 values written in full (9 digits).
  for r in rows:
    assert f"{np.float32(r['score']):.9g}" == r["score"], r
  # Each written score as the threshold: deciding again from the CSV (its
  # score read as float32) gives the decision column.
  written = {r["path"]: r["score"] for r in rows}
  middle = sorted(written.items(), key=lambda kv: float(kv[1]))[1:2]   # one run: cheap
  for path, text in middle:
    _predict(home / "run", home / "photos", threshold=float(text))
    with open(pred / "scores.csv") as f:
      again = {r["path"]: r for r in csv.DictReader(f)}
    assert again[path]["score"] == text
    for r in again.values():
      assert int(r["decision"]) == int(float(np.float32(r["score"])) >= float(text)), r
