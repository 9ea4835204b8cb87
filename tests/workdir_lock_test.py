"""Workdir lock: one holder, stale takeover, refusals that say what to do, release."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adjax.common import processes
from adjax.common.errors import UserError
from adjax.workdir import LOCK_FILE
from adjax.workdir.lock import WorkdirBusyError, WorkdirLock

ROOT = Path(__file__).resolve().parents[1]

_HOLDER = """
import sys, time
from adjax.common.errors import UserError
from adjax.workdir.lock import WorkdirLock
try:
  with WorkdirLock(sys.argv[1]):
    print("HOLDING", flush=True)
    time.sleep(float(sys.argv[2]))
except UserError as e:
  print(f"error: {e}", flush=True)
  sys.exit(1)
"""


def _holder(workdir, seconds=60):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir), str(seconds)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def _write_lock(workdir, **info):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / LOCK_FILE).write_text(json.dumps(
      {"started": "2025-01-01T00:00:00+00:00", "token": "t", **info}))


def test_concurrent_runs_one_holds_other_refused(tmp_path):
  a, b = _holder(tmp_path), _holder(tmp_path)
  first = {p: p.stdout.readline().strip() for p in (a, b)}
  holding = [p for p, line in first.items() if line == "HOLDING"]
  refused = [p for p, line in first.items() if line.startswith("error:")]
  assert len(holding) == 1 and len(refused) == 1, first
  (h,), (r,) = holding, refused
  r.wait(timeout=30)
  assert r.returncode == 1
  message = first[r]
  assert "\n" not in message
  assert f"process {h.pid} on host {processes.this_host()}" in message
  assert "started" in message
  # SIGTERM releases the lock; the next run takes it.
  h.send_signal(signal.SIGTERM)
  h.communicate(timeout=30)
  assert h.returncode == 128 + signal.SIGTERM
  assert not (tmp_path / LOCK_FILE).exists()
  with WorkdirLock(tmp_path) as lock:
    assert lock.held


def test_stale_lock_taken_over_with_message(tmp_path, capsys):
  dead = _dead_pid()
  _write_lock(tmp_path, host=processes.this_host(), pid=dead)
  with WorkdirLock(tmp_path):
    info = json.loads((tmp_path / LOCK_FILE).read_text())
    assert info["pid"] == os.getpid()
  out = capsys.readouterr().out
  assert f"process {dead}" in out and "no longer runs" in out
  assert sorted(os.listdir(tmp_path)) == []


def test_lock_from_another_host_refused_with_removal_command(tmp_path):
  _write_lock(tmp_path, host="elsewhere-7", pid=_dead_pid())
  with pytest.raises(WorkdirBusyError) as e:
    with WorkdirLock(tmp_path):
      pass
  assert isinstance(e.value, UserError)
  msg = str(e.value)
  assert "elsewhere-7" in msg and f"rm '{tmp_path / LOCK_FILE}'" in msg
  assert (tmp_path / LOCK_FILE).exists()  # not ours to remove


def test_live_lock_on_this_host_refused(tmp_path):
  _write_lock(tmp_path, host=processes.this_host(), pid=os.getppid())
  with pytest.raises(WorkdirBusyError, match=f"process {os.getppid()} on host"):
    WorkdirLock(tmp_path).__enter__()


def test_released_on_exception_and_sigterm_handler_restored(tmp_path):
  with pytest.raises(RuntimeError):
    with WorkdirLock(tmp_path):
      assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
      raise RuntimeError("boom")
  assert not (tmp_path / LOCK_FILE).exists()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  with WorkdirLock(tmp_path):  # and can be taken again
    pass


def test_only_the_primary_process_locks(tmp_path):
  with WorkdirLock(tmp_path, is_primary=False) as lock:
    assert not lock.held and not (tmp_path / LOCK_FILE).exists()


def test_unreadable_lock_refused(tmp_path):
  (tmp_path / LOCK_FILE).write_text("not json")
  with pytest.raises(WorkdirBusyError, match="unreadable"):
    WorkdirLock(tmp_path).__enter__()
