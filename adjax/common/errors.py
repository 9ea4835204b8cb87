"""The one error type a user is shown as a single line.

`UserError` marks a user mistake or an environment problem the user can fix
(a missing file, a busy workdir, a checkpoint of the wrong kind): the entry
points print `error: <message>` as one line, with no traceback, and exit
with a non-zero status. Anything else is a bug and keeps its traceback.

Subclasses keep their own names (and, where older code expects it, a second
base such as `ValueError`), so `except ValueError` and `except DataError`
go on working.
"""

from __future__ import annotations

import errno
import os
import sys

from adjax.common import processes


class UserError(Exception):
  """A user mistake: printed as one line, no traceback."""


# Exit status of a run stopped by a user mistake (config, file, mismatch).
EXIT_USER_ERROR = 2


def user_errors() -> tuple[type[BaseException], ...]:
  """The exception types the entry points print as one line: UserError and
  its subclasses, and a missing or already existing file (the message names
  the path)."""
  return (UserError, FileNotFoundError, FileExistsError)


def environment_error(e: BaseException) -> str | None:
  """One line for a file-system problem the user can fix (permission, a
  read-only file system, a full disk, a file where a folder belongs), else None."""
  if isinstance(e, PermissionError):
    return (f"{e.filename or e}: permission denied; the workdir and its files must be "
            "writable by this user (or pass another --workdir)")
  if isinstance(e, OSError) and e.errno == errno.EROFS:
    return (f"{e.filename or 'a file'}: read-only file system; write to a writable "
            "folder (another --workdir or --out)")
  if isinstance(e, OSError) and e.errno == errno.ENOSPC:
    return f"{e.filename or 'a file'}: no space left on the device; free some and rerun"
  if isinstance(e, NotADirectoryError):
    return f"{e.filename}: a file where a folder is expected"
  text = str(e)
  if "RESOURCE_EXHAUSTED" in text or "No space left on device" in text:
    first = " ".join(text.split())[:300]
    return f"no space left on the device ({first}); free some and rerun"
  if "Read-only file system" in text:
    first = " ".join(text.split())[:300]
    return f"read-only file system ({first}); write to a writable folder"
  return None


def run_command(fn):
  """Runs a command-line entry point's work: (0, fn()) or, for a user error,
  one `error: ...` line on stderr and (EXIT_USER_ERROR, None).

  SIGTERM raises inside (so temporaries are removed on it as on Ctrl-C); every
  command of the project (converters, export) reports the same way.
  """

  try:
    with processes.sigterm_raises():
      return 0, fn()
  except user_errors() as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR, None
  except Exception as e:      # noqa: BLE001  (a read-only or full disk is not a bug)
    message = environment_error(e)
    if message is None or os.environ.get("ADJAX_TRACEBACK"):
      raise
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR, None
