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


class UserError(Exception):
  """A user mistake: printed as one line, no traceback."""


# Exit status of a run stopped by a user mistake (config, file, mismatch).
EXIT_USER_ERROR = 2


def user_errors() -> tuple[type[BaseException], ...]:
  """The exception types the entry points print as one line: UserError and
  its subclasses, and a missing or already existing file (the message names
  the path)."""
  return (UserError, FileNotFoundError, FileExistsError)


def run_command(fn):
  """Runs a command-line entry point's work: (0, fn()) or, for a user error,
  one `error: ...` line on stderr and (EXIT_USER_ERROR, None).

  SIGTERM raises inside (so temporaries are removed on it as on Ctrl-C); every
  command of the project (converters, export) reports the same way.
  """
  import sys

  from adjax.common import processes
  try:
    with processes.sigterm_raises():
      return 0, fn()
  except user_errors() as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR, None
