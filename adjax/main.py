"""Command line: `python -m adjax.main --config=configs/mvtec.py [--workdir=DIR]`.

Parses the (locked) config, sets up logging and, when configured,
`jax.distributed`, then dispatches to train / evaluate / predict.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys

# transformers announces at import that PyTorch is absent (it is optional).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import app, flags, logging
from ml_collections import config_flags

from adjax.common import errors
from adjax.config import doc as config_doc

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


def _config_spec(argv) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def flag_error(argv, e: BaseException) -> str:
  """One line for a command line that cannot be parsed (the config file and
  its `--config.*` overrides are read while flags parse, before main)."""
  spec = _config_spec(argv)
  path = spec.partition(":")[0] if spec else None
  if path is not None and not os.path.isfile(path):
    return (f"--config={spec}: no such config file (a relative path is taken from the "
            f"current folder, {os.getcwd()})")
  if isinstance(e, SyntaxError) or isinstance(e.__cause__, SyntaxError):
    err = e if isinstance(e, SyntaxError) else e.__cause__
    return f"--config={spec}: {err.filename or path}, line {err.lineno}: {err.msg}"
  text = str(e)
  if "has no attribute 'get_config'" in text:
    return f"--config={spec}: {path} defines no get_config(arg=None) function"
  guess = re.search(r'Did you mean \\?"([^"\\]+)\\?" instead of \\?"([^"\\]+)\\?"', text)
  if guess:
    good, bad = guess.groups()
    given = [a for a in argv if a.startswith("--config.") and bad in a.split("=")[0]]
    return (f"{given[0].split('=')[0] if given else bad}: the config has no field "
            f"{bad!r}; did you mean {good!r}? (--config_help lists every field)")
  if isinstance(e, (KeyError, AttributeError)) and e.args:
    bad = str(e.args[0]).strip("'\"").splitlines()[0].strip("'\"")
    given = [a.split("=")[0] for a in argv if a.startswith("--config.")
             and bad in a.split("=")[0].split(".")]
    if given:
      return (f"{given[0]}: the config has no field or section {bad!r} (--config_help "
              "lists every field)")
  if not isinstance(e, flags.Error) and spec and not guess:
    return f"--config={spec}: loading it raised {type(e).__name__}: " + " ".join(
        text.split())[:300]
  text = " ".join(text.replace("\\n", " ").split())
  if "invalid literal for int()" in text or "could not convert string to float" in text:
    text += " (expected a number)"
  return text or type(e).__name__


def _parse_flags(argv):
  """absl's flag parsing, with one `error:` line (exit 2) instead of a
  traceback or a FATAL block for a bad flag, override or config file."""
  try:
    return flags.FLAGS(argv)
  except SystemExit:
    raise
  except Exception as e:      # noqa: BLE001  (flags.Error, and the config file's own errors)
    if os.environ.get("ADJAX_TRACEBACK"):
      raise
    print(f"error: {flag_error(argv, e)}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER_ERROR)


def environment_error(e: BaseException) -> str | None:
  """One line for a file-system problem the user can fix, else None
  (`errors.environment_error`, shared with every command)."""
  return errors.environment_error(e)


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
  try:
    cfg = _CONFIG.value       # the config file is loaded here when no override forced it
    cfg.mode                  # (lazily: touching a field loads it)  # noqa: B018
  except Exception as e:      # noqa: BLE001  (a missing file or one that does not run)
    if flags.FLAGS.verbosity >= 1 or os.environ.get("ADJAX_TRACEBACK"):
      raise
    print(f"error: {flag_error(sys.argv, e)}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER_ERROR)
  if _CONFIG_HELP.value:
    print(config_doc.text_table(cfg))
    return
  from adjax import experiment  # deferred: JAX loads after the flags are checked
  try:
    experiment.run(cfg, _WORKDIR.value)
  except errors.user_errors() as e:
    # A user mistake: one clear message, no traceback (a traceback means a
    # bug). --verbosity=1 or ADJAX_TRACEBACK=1 shows it anyway.
    if flags.FLAGS.verbosity >= 1 or os.environ.get("ADJAX_TRACEBACK"):
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER_ERROR)
  except Exception as e:      # noqa: BLE001  (a full disk or a read-only folder is not a bug)
    message = environment_error(e)
    if message is None or flags.FLAGS.verbosity >= 1 or os.environ.get("ADJAX_TRACEBACK"):
      raise
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER_ERROR)
  except KeyboardInterrupt:
    # Ctrl-C: the lock and temporaries are already released; say how to go on.
    print(interrupted_message(cfg.mode), file=sys.stderr, flush=True)
    sys.exit(130)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
