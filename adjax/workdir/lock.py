"""One run per workdir: a lock file created atomically, released on every exit.

    with WorkdirLock(workdir, is_primary=jax.process_index() == 0):
      ...train / evaluate / predict...

The lock is `<workdir>/.adjax.lock`, created with O_CREAT | O_EXCL (exactly
one of two racing runs succeeds) and holding the holder's host, pid, start
time and command line as JSON. A second run on a busy workdir gets a
`WorkdirBusyError` (a `UserError`: one line, no traceback) naming the holder.
A lock whose pid no longer runs on this host (a run killed with SIGKILL or
lost with its machine's power) is stale and taken over with a printed
message; a lock held on another host cannot be checked from here, so it is
refused with the command to remove it if the user knows that run is over.

The lock is released when the block ends: normally, on an exception, on
Ctrl-C, and on SIGTERM (turned into an exception while the lock is held, see
`processes.sigterm_raises`). In a multi-host run only process 0 takes it
(`is_primary`); the others are covered by process 0's lock.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import sys
import time
from pathlib import Path

from adjax.common import processes
from adjax.common.errors import UserError
from adjax.workdir import Workdir


class WorkdirBusyError(UserError):
  """Another run holds the workdir (or may: its host cannot be checked)."""


def _describe(info: dict) -> str:
  return (f"process {info.get('pid')} on host {info.get('host')} "
          f"(started {info.get('started', '?')})")


class WorkdirLock:
  """Context manager holding `<workdir>/.adjax.lock` for the block's duration."""

  def __init__(self, workdir: str | os.PathLike, *, is_primary: bool = True,
               log=print):
    self.path = Workdir(workdir).lock
    self.is_primary = is_primary
    self._log = log
    self._info: dict | None = None
    self._sigterm = None

  def __enter__(self) -> "WorkdirLock":
    if not self.is_primary:
      return self
    self._sigterm = processes.sigterm_raises()
    self._sigterm.__enter__()
    try:
      self.acquire()
    except BaseException:
      self._sigterm.__exit__(*sys.exc_info())
      self._sigterm = None
      raise
    return self

  def __exit__(self, *exc) -> None:
    try:
      self.release()
    finally:
      if self._sigterm is not None:
        self._sigterm.__exit__(*exc)
        self._sigterm = None

  # ------------------------------------------------------------- acquire

  def acquire(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "host": processes.this_host(), "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "token": secrets.token_hex(8),
    }
    for _ in range(10):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
      except FileExistsError:
        self._handle_existing()
        continue
      with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info) + "\n")
      self._info = info
      return
    raise WorkdirBusyError(f"{self.path.parent}: could not take the lock {self.path} "
                           "(other runs keep taking it); try again")

  def _read(self, path: Path) -> dict | None:
    """The lock's content; None when it vanished; {} while it is being written."""
    try:
      text = path.read_text()
    except FileNotFoundError:
      return None
    try:
      info = json.loads(text)
      return info if isinstance(info, dict) else {}
    except json.JSONDecodeError:
      return {}

  def _handle_existing(self) -> None:
    """Raises if the lock is held; removes it (so the caller retries) if stale."""
    info = self._read(self.path)
    for _ in range(20):  # a holder between its create and its write
      if info != {}:
        break
      time.sleep(0.05)
      info = self._read(self.path)
    if info is None:
      return
    workdir = self.path.parent
    if not info or "pid" not in info or "host" not in info:
      raise WorkdirBusyError(
          f"{workdir} is locked by {self.path}, which is unreadable; if no run "
          f"uses this workdir, remove it: rm '{self.path}'")
    if info["host"] != processes.this_host():
      raise WorkdirBusyError(
          f"{workdir} is in use by {_describe(info)}; if you know that run is "
          f"over, remove its lock: rm '{self.path}'")
    if processes.pid_alive(int(info["pid"])):
      raise WorkdirBusyError(f"{workdir} is in use by {_describe(info)}")
    self._take_over(info)

  def _take_over(self, stale: dict) -> None:
    # Rename first, then check that what was moved is the stale lock: a
    # racing run may have taken over and written its own lock in between,
    # which is then put back (link fails if yet another lock appeared).
    claimed = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
    try:
      os.replace(self.path, claimed)
    except FileNotFoundError:
      return
    moved = self._read(claimed)
    if moved != stale:
      try:
        os.link(claimed, self.path)
      except FileExistsError:
        pass
    else:
      self._log(f"taking over {self.path.parent}: its lock was left by "
                f"{_describe(stale)}, which no longer runs")
    claimed.unlink(missing_ok=True)

  # ------------------------------------------------------------- release

  def release(self) -> None:
    """Removes the lock if it is still this process's."""
    if self._info is None:
      return
    if self._read(self.path) == self._info:
      self.path.unlink(missing_ok=True)
    self._info = None

  @property
  def held(self) -> bool:
    return self._info is not None
