"""Mistakes a user makes get a clear refusal, never a silent wrong result.

Each test is one way in which an earlier version gave a wrong result or lost
data: the config checked as a whole before any work, one-line errors on the
command line, a resume or an evaluation under another model refused, data
prepared from another source not reused, results of another evaluation not
overwritten, a second run on a busy workdir refused.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from adjax import experiment
from adjax.common import processes
from adjax.config import check as config_check
from adjax.data import synthetic
from adjax.workdir import identity
from adjax.workdir import LOCK_FILE
from adjax.workdir.lock import WorkdirBusyError

from experiment_test import ROOT, small_config


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen")
  synthetic.generate(root, image_size=48, per_category=4, seed=2, families=["a", "b"])
  return root


def _cfg(small_data, tmp, **kw):
  c = small_config(small_data, tmp, **kw)
  c.image_size = 32
  c.epochs = 1
  c.eval.heatmaps_per_category = 0
  return c


def test_every_config_problem_is_listed_before_any_work(small_data, tmp_path):
  cfg = _cfg(small_data, tmp_path, batch_size=-8)
  cfg.epochs = 0
  cfg.eval.image_score = "peak"
  cfg.image_size = 50                       # not a multiple of the patch (16)
  cfg.backbone.layers = (2, 5, 8, 40)       # ViT-S/16 has 12 blocks
  cfg.feature_cache = "ram"
  cfg.data.targets = str(tmp_path / "no_such_folder")
  with pytest.raises(config_check.ConfigError) as err:
    experiment.run(cfg, str(tmp_path / "work"))
  msg = str(err.value)
  for field in ("epochs=0", "batch_size=-8", "eval.image_score='peak'", "image_size=50",
                "backbone.layers=(2, 5, 8, 40)", "feature_cache='ram'",
                "no_such_folder"):
    assert field in msg, field
  assert msg.startswith("the config has 7 problems")
  assert not (tmp_path / "work").exists()    # nothing was started
  assert not (tmp_path / "tfds").exists()


def test_batch_not_divisible_by_devices_and_empty_targets(small_data, tmp_path):
  cfg = _cfg(small_data, tmp_path, batch_size=0)
  cfg.eval.batch_size = 12                  # the test process has 8 devices
  cfg.data.targets = " , "
  found = config_check.problems(cfg, device_count=8, process_count=1)
  assert any(p.startswith("batch_size=0") for p in found)
  assert any(p.startswith("eval.batch_size=12: expected a multiple of the 8") for p in found)
  assert any(p.startswith("data.targets is empty") for p in found)


def _main(args, cwd=ROOT):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "adjax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_line_mistakes_are_one_line(small_data, tmp_path):
  proc = _main(["--config=configs/demo.py", f"--workdir={tmp_path / 'w'}",
                "--config.epochs=0", "--config.batch_size=0"])
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[0] == "error: the config has 2 problems:"
  assert any("epochs=0" in l for l in lines) and any("batch_size=0" in l for l in lines)
  # A workdir without a checkpoint cannot be evaluated.
  proc = _main(["--config=configs/demo.py", f"--workdir={tmp_path / 'empty'}",
                "--config.mode=evaluate"])
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "holds no trained checkpoint" in proc.stderr


@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("run")
  cfg = _cfg(small_data, tmp)
  experiment.run(cfg, str(tmp / "work"))
  return cfg, tmp


@pytest.mark.slow
def test_resume_with_another_config_is_refused(trained):
  cfg, tmp = trained
  work = tmp / "work"
  before = (work / "config.json").read_text()
  changed = cfg.copy_and_resolve_references()
  changed.image_size = 64
  changed.batch_size = 16
  with pytest.raises(identity.IdentityMismatchError) as err:
    experiment.run(changed, str(work))
  msg = str(err.value)
  assert "image_size: 32 -> 64" in msg and "batch_size: 8 -> 16" in msg
  assert "resume_mismatch=allow" in msg
  assert (work / "config.json").read_text() == before     # not overwritten


@pytest.mark.slow
def test_evaluating_with_another_model_is_refused_and_keeps_results(trained):
  cfg, tmp = trained
  work = tmp / "work"
  results = (work / "results" / "family_b.json").read_text()
  other = cfg.copy_and_resolve_references()
  other.mode = "evaluate"
  other.backbone.layers = (1, 4, 7, 10)
  with pytest.raises(identity.IdentityMismatchError, match=r"backbone.layers: \[2, 5, 8, 11\] -> \[1, 4, 7, 10\]"):
    experiment.run(other, str(work))
  assert (work / "results" / "family_b.json").read_text() == results


@pytest.mark.slow
def test_another_evaluation_writes_beside_earlier_results(trained):
  cfg, tmp = trained
  work = tmp / "work"
  first = json.loads((work / "results" / "family_b.json").read_text())
  again = cfg.copy_and_resolve_references()
  again.mode = "evaluate"
  again.eval.image_score = "max"            # another evaluation setting
  experiment.run(again, str(work))
  assert json.loads((work / "results" / "family_b.json").read_text()) == first
  beside = [p for p in (work / "results").glob("family_b@*.json")
            if not p.name.endswith(".thresholds.json")]
  assert len(beside) == 1
  # Its thresholds go beside its results too (image_score=max thresholds).
  own = json.loads(beside[0].with_suffix(".thresholds.json").read_text())
  assert own["image_score"] == "max"
  stored = json.loads(beside[0].read_text())["identity"]
  assert stored["eval"]["image_score"] == "max"
  assert stored["head"] == first["identity"]["head"]


@pytest.mark.slow
def test_a_busy_workdir_is_refused(trained):
  cfg, tmp = trained
  work = tmp / "work"
  (work / LOCK_FILE).write_text(json.dumps(
      {"host": processes.this_host(), "pid": os.getppid(),
       "started": "now", "token": "x"}))
  try:
    again = cfg.copy_and_resolve_references()
    again.mode = "evaluate"
    with pytest.raises(WorkdirBusyError, match=f"process {os.getppid()}"):
      experiment.run(again, str(work))
  finally:
    (work / LOCK_FILE).unlink()


def test_changed_source_is_prepared_again(small_data, tmp_path, capsys):
  from adjax import data
  src = tmp_path / "copy"
  import shutil
  shutil.copytree(small_data / "family_a", src)
  h1 = data.prepare("folder", manual_dir=src, data_dir=tmp_path / "tfds")
  # A new file changes the listing: the data set is prepared again.
  cat = sorted(p for p in src.iterdir() if p.is_dir())[0]
  good = sorted((cat / "test" / "good").iterdir())[0]
  Image.open(good).save(cat / "test" / "good" / "zz_new.png")
  h2 = data.prepare("folder", manual_dir=src, data_dir=tmp_path / "tfds")
  assert h2.num_examples == h1.num_examples + 1
  # skip_bad_files is part of what the prepared data is made from.
  capsys.readouterr()
  data.prepare("folder", manual_dir=src, data_dir=tmp_path / "tfds", skip_bad_files=True)
  assert "skip_bad_files differ" in capsys.readouterr().out


def test_checkpoint_of_another_variant_or_family_is_refused(small_data, tmp_path):
  """backbone.variant=vitb16 with a ViT-S checkpoint: refused, naming the sizes."""
  from flax import nnx
  from adjax.models import dinov3, weights
  model = dinov3.init_random("vits16")
  flat = {k: np.asarray(v) for k, v in weights.flatten(
      nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
  meta = dict(dinov3.VARIANTS["vits16"].to_dict(), kind=dinov3.KIND, variant="vits16",
              source="test", source_sha256="0" * 64)
  weights.save(tmp_path / "vits16", flat, meta)
  cfg = _cfg(small_data, tmp_path)
  cfg.backbone.random_init = False
  cfg.backbone.checkpoint = str(tmp_path / "vits16")
  cfg.backbone.variant = "vitb16"
  cfg.backbone.layers = (2, 5, 8, 11)
  found = config_check.problems(cfg)
  assert any("is a vits16 model (dim 384 (config: 768)" in p and "backbone.variant='vitb16'"
             in p for p in found), found
  cfg.backbone.family = "dinov2"
  cfg.backbone.variant = "vitb14"
  cfg.image_size = 28
  found = config_check.problems(cfg)
  assert any("holds a 'dinov3' model, but backbone.family='dinov2'" in p for p in found), found
