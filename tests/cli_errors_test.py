"""`python -m adjax.main` answers a careless command line with one `error:`
line and exit status 2, no traceback: a misspelt or ill-typed override, a
missing config file, one that does not run, a relative --config from another
folder, a workdir that is a file, a read-only workdir, a full disk."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adjax import experiment
from adjax.config import check as config_check

ROOT = Path(__file__).resolve().parent.parent


def _main(args, cwd=ROOT, prelude=""):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  code = textwrap.dedent(prelude) + textwrap.dedent("""
      import runpy, sys
      sys.argv = ["adjax.main"] + sys.argv[1:]
      runpy.run_module("adjax.main", run_name="__main__", alter_sys=True)
      """)
  return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _one_line(done, *said):
  err = done.stderr.strip()
  assert done.returncode == 2, (done.returncode, err[-2000:])
  assert "Traceback" not in done.stderr and "FATAL" not in done.stderr, err
  lines = [l for l in err.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error: ")]
  assert len(errors) == 1, err
  for s in said:
    assert s in errors[0], errors[0]
  return errors[0]


@pytest.mark.parametrize("flag,said", [
    ("--config.epocs=3", ["--config.epocs", "did you mean 'epochs'"]),
    ("--config.epochs=abc", ["--config.epochs=abc", "expected a number"]),
    ("--config.nosuch.x=1", ["--config.nosuch.x", "'nosuch'"]),
])
def test_bad_overrides(flag, said):
  _one_line(_main(["--config=configs/demo.py", flag, "--config_help"]), *said)


def test_config_files(tmp_path):
  _one_line(_main([f"--config={tmp_path / 'none.py'}"]), "no such config file")
  (tmp_path / "syntax.py").write_text("def get_config(:\n  pass\n")
  _one_line(_main([f"--config={tmp_path / 'syntax.py'}"]), "line 1", "syntax")
  (tmp_path / "empty.py").write_text("x = 1\n")
  _one_line(_main([f"--config={tmp_path / 'empty.py'}"]), "defines no get_config")
  # The documented relative path (README's Quick start), run from another folder.
  _one_line(_main(["--config=configs/demo.py"], cwd=tmp_path), "no such config file",
            str(tmp_path))


def test_workdir_that_is_a_file(tmp_path):
  (tmp_path / "w").write_text("")
  for mode in ("train", "predict"):
    _one_line(_main(["--config=configs/demo.py", f"--workdir={tmp_path / 'w'}",
                     f"--config.mode={mode}", "--config.predict.input=x",
                     "--config.predict.object_name=chip"]), "is a file, not a folder")


@pytest.mark.parametrize("raised,said", [
    ("PermissionError(13, 'Permission denied', path)", "permission denied"),
    ("OSError(28, 'No space left on device', path)", "no space left"),
    ("OSError(30, 'Read-only file system', path)", "/.adjax.lock: read-only file system"),
    ("ValueError('RESOURCE_EXHAUSTED: writing ' + path)", "no space left"),
])
def test_read_only_workdir_and_full_disk(tmp_path, raised, said):
  """The lock's first write fails as it does on a read-only folder or a full
  disk (simulated: the tests may run as root, whom permissions do not stop)."""
  prelude = f"""
      from adjax.workdir import lock as workdir_lock
      def refuse(self, *a, **k):
        path = str(self.path) if hasattr(self, "path") else "lock"
        raise {raised}
      workdir_lock.WorkdirLock.__enter__ = refuse
      """
  line = _one_line(_main(["--config=configs/demo.py", f"--workdir={tmp_path / 'w'}"],
                         prelude=prelude), said)
  assert "object at 0x" not in line


@pytest.mark.slow
def test_training_set_without_anomalies_refused(tmp_path, capsys):
  from adjax.data import synthetic
  synthetic.generate(tmp_path / "gen", image_size=64, per_category=4, seed=1,
                     families=["a"])
  only_good = tmp_path / "good"
  for cat in (tmp_path / "gen" / "family_a").iterdir():
    shutil.copytree(cat / "test" / "good", only_good / cat.name / "test" / "good")
  sys.path.insert(0, str(Path(__file__).parent))
  from experiment_test import small_config
  cfg = small_config(tmp_path / "gen", tmp_path, epochs=1)
  cfg.data.train = str(only_good)
  cfg.eval.enabled = False
  with pytest.raises(config_check.ConfigError, match="none of its .* images is anomalous"):
    experiment.run(cfg, str(tmp_path / "work"))
  cfg.train.allow_no_anomalies = True
  experiment.run(cfg, str(tmp_path / "work"))
  assert "training anyway (train.allow_no_anomalies=True)" in capsys.readouterr().out
