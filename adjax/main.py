"""Command line: `python -m adjax.main --config=configs/mvtec.py [--workdir=DIR]`.

Parses the (locked) config, sets up logging and, when configured,
`jax.distributed`, then dispatches to train / evaluate / predict.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

# transformers announces at import that PyTorch is absent (it is optional).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/mvtec.py or configs/mvtec.py:tpu.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default: runs/<config name>).")
_CONFIG_HELP = flags.DEFINE_bool(
    "config_help", False, "Print every config field with its value under --config and its "
    "meaning, then exit.")
flags.mark_flags_as_required(["config"])


class _DropTfdsConfigNotice(std_logging.Filter):
  """TFDS warns on every open of a user-folder data set that its config is custom."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return "Using custom data configuration" not in record.getMessage()


def interrupted_message(mode: str) -> str:
  """What Ctrl-C left behind, for the mode that was running."""
  if mode == "train":
    return "interrupted; run the same command again to resume from the last checkpoint"
  if mode == "predict":
    return ("interrupted; predictions/ is left as it was before this run (nothing "
            "partial is kept); run the same command again to predict")
  return ("interrupted; results already written are kept; run the same command again "
          "to evaluate")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and TFDS log every file operation at INFO; progress bars and
    # result tables are printed anyway. Pass --verbosity=0 to see them.
    logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("absl").addFilter(_DropTfdsConfigNotice())
  if _CONFIG_HELP.value:
    from adjax import config_doc
    print(config_doc.text_table(_CONFIG.value))
    return
  from adjax import errors, experiment
  try:
    experiment.run(_CONFIG.value, _WORKDIR.value)
  except errors.user_errors() as e:
    # A user mistake: one clear message, no traceback (a traceback means a
    # bug). --verbosity=1 or ADJAX_TRACEBACK=1 shows it anyway.
    if flags.FLAGS.verbosity >= 1 or os.environ.get("ADJAX_TRACEBACK"):
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER_ERROR)
  except KeyboardInterrupt:
    # Ctrl-C: the lock and temporaries are already released; say how to go on.
    print(interrupted_message(_CONFIG.value.mode), file=sys.stderr, flush=True)
    sys.exit(130)


if __name__ == "__main__":
  app.run(main)
