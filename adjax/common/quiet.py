"""A quiet and honest console: library noise dropped, long waits announced.

Orbax warns `Metadata file does not exist: .../_CHECKPOINT_METADATA` on every
restore of a checkpoint written without that optional file (the converted
weights and, depending on the version, the run's own checkpoints); the
restore itself is complete and checked. The filter drops that one message
from orbax's modules and nothing else, for every entry point that imports
the checkpoint code (the run, export, the page, the Python API).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Iterator

_DROPPED = ("Metadata file does not exist",)


class _DropOrbaxNoise(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    if "orbax" not in record.pathname.replace("\\", "/"):
      return True
    return not str(record.msg).startswith(_DROPPED)


_FILTER = _DropOrbaxNoise()


def drop_library_noise() -> None:
  """Installs the filter on absl's logger (idempotent)."""
  logger = logging.getLogger("absl")
  if _FILTER not in logger.filters:
    logger.addFilter(_FILTER)


# A wait longer than this many seconds is announced by a "doing X" line.
ANNOUNCE_AFTER_S = float(os.environ.get("ADJAX_ANNOUNCE_AFTER_S", "3"))


@contextlib.contextmanager
def announce_if_slow(line: str, stream=None) -> Iterator[None]:
  """Prints `line` (stderr) once the block has run ANNOUNCE_AFTER_S seconds:
  a long wait says what it is doing, and a quick refusal stays one line."""
  def say():
    print(line, file=stream or sys.stderr, flush=True)
  if ANNOUNCE_AFTER_S <= 0:
    say()
    yield
    return
  timer = threading.Timer(ANNOUNCE_AFTER_S, say)
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    timer.cancel()
