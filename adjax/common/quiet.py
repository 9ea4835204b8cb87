"""Library log lines that say nothing to a user, dropped where they arise.

Orbax warns `Metadata file does not exist: .../_CHECKPOINT_METADATA` on every
restore of a checkpoint written without that optional file (the converted
weights and, depending on the version, the run's own checkpoints); the
restore itself is complete and checked. The filter drops that one message
from orbax's modules and nothing else, for every entry point that imports
the checkpoint code (the run, export, the page, the Python API).
"""

from __future__ import annotations

import logging

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
