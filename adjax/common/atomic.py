"""Atomic writes: outputs appear complete under their final name or not at all.

Everything the project writes that a later run trusts (converted checkpoints,
prepared data sets, feature caches, result files) goes through these helpers:
the content is written under a temporary sibling name and renamed into place
only when it is complete, so an interrupted or failed write leaves nothing
behind at the destination.

- Modes follow the umask, as for any file the user creates: 0666 & ~umask
  for files, 0777 & ~umask for directories (`tempfile` alone would leave
  0600 / 0700, and the rename would keep it).
- Temporaries are removed on every exit path: errors, Ctrl-C, and SIGTERM
  (turned into an exception for the duration, see `processes`).
- A temporary is named `.<name>.tmp-<pid>-<host>-<random>`. A process killed
  with SIGKILL cannot clean up; the next write into the same folder removes
  such leftovers (with a one-line message) when their pid no longer runs on
  this host, and never touches a live writer's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from adjax.common import processes

log = logging.getLogger(__name__)

# .<name>.<kind>-<pid>-<host>-<8 random characters of tempfile>
_OWNED = re.compile(
    r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[A-Za-z0-9._-]+)"
    r"-[a-z0-9_]{8}")
_SCANNED: set[Path] = set()


def umask() -> int:
  """The process umask, read without changing it where the OS allows."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  old = os.umask(0o022)  # elsewhere: set and restore (not thread-safe)
  os.umask(old)
  return old


def file_mode() -> int:
  return 0o666 & ~umask()


def dir_mode() -> int:
  return 0o777 & ~umask()


def temp_prefix(name: str, kind: str = "tmp") -> str:
  """The prefix of this process's temporaries for destination name `name`."""
  return f".{name}.{kind}-{os.getpid()}-{processes.this_host()}-"


def longest_name(parent: str | os.PathLike = ".") -> int:
  """The longest destination name (in bytes) whose temporary (`temp_prefix`
  plus tempfile's 8 characters) still fits the file system's name limit."""
  try:
    limit = os.pathconf(os.fspath(parent), "PC_NAME_MAX")
  except (OSError, ValueError):
    limit = 255
  return min(limit, 255) - len(temp_prefix("").encode()) - 8


def owned_temporaries(parent: str | os.PathLike, name: str | None = None
                      ) -> list[tuple[Path, str, int]]:
  """(path, host, pid) of every owned temporary in `parent` (for `name`)."""
  parent = Path(parent)
  try:
    entries = list(os.scandir(parent))
  except FileNotFoundError:
    return []
  out = []
  for e in entries:
    m = _OWNED.fullmatch(e.name)
    if m and (name is None or m["name"] == name):
      out.append((Path(e.path), m["host"], int(m["pid"])))
  return out


def remove_stale(parent: str | os.PathLike, name: str | None = None) -> list[Path]:
  """Removes temporaries in `parent` whose writer no longer runs; returns them.

  An `.old-` directory still holding a destination that is missing (the
  writer was killed between its two renames) is moved back into place.
  """
  removed = []
  for path, host, pid in owned_temporaries(parent, name):
    if processes.owner_alive(host, pid):
      continue
    m = _OWNED.fullmatch(path.name)
    dst = path.parent / m["name"]
    if m["kind"] == "old" and (path / "x").exists() and not os.path.lexists(dst):
      os.replace(path / "x", dst)
      log.warning("restored %s from %s, left by process %d (no longer running)",
                  dst, path.name, pid)
    else:
      log.warning("removed %s, left by process %d (no longer running)", path, pid)
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        path.unlink()
    removed.append(path)
  return removed


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
  """Yields a fresh temporary directory that becomes `dst` on success.

  Args:
    dst: final directory path.
    overwrite: replace an existing `dst`; otherwise an existing `dst` is an
      error (raised before anything is written).
  """
  dst = Path(dst).absolute()
  if dst.parent.is_dir():
    remove_stale(dst.parent, dst.name)
  if dst.exists() and not overwrite:
    raise FileExistsError(
        f"{dst} already exists; remove it or pass an overwrite flag")
  dst.parent.mkdir(parents=True, exist_ok=True)
  with processes.sigterm_raises():
    tmp = None
    try:
      tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dst.name), dir=dst.parent))
      os.chmod(tmp, dir_mode())
      yield tmp
      if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(dst.name, "old"), dir=dst.parent))
        os.replace(dst, old / "x")
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
      else:
        os.replace(tmp, dst)
    except BaseException:
      if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
      raise


@contextlib.contextmanager
def atomic_file(dst: str | os.PathLike, mode: str = "w") -> Iterator:
  """Opens a temporary file beside `dst`; renames it to `dst` on success."""
  dst = Path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  parent = dst.parent.absolute()
  if parent not in _SCANNED:  # once per folder and process: heatmaps are many
    remove_stale(parent)
    _SCANNED.add(parent)
  with processes.sigterm_raises():
    tmp = None
    try:
      fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dst.name), dir=dst.parent)
      os.fchmod(fd, file_mode())
      with os.fdopen(fd, mode) as f:
        yield f
      os.replace(tmp, dst)
    except BaseException:
      if tmp is not None:
        with contextlib.suppress(FileNotFoundError):
          os.unlink(tmp)
      raise


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike, name: str) -> Iterator[Path]:
  """A temporary directory in `parent`, removed on exit whatever happens.

  Named like `atomic_dir`'s temporaries (`.<name>.tmp-<pid>-<host>-...`), so a
  killed run's scratch is removed by the next run, and its presence tells
  others that this process is at work on `name`.
  """
  parent = Path(parent)
  parent.mkdir(parents=True, exist_ok=True)
  remove_stale(parent, name)
  with processes.sigterm_raises():
    tmp = None
    try:
      tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(name), dir=parent))
      yield tmp
    finally:
      if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(dst: str | os.PathLike, text: str) -> None:
  with atomic_file(dst, "w") as f:
    f.write(text)


def write_bytes(dst: str | os.PathLike, data: bytes) -> None:
  with atomic_file(dst, "wb") as f:
    f.write(data)
