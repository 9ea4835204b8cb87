"""Processes: who this one is, whether another still runs, SIGTERM as an exception.

Temporaries (`atomic`) and the workdir lock (`adjax.workdir.lock`) carry their
writer's host and pid, so a later run can tell a live writer's files from a
killed one's leftovers. Liveness can only be checked on this host: an owner
on another host is always treated as alive.

`sigterm_raises()` turns SIGTERM into a `Terminated` exception for the
duration of a block, so the `finally`/`except BaseException` clean-ups that
already run on errors and on Ctrl-C (KeyboardInterrupt) also run when a job
scheduler or `kill` ends the process. `Terminated` is a `SystemExit` with
status 143 (128 + SIGTERM): uncaught, it ends the process quietly with the
status a shell reports for a SIGTERM, and `except Exception` does not
swallow it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
from typing import Iterator


def this_host() -> str:
  """This machine's name, reduced to characters safe in a file name."""
  return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def pid_alive(pid: int) -> bool:
  """Whether process `pid` runs on this host (a zombie counts as ended)."""
  if pid <= 0:
    return False
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  try:  # Linux: a killed child its parent has not reaped yet is a zombie
    with open(f"/proc/{pid}/stat") as f:
      state = f.read().rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")
  except (OSError, IndexError):
    return True


def owner_alive(host: str, pid: int) -> bool:
  """Whether the owner (host, pid) may still run: unknowable elsewhere, so True."""
  return host != this_host() or pid_alive(pid)


class Terminated(SystemExit):
  """Raised in the main thread when the process receives SIGTERM."""

  def __init__(self):
    super().__init__(128 + signal.SIGTERM)

  def __str__(self) -> str:
    return "terminated by SIGTERM"


def _raise_terminated(signum, frame):
  del signum, frame
  raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
  """Within the block, SIGTERM raises `Terminated`; the old handler comes back after.

  Does nothing outside the main thread (Python delivers signals there only)
  or when SIGTERM already has a handler other than the default (an
  application that manages SIGTERM itself keeps doing so) or is ignored.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.getsignal(signal.SIGTERM)
  if previous not in (signal.SIG_DFL, _raise_terminated):
    yield
    return
  signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
