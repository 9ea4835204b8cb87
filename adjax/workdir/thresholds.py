"""Decision thresholds for deployment: record them, check them, resolve them.

Choosing them from scores is `adjax.metrics` (`f1_optimal`,
`quantile_threshold`). A threshold only means something for the scoring mode
and what that mode's scores depend on. Each record names its scoring mode
(`scoring`: zero_shot, few_shot, batch, zero_shot+few_shot,
zero_shot+batch) and its `model` (`model_for`):
- modes with the head: the head (its parameters' hash, the towers, layers,
  image size, quirks) and, combined, `r_list` and `combine` (and `rscin_k`);
- few_shot: the backbone, layers, image size, `r_list` and the reference
  bank (`bank_identity`: a digest of the references' model-size pixels),
  per category or top-level;
- batch: the backbone, layers, image size, `r_list` and `rscin_k`.
A workdir keeps one deployment record per mode (`Workdir.mode_thresholds`:
`thresholds.json` for zero_shot, `thresholds.<mode>.json` otherwise).
`check` refuses a record made for another model, mode or image-score rule,
and `resolve` one made for another mode or another bank, in one line that
names both.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np

from adjax.common import atomic
from adjax.common.errors import UserError
from adjax.models.clip_tokenizer import clean_text
from adjax.modes import SCORINGS, uses_bank
from adjax.workdir import THRESHOLDS_FILE, Workdir

FORMAT_VERSION = 1


class ThresholdError(UserError, ValueError):
  """A threshold file is missing fields or was made for another model or mode."""


# ------------------------------------------------------------- the model a threshold belongs to

def params_sha256(params) -> str:
  """A stable hash of a parameter pytree (paths, shapes, dtypes and bytes)."""
  import jax  # deferred: JAX; the page reads records without it
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def threshold_model(*, backbone_id: str, text_id: str, layers, image_size: int,
                    reference_quirks: bool, head_sha256: str) -> dict[str, Any]:
  """The model a threshold belongs to (the `model` field of thresholds.json):
  what must be equal for a threshold to carry over from one run to another."""
  return {"backbone": str(backbone_id), "text": str(text_id),
          "layers": [int(l) for l in layers], "image_size": int(image_size),
          "reference_quirks": bool(reference_quirks), "head_sha256": str(head_sha256)}


def model_for(scoring: str, *, backbone_id: str, layers, image_size: int,
              reference_quirks: bool, head: Mapping[str, Any] | None = None,
              r_list=(), rscin_k=(), combine: str | None = None) -> dict[str, Any]:
  """The `model` field of a record for `scoring`: the head's `threshold_model`
  for zero_shot (unchanged, so older files still check), else the backbone
  fields (the head's, or "none" without it) with the mode, `r_list`, and
  `rscin_k` (batch) or `combine` (combined)."""
  if scoring not in SCORINGS:
    raise ValueError(f"scoring={scoring!r}: expected one of {', '.join(SCORINGS)}")
  if scoring == "zero_shot":
    if head is None:
      raise ValueError("zero_shot thresholds belong to a head")
    return dict(head)
  base = dict(head) if head is not None and scoring.startswith("zero_shot+") else \
      threshold_model(backbone_id=backbone_id, text_id="none", layers=layers,
                      image_size=image_size, reference_quirks=reference_quirks,
                      head_sha256="none")
  base.update(scoring=scoring, r_list=[int(r) for r in r_list])
  if scoring.endswith("batch"):
    base["rscin_k"] = [int(k) for k in rscin_k]
  if scoring.startswith("zero_shot+"):
    base["combine"] = str(combine)
  return base


def image_digest(image) -> str:
  """The digest of one model-size uint8 image (its shape and pixels)."""
  a = np.ascontiguousarray(np.asarray(image, np.uint8))
  return hashlib.sha256(f"{a.shape}".encode() + a.tobytes()).hexdigest()


def bank_identity(digests, coreset: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """A reference bank's identity from its images' `image_digest`s: their
  sorted digests hashed (the bank's order does not change a score) and
  their number; with a coreset (`coreset.settings`: fraction or count, seed,
  method) the settings join the digest, since a coreset bank scores
  differently from the whole one. Backbone, layers, image size and `r_list`
  are the record's `model`."""
  digests = sorted(str(d) for d in digests)
  if not digests:
    raise ValueError("a reference bank needs at least one image")
  text = "\n".join(digests)
  if coreset:
    text += "\ncoreset " + json.dumps(dict(coreset), sort_keys=True)
  out = {"digest": hashlib.sha256(text.encode()).hexdigest(), "images": len(digests)}
  if coreset:
    out["coreset"] = dict(coreset)
  return out


def _bank_text(bank: Mapping[str, Any] | None) -> str:
  if not bank:
    return "no bank"
  n = bank.get("images")
  core = bank.get("coreset")
  return (f"bank {str(bank.get('digest'))[:12]} ({n} image{'' if n == 1 else 's'}"
          + (f", coreset {core.get('coreset'):g} seed {core.get('seed')}" if core else "") + ")")


# ------------------------------------------------------------- the file

def write(path: str | Path, *, dataset: str, image_score: str, checkpoint_step: int,
          model: Mapping[str, Any], image: float | None = None, pixel: float | None = None,
          method: str = "f1", details: Mapping[str, Any] | None = None,
          scoring: str = "zero_shot", bank: Mapping[str, Any] | None = None) -> Path:
  """Writes a thresholds record atomically (a workdir gets its deployment
  record of `scoring`, `Workdir.mode_thresholds`). `bank`: the reference
  bank (`bank_identity`) of a few-shot record calibrated on one bank; an
  evaluation's few-shot record has one per category instead."""
  path = Path(path)
  if path.is_dir():
    path = Workdir(path).mode_thresholds(scoring)
  if scoring not in SCORINGS:
    raise ValueError(f"scoring={scoring!r}: expected one of {', '.join(SCORINGS)}")
  if image is None and pixel is None:
    raise ValueError("nothing to write: give an image and/or a pixel threshold")
  record = {"format_version": FORMAT_VERSION, "dataset": str(dataset),
            "scoring": scoring,
            "image_score": str(image_score), "checkpoint_step": int(checkpoint_step),
            "model": dict(model), "method": method,
            "image_threshold": None if image is None else float(image),
            "pixel_threshold": None if pixel is None else float(pixel),
            "details": dict(details or {})}
  if bank is not None:
    record["bank"] = dict(bank)
  atomic.write_text(path, json.dumps(record, indent=2, sort_keys=True))
  return path


_REQUIRED = ("format_version", "dataset", "image_score", "checkpoint_step", "model",
             "image_threshold", "pixel_threshold")


def read(path: str | Path) -> dict[str, Any]:
  path = Path(path)
  if path.is_dir():
    path = Workdir(path).thresholds
  try:
    record = json.loads(path.read_text())
  except FileNotFoundError:
    raise ThresholdError(f"{path}: no such file") from None
  except json.JSONDecodeError as e:
    raise ThresholdError(f"{path}: not valid JSON ({e})") from None
  missing = [k for k in _REQUIRED if k not in record]
  if missing:
    raise ThresholdError(f"{path}: missing fields {missing}")
  if record["format_version"] != FORMAT_VERSION:
    raise ThresholdError(f"{path}: format_version {record['format_version']}, expected "
                         f"{FORMAT_VERSION}")
  # A record without `scoring` predates the other modes' records: zero_shot.
  record.setdefault("scoring", "zero_shot")
  if record["scoring"] not in SCORINGS:
    raise ThresholdError(f"{path}: scoring {record['scoring']!r}, expected one of "
                         f"{', '.join(SCORINGS)}")
  record["_path"] = str(path)
  return record


def deployment_path(workdir: str | Path, init_from: str | Path | None = None,
                    scoring: str = "zero_shot") -> Path | None:
  """The deployment record a run decides with in `scoring`:
  `Workdir.mode_thresholds(scoring)` of the workdir, else (a run started
  with `init_from`) the trained run's own; None when neither exists. The
  caller `check`s it against the model as any other."""
  for d in (workdir, init_from):
    if d and Workdir(d).mode_thresholds(scoring).is_file():
      return Workdir(d).mode_thresholds(scoring)
  return None


class Resolved(NamedTuple):
  """The thresholds one object is decided with, and where the image one comes from."""
  image: float | None
  pixel: float | None
  source: str         # "category:<data set>/<name>", "top-level", "predict.threshold", "none"


def resolve(record: Mapping[str, Any] | None, object_name: str,
            cli_override: float | None = None, *, scoring: str = "zero_shot",
            bank: Mapping[str, Any] | None = None) -> Resolved:
  """The one rule that turns a thresholds record into an object's thresholds.

  `predict`, `Detector.predict`, the page and `adjax.export` call this, so
  they decide alike. `record` is what `read` returns (already `check`ed), or
  None when there is no record for the mode; `scoring` the mode the scores
  come from: a record of another mode is refused (ThresholdError, one line).
  - A category the record's evaluation saw (`details.per_category[<data
    set>][object_name]`, the name matched as the text tower reads it:
    `category_of`) has its own F1-max image and pixel thresholds; the
    first data set (in the record's order) that has a value wins, and a
    threshold of 0.0 is a threshold (only a missing one falls back).
  - Otherwise the record's top-level `image_threshold` / `pixel_threshold`.
  - Few-shot modes: thresholds hold for the bank they were made with. `bank`
    (`bank_identity` of the references in use) must be the object's
    category's bank; an object the record did not see takes the category
    made with this bank, else the top-level thresholds when the record's
    `bank` is this one. Any other bank is refused (one line naming both).
  - `cli_override` (`predict.threshold`), when not None and >= 0, replaces
    the image threshold (the pixel one is kept).
  `source` names where the image threshold comes from: "category:<data
  set>/<name>", "top-level", "predict.threshold" or "none" (no image
  threshold: no decision).
  """
  image = pixel = None
  source = "none"
  if record is not None:
    where = record.get("_path", "the thresholds record")
    made_for = record.get("scoring", "zero_shot")
    if made_for != scoring:
      raise ThresholdError(
          f"{where}: made for scoring mode {made_for!r}, these scores are {scoring!r}; "
          "scores of different modes are not comparable: use the record of this mode "
          f"({Workdir('.').mode_thresholds(scoring).name}) or calibrate one")
    image, pixel = record.get("image_threshold"), record.get("pixel_threshold")
    source = "top-level" if image is not None else "none"
    per_category = (record.get("details") or {}).get("per_category", {})
    name = object_name
    if uses_bank(scoring):
      name = _bank_category(record, per_category, object_name, bank, where)
      if name is None:     # the top-level thresholds, made with this bank
        per_category = {}
    own_image = own_pixel = None
    for dataset, cats in per_category.items():
      stored = category_of(cats or {}, name)
      own = ((cats or {}).get(stored) or {}) if stored is not None else {}
      if own_image is None and own.get("image") is not None:
        own_image = (float(own["image"]), f"category:{dataset}/{stored}")
      if own_pixel is None and own.get("pixel") is not None:
        own_pixel = float(own["pixel"])
    if own_image is not None:
      image, source = own_image
    if own_pixel is not None:
      pixel = own_pixel
  if cli_override is not None and cli_override >= 0:
    image, source = float(cli_override), "predict.threshold"
  return Resolved(None if image is None else float(image),
                  None if pixel is None else float(pixel), source)


def same_object(name: str) -> str:
  """An object name as the text tower reads it (`clip_tokenizer.clean_text`:
  ends stripped, whitespace collapsed, lower case, HTML entities and mojibake
  fixed): ' tile' and 'TILE' get the prompts of 'tile', so its threshold."""
  return clean_text(str(name))


def category_of(categories: Mapping[str, Any], object_name: str) -> str | None:
  """The key of `categories` that `object_name` names: itself, else the one
  equal once both are read as the text tower reads them; None when none is."""
  if object_name in categories:
    return object_name
  wanted = same_object(object_name)
  return next((c for c in categories if same_object(c) == wanted), None)


def _bank_category(record, per_category, object_name: str, bank, where) -> str | None:
  """The category of a few-shot record whose thresholds hold for `bank`: the
  object's own (its bank must be `bank`), else one made with `bank`; None for
  the top-level thresholds (the record's `bank` is `bank`). Refuses any other."""
  if bank is None:
    raise ThresholdError(f"{where}: few-shot thresholds hold for their reference bank; "
                         "no references are in use")
  digest = bank.get("digest")
  own = [(key, cats[key]) for cats in per_category.values()
         if (key := category_of(cats or {}, object_name)) is not None]
  if own:
    made = own[0][1].get("bank")
    if made is None or made.get("digest") != digest:
      raise ThresholdError(
          f"{where}: {object_name!r}'s thresholds were made with {_bank_text(made)}, the "
          f"references in use are {_bank_text(bank)}; calibrate again with these "
          "references (predict.calibrate_normals) or use the evaluation's references")
    return own[0][0]
  for cats in per_category.values():
    for name, entry in (cats or {}).items():
      if (entry.get("bank") or {}).get("digest") == digest:
        return name
  if (record.get("bank") or {}).get("digest") == digest:
    return None
  made = record.get("bank") or next(
      (e.get("bank") for cats in per_category.values() for e in (cats or {}).values()
       if e.get("bank")), None)
  raise ThresholdError(
      f"{where}: made with {_bank_text(made)}"
      f"{' and others' if per_category else ''}, the references in use are "
      f"{_bank_text(bank)}; calibrate again with these references "
      "(predict.calibrate_normals)")


def check(record: Mapping[str, Any], *, image_score: str, model: Mapping[str, Any],
          checkpoint_step: int | None = None, scoring: str = "zero_shot",
          head_step: int | None = None) -> None:
  """Refuses thresholds made for another scoring mode, model, image-score
  rule or checkpoint.

  `head_step`: the checkpoint step of the head in use; when only the head
  differs and the file names another step (the newest step was found damaged
  and an earlier one restored), the refusal says so and what to do."""
  where = record.get("_path", THRESHOLDS_FILE)
  made_for = record.get("scoring", "zero_shot")
  if made_for != scoring:
    raise ThresholdError(
        f"{where}: made for scoring mode {made_for!r}, this run scores with {scoring!r}; "
        "scores of different modes are not comparable: use the record of this mode or "
        "calibrate one")
  if record["image_score"] != image_score:
    raise ThresholdError(
        f"{where}: its thresholds were chosen for eval.image_score={record['image_score']!r}"
        f", this model scores images with {image_score!r}; scores of different modes are "
        "not comparable: choose thresholds again for this mode")
  stored = record["model"]
  differ = sorted(k for k in set(stored) | set(model) if stored.get(k) != model.get(k))
  made_at = int(record.get("checkpoint_step", -1))
  if differ == ["head_sha256"] and head_step is not None and made_at >= 0 \
      and made_at != head_step:
    why = (f"step {made_at} is newer than the step in use: it was found damaged (or is "
           "gone), so the newest intact step was restored" if made_at > head_step else
           "the head was trained further since")
    raise ThresholdError(
        f"{where}: made for another model (head_sha256 differs): its thresholds belong to "
        f"checkpoint step {made_at}, this head is step {head_step} ({why}); choose "
        f"thresholds for step {head_step} (mode=evaluate with "
        "--config.eval.set_thresholds=True, or predict.calibrate_normals), pass "
        "predict.threshold, or restore the checkpoint the thresholds were made with")
  if differ:
    detail = "; ".join(f"{k}: file {stored.get(k)!r}, model {model.get(k)!r}" for k in differ)
    raise ThresholdError(f"{where}: made for another model ({detail}); choose thresholds "
                         "again for this one")
  if checkpoint_step is not None and record["checkpoint_step"] != checkpoint_step:
    raise ThresholdError(f"{where}: made at checkpoint step {record['checkpoint_step']}, "
                         f"this head is step {checkpoint_step}")
