"""What made an artifact: fingerprints stored beside it and checked on use.

Four fingerprints, named apart:
- run identity: a training workdir's training fields (`run_identity.json`;
  `read_run_identity`, `check_run_identity`, `check_head_model`), here;
- results identity: what one evaluation's results came from (`results_stem`
  names its files by it; built by `evaluate.Evaluator.results_identity`);
- threshold model: the model a decision threshold belongs to (the `model`
  field of thresholds.json; `adjax.workdir.thresholds.threshold_model`, and
  `Scorer.threshold_model()` for a loaded head);
- the checkpoint step a threshold was chosen at (`adjax.workdir.thresholds.check`).

- A workdir stores the training-relevant part of its config
  (`<workdir>/run_identity.json`, written when training first starts).
  Resuming with a different value of any of those fields is refused, naming
  each field; so is evaluating or predicting with the workdir's own head
  under a config whose model differs from the one it was trained with.
  `resume_mismatch=allow` proceeds anyway (and says so).
- Results carry the identity of the evaluation (checkpoint and step, model,
  towers, evaluation settings, data set); a different evaluation writes
  beside earlier results instead of over them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from adjax.common import atomic
from adjax.common.errors import UserError
from adjax.workdir import Workdir

# Fields that cannot change what training computes: logging and checkpoint
# cadence, evaluation and prediction settings, where data and caches live,
# devices and processes (the sharded step equals the 1-device step).
NOT_TRAINING = (
    "mode", "workdir", "name", "init_from", "resume_mismatch", "eval.", "predict.",
    "data.targets", "data.worker_count", "data.prefetch", "data.demo.", "data.data_dir",
    "data.manual_dirs.", "log_every_steps", "checkpoint_every_steps",
    "checkpoints_to_keep", "mesh.", "distributed", "coordinator_address",
    "num_processes", "process_id", "text.cache_dir", "feature_cache_dir",
    "backbone.dtype", "train.allow_no_anomalies",
    # where missing weights and data are fetched from (the converted weights'
    # digests and the prepared data's source identify what was used)
    "backbone.hub_id", "text.hub_id", "data.download", "data.sources.",
)
# Fields that make the model a trained head belongs to.
MODEL_FIELDS = ("backbone.", "text.", "reference_quirks", "seed")
MODEL_EXCEPT = ("backbone.dtype", "text.cache_dir", "backbone.hub_id", "text.hub_id")


class IdentityMismatchError(UserError, ValueError):
  """An artifact was made by something other than what is asked now."""


def flatten(cfg) -> dict:
  """A config as {dotted.key: JSON value}, keys in order at every level (as a
  `ConfigDict` lists them; a typed `RunConfig` is listed the same way)."""
  def walk(node, prefix):
    for key, value in sorted(node.items()):
      if hasattr(value, "items"):
        yield from walk(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}", json.loads(json.dumps(
            list(value) if isinstance(value, tuple) else value, default=str))
  return dict(walk(cfg, ""))


def _starts(key: str, prefixes) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def training_fields(cfg) -> dict:
  return {k: v for k, v in flatten(cfg).items() if not _starts(k, NOT_TRAINING)}


def model_fields(cfg_or_flat) -> dict:
  flat = cfg_or_flat if isinstance(cfg_or_flat, dict) else flatten(cfg_or_flat)
  return {k: v for k, v in flat.items()
          if _starts(k, MODEL_FIELDS) and not _starts(k, MODEL_EXCEPT)}


def digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _differences(stored: dict, now: dict) -> list[str]:
  keys = sorted(set(stored) | set(now))
  return [f"{k}: {stored.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}"
          for k in keys if stored.get(k) != now.get(k)]


def read_run_identity(workdir: Path) -> dict | None:
  """The run identity stored in `workdir` (None when it has none)."""
  path = Workdir(workdir).run_identity
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise IdentityMismatchError(f"{path}: unreadable ({e}); it records how the run "
                                "was configured: restore it or use a new workdir") from None


def check_run_identity(cfg, workdir: Path, *, resuming: bool) -> None:
  """Refuses to resume `workdir` under a config whose training fields (its run
  identity) differ; records them on a fresh start."""
  now = training_fields(cfg)
  stored = read_run_identity(workdir)
  if stored is None or not resuming:
    atomic.write_text(Workdir(workdir).run_identity,
                      json.dumps({"training": now}, indent=2, sort_keys=True))
    return
  diffs = _differences(stored.get("training", {}), now)
  if diffs:
    _mismatch(cfg, f"{workdir} was trained with another config; resuming it would mix "
              "two runs", diffs, "or a new --workdir")


def check_head_model(cfg, source: Path) -> None:
  """Refuses to use `source`'s trained head under a config of another model
  (the model fields of its run identity)."""
  stored = read_run_identity(source)
  if stored is None:
    return
  diffs = _differences(model_fields(stored.get("training", {})), model_fields(cfg))
  if diffs:
    _mismatch(cfg, f"the head in {source} was trained for another model", diffs,
              "with the training config's values")


def _mismatch(cfg, what: str, diffs: list[str], alternative: str) -> None:
  if cfg.resume_mismatch == "allow":
    logging.warning("%s (resume_mismatch=allow): %s", what, "; ".join(diffs))
    print(f"warning: {what}; proceeding (resume_mismatch=allow): {'; '.join(diffs)}",
          flush=True)
    return
  raise IdentityMismatchError(
      f"{what}: {'; '.join(diffs)}. Pass --config.resume_mismatch=allow to proceed "
      f"anyway, {alternative}")


def results_stem(out_dir: Path, name: str, ident: dict) -> str:
  """The file stem for results of results identity `ident`: `name` unless results of another
  evaluation already sit there, then `name@<digest>`."""
  existing = Path(out_dir) / f"{name}.json"
  if not existing.exists():
    return name
  try:
    stored = json.loads(existing.read_text()).get("identity")
  except ValueError:
    stored = None
  if stored == json.loads(json.dumps(ident, default=str)):
    return name
  return f"{name}@{digest(ident)[:10]}"
