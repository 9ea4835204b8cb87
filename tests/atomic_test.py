"""Atomic writes: modes follow the umask; temporaries are owned and cleaned."""

import logging
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

from adjax.common import atomic, processes
from adjax.report import heatmaps, tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def umask():
  old = os.umask(0o022)
  yield os.umask
  os.umask(old)


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755),
                                                     (0o027, 0o640, 0o750)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
  umask(mask)
  assert atomic.umask() == mask
  atomic.write_text(tmp_path / "config.json", "{}")
  atomic.write_bytes(tmp_path / "x.bin", b"1")
  with atomic.atomic_file(tmp_path / "cache.npy", "wb") as f:
    np.save(f, np.zeros(2))
  with atomic.atomic_dir(tmp_path / "ckpt") as d:
    (d / "inside.txt").write_text("x")
  # What the project writes through these helpers: result tables, heatmaps.
  tables.write_reports({"cat": {"pixel_auroc": 0.5, "image_auroc": 0.5}},
                       tmp_path / "results", "set")
  hm = tmp_path / "heatmaps" / "cat" / "0.png"
  heatmaps.save_png(hm, np.zeros((8, 8, 3), np.uint8))
  files = [tmp_path / "config.json", tmp_path / "x.bin", tmp_path / "cache.npy",
           tmp_path / "ckpt" / "inside.txt", hm,
           *sorted((tmp_path / "results").iterdir())]
  assert len(files) >= 7
  for f in files:
    assert _mode(f) == file_mode, f
  assert _mode(tmp_path / "ckpt") == dir_mode
  assert not [p for p in tmp_path.rglob(".*")]


def test_overwrite_keeps_the_new_content_and_mode(tmp_path, umask):
  umask(0o027)
  with atomic.atomic_dir(tmp_path / "d") as d:
    (d / "v").write_text("1")
  with atomic.atomic_dir(tmp_path / "d", overwrite=True) as d:
    (d / "v").write_text("2")
  assert (tmp_path / "d" / "v").read_text() == "2"
  assert _mode(tmp_path / "d") == 0o750
  assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_failure_leaves_nothing(tmp_path):
  for ctx in (atomic.atomic_dir(tmp_path / "d"), atomic.atomic_file(tmp_path / "f")):
    with pytest.raises(KeyboardInterrupt):
      with ctx:
        raise KeyboardInterrupt
  assert not list(tmp_path.iterdir())


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_stale_temporaries_removed_live_and_foreign_ones_kept(tmp_path, caplog):
  host = processes.this_host()
  dead = _dead_pid()
  stale_dir = tmp_path / f".out.tmp-{dead}-{host}-abcd1234"
  stale_file = tmp_path / f".res.json.tmp-{dead}-{host}-abcd1234"
  live = tmp_path / f".out.tmp-{os.getppid()}-{host}-abcd1234"
  foreign = tmp_path / f".out.tmp-{dead}-another-host-abcd1234"
  unrelated = tmp_path / ".out.tmp-notours"
  stale_dir.mkdir()
  (stale_dir / "partial").write_text("x")
  for p in (stale_file, live, foreign, unrelated):
    p.write_text("x")
  with caplog.at_level(logging.WARNING, logger="adjax.common.atomic"):
    with atomic.atomic_dir(tmp_path / "out") as d:
      (d / "a").write_text("a")
  assert not stale_dir.exists()
  assert stale_file.exists()  # another destination: atomic_dir looks at its own name only
  assert live.exists() and foreign.exists() and unrelated.exists()
  assert any(str(stale_dir) in r.getMessage() and str(dead) in r.getMessage()
             for r in caplog.records)
  atomic.remove_stale(tmp_path)
  assert not stale_file.exists() and live.exists() and foreign.exists()


def test_old_copy_restored_when_killed_between_renames(tmp_path):
  dead = _dead_pid()
  old = tmp_path / f".model.old-{dead}-{processes.this_host()}-abcd1234"
  (old / "x").mkdir(parents=True)
  (old / "x" / "config.json").write_text("{}")
  atomic.remove_stale(tmp_path)
  assert (tmp_path / "model" / "config.json").read_text() == "{}"
  assert [p.name for p in tmp_path.iterdir()] == ["model"]


_HOLD = """
import sys, time
from adjax.common import atomic
with atomic.atomic_file(sys.argv[1]) as f:
  print("READY", flush=True)
  for _ in range(1200):   # short sleeps: a signal taken by another thread runs its handler here
    time.sleep(0.05)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_write_leaves_nothing(tmp_path, sig):
  env = dict(os.environ, PYTHONPATH=ROOT)
  p = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "r.json")], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == "READY"
  assert len(list(tmp_path.iterdir())) == 1  # the live temporary
  p.send_signal(sig)
  p.communicate(timeout=30)
  assert p.returncode in (-signal.SIGINT, 128 + signal.SIGTERM)
  assert not list(tmp_path.iterdir())


def test_sigterm_raises_only_within_the_block():
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  with pytest.raises(processes.Terminated) as e:
    with processes.sigterm_raises():
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(1000):  # the handler runs between bytecodes
        pass
  assert e.value.code == 143
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_process_liveness():
  assert processes.pid_alive(os.getpid())
  assert not processes.pid_alive(_dead_pid())
  assert processes.owner_alive("some-other-host", _dead_pid())
  assert "/" not in processes.this_host()
