"""The whole run config checked once, before any work.

`check(cfg)` runs before devices are used, data sets are prepared or towers
are built, and raises one `ConfigError` that lists every problem found, each
naming its field and what is expected. The model-shape checks (image size
against the backbone's patch, tapped layers within its depth, the image-score
rule) come from the model module, so the check and the model cannot drift.
"""

from __future__ import annotations

import math
from pathlib import Path

from adjax import modes
from adjax.common.errors import UserError
from adjax.config import schema
from adjax.config.schema import (BACKBONE_SHARDINGS, DTYPES, FEATURE_CACHES, MODES,  # noqa: F401
                                 TEXT_ACTIVATIONS)
from adjax.models import backbones


class ConfigError(UserError, ValueError):
  """The run config has problems; the message lists each with its field."""


def _enum(problems, name, value, allowed):
  if value not in allowed:
    problems.append(f"{name}={value!r}: expected one of {', '.join(map(repr, allowed))}")


def _at_least(problems, name, value, low):
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    problems.append(f"{name}={value!r}: expected an integer >= {low}")


def _get(cfg, dotted: str):
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def _targets(cfg) -> list[str]:
  return [t.strip() for t in str(cfg.data.targets).split(",") if t.strip()]


def _data_source_problem(cfg, field: str, target: str) -> str | None:
  """A data set name, or a folder that exists (or that the demo generates)."""
  from adjax import data  # deferred: JAX and grain; the check runs without them
  if target in data.DATASETS and target != "folder":
    if target not in cfg.data.manual_dirs:
      return f"data.manual_dirs has no entry for {field} {target!r}"
    return None
  if Path(target).is_dir():
    return None
  demo = str(cfg.data.demo.root)
  if demo and Path(target).resolve().is_relative_to(Path(demo).resolve()):
    return None
  return (f"{field}: {target!r} is neither a data set name "
          f"({', '.join(n for n in data.DATASETS if n != 'folder')}) nor an existing folder")


def problems(cfg, *, device_count: int | None = None,
             process_count: int | None = None) -> list[str]:
  """Every problem of `cfg`; device and process counts enable the divisibility checks."""
  out: list[str] = []
  for name, f in schema.declared():       # the bounds declared with each field
    value = _get(cfg, name)
    if f.metadata.get("choices") is not None:
      _enum(out, name, value, f.metadata["choices"])
    if f.metadata.get("minimum") is not None:
      _at_least(out, name, value, f.metadata["minimum"])
  if cfg.mesh.data != -1:
    _at_least(out, "mesh.data", cfg.mesh.data, 1)
  if not (math.isfinite(cfg.optimizer.learning_rate) and cfg.optimizer.learning_rate > 0):
    out.append(f"optimizer.learning_rate={cfg.optimizer.learning_rate!r}: expected a "
               "finite number > 0")
  if not 0 <= cfg.optimizer.warmup_fraction < 1:
    out.append(f"optimizer.warmup_fraction={cfg.optimizer.warmup_fraction!r}: expected "
               "a fraction in [0, 1)")
  compare = tuple(cfg.eval.compare)
  unknown = [m for m in compare if m not in modes.SCORINGS]
  if unknown or len(set(compare)) != len(compare):
    out.append(f"eval.compare={compare!r}: expected distinct modes, each one of "
               f"{', '.join(modes.SCORINGS)}")
  # The neighbour kinds evaluated: eval.scoring's and eval.compare's.
  kinds = {modes.neighbour_kind(m) for m in (cfg.eval.scoring, *compare)}
  refs_dir = str(cfg.eval.references_dir)
  if refs_dir and "few_shot" not in kinds:
    out.append(f"eval.references_dir is set but eval.scoring={cfg.eval.scoring!r}; set "
               "eval.scoring=few_shot (or zero_shot+few_shot) to score against it")
  elif refs_dir and modes.CATEGORY not in refs_dir and not Path(refs_dir).is_dir():
    out.append(f"eval.references_dir={refs_dir!r}: not a folder (expected one subfolder "
               "of normal images per category)")
  if cfg.eval.references_split == "train" and "few_shot" not in kinds:
    out.append(f"eval.references_split=train is set but eval.scoring={cfg.eval.scoring!r}; "
               "set eval.scoring=few_shot (or zero_shot+few_shot)")
  elif cfg.eval.references_split == "train" and refs_dir:
    out.append("eval.references_split=train and eval.references_dir are both set; the "
               "bank comes from one of them")
  if ("few_shot" in kinds and cfg.eval.references == 0 and not refs_dir
      and cfg.eval.references_split != "train"):
    out.append("eval.references=0 (all) leaves no test image to score; take the bank from "
               "eval.references_dir or eval.references_split=train")
  coreset = cfg.eval.coreset
  if not (math.isfinite(coreset) and (0 <= coreset <= 1 or coreset == int(coreset))):
    out.append(f"eval.coreset={coreset!r}: expected 0 (off), a fraction in (0, 1] or a "
               "whole count > 1 of reference patches")
  elif coreset and "few_shot" not in kinds and cfg.predict.scoring != "few_shot":
    out.append(f"eval.coreset is set but eval.scoring={cfg.eval.scoring!r}; the coreset "
               "is of the few_shot bank (set eval.scoring=few_shot or zero_shot+few_shot, "
               "or predict.scoring=few_shot)")
  subset = cfg.eval.batch_subset
  if subset and subset < 5:
    out.append(f"eval.batch_subset={subset!r}: expected 0 (off) or at least 5 images per "
               "subset (each image is scored against the others of its subset)")
  elif subset and "batch" not in kinds and cfg.predict.scoring != "batch":
    out.append(f"eval.batch_subset is set but eval.scoring={cfg.eval.scoring!r}; it "
               "splits batch scoring (set eval.scoring=batch or zero_shot+batch, or "
               "predict.scoring=batch)")
  r_list = tuple(cfg.eval.r_list)
  if not r_list or any(not isinstance(r, int) or r < 1 or r % 2 == 0 for r in r_list):
    out.append(f"eval.r_list={r_list!r}: expected odd neighbourhood sizes >= 1, e.g. (1, 3, 5)")
  k_list = tuple(cfg.eval.rscin_k)
  if not k_list or any(not isinstance(k, int) or k < 0 for k in k_list):
    out.append(f"eval.rscin_k={k_list!r}: expected integers >= 1, or (0,) to turn RsCIN off")
  if not 0 < cfg.eval.fpr_limit <= 1:
    out.append(f"eval.fpr_limit={cfg.eval.fpr_limit!r}: expected a value in (0, 1]")

  # The model: family, variant, sizes, layers, checkpoint.
  info = None
  checkpoint = [] if cfg.backbone.random_init else _checkpoint_problems(cfg)
  if checkpoint:
    out += checkpoint
  elif checkpoint is None and not cfg.backbone.variant:
    pass                          # the architecture is known once it is fetched
  else:
    try:
      if cfg.backbone.variant or cfg.backbone.random_init:
        config = backbones.variant_config(cfg.backbone.family, cfg.backbone.variant)
        info = backbones.describe(cfg.backbone.family, config)
      else:                       # the converted checkpoint's own architecture
        info = backbones.describe_checkpoint(cfg.backbone.family, cfg.backbone.checkpoint)
    except backbones.BackboneError as e:
      out.append(str(e))
  if info is not None:
    layers = tuple(cfg.backbone.layers) if cfg.backbone.layers else info.default_layers()
    out += backbones.model_problems(info, layers, int(cfg.image_size), cfg.eval.image_score)
  if modes.head_free_for(cfg.mode, cfg.eval.scoring, tuple(cfg.eval.compare),
                         cfg.predict.scoring):
    pass                          # the text tower is not built
  elif cfg.text.random_init:
    from adjax.models import clip_text  # deferred: JAX and grain; the check runs without them
    _enum(out, "text.variant", cfg.text.variant, tuple(sorted(clip_text.VARIANTS)))
  elif not Path(cfg.text.checkpoint).is_dir() and not cfg.text.hub_id:
    out.append(f"text.checkpoint={cfg.text.checkpoint!r} does not exist; convert the "
               "weights first (python -m converters.clip_text --src ... --dst "
               f"{cfg.text.checkpoint}), set text.hub_id, or set text.random_init=True")

  # Data and modes.
  if cfg.mode == "train":
    problem = _data_source_problem(cfg, "data.train", str(cfg.data.train))
    if problem:
      out.append(problem)
  if cfg.mode == "build_bank" and modes.neighbour_kind(cfg.eval.scoring) != "few_shot":
    out.append(f"mode=build_bank builds the few_shot bank, but eval.scoring="
               f"{cfg.eval.scoring!r}; set eval.scoring=few_shot (or zero_shot+few_shot)")
  if cfg.mode in ("evaluate", "build_bank") or (cfg.mode == "train" and cfg.eval.enabled):
    targets = _targets(cfg)
    if not targets:
      out.append("data.targets is empty: name at least one data set or folder "
                 "(or set eval.enabled=False to train only)")
    for target in targets:
      problem = _data_source_problem(cfg, "data.targets", target)
      if problem:
        out.append(problem)
  if cfg.mode == "predict" and not (cfg.predict.input or cfg.predict.calibrate_normals):
    out.append("predict.input is empty: expected a folder or a glob of images "
               "(or predict.calibrate_normals to set thresholds only)")
  if cfg.mode == "predict" and cfg.predict.scoring == "zero_shot" and not str(cfg.predict.object_name).strip():
    out.append("predict.object_name is empty: expected the name of the object in the "
               "images (the prompt's object, e.g. bottle), one of the evaluated categories "
               "to use its own threshold")
  if cfg.predict.scoring == "few_shot" and not cfg.predict.references:
    out.append("predict.scoring=few_shot needs predict.references: a folder or glob of "
               "normal images")
  if cfg.predict.references and cfg.predict.scoring != "few_shot":
    out.append(f"predict.references is set but predict.scoring={cfg.predict.scoring!r}; "
               "set predict.scoring=few_shot to score against them")
  threshold = cfg.predict.threshold
  if (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
      or not math.isfinite(threshold)):
    out.append(f"predict.threshold={threshold!r}: expected a finite number (>= 0: the "
               "image threshold; -1: none, thresholds.json decides)")
  if not 0 < cfg.predict.calibrate_quantile <= 1:
    out.append(f"predict.calibrate_quantile={cfg.predict.calibrate_quantile!r}: expected "
               "a value in (0, 1]")
  if cfg.init_from and not Path(cfg.init_from).is_dir():
    out.append(f"init_from={cfg.init_from!r}: no such workdir")

  # Devices: every global batch splits evenly over devices and processes.
  if device_count is not None and isinstance(cfg.mesh.model, int) and cfg.mesh.model >= 1:
    n_data = cfg.mesh.data if cfg.mesh.data != -1 else device_count // cfg.mesh.model
    if device_count % cfg.mesh.model or (cfg.mesh.data != -1 and
                                         cfg.mesh.data * cfg.mesh.model != device_count):
      out.append(f"mesh.data={cfg.mesh.data} x mesh.model={cfg.mesh.model}: expected a "
                 f"split of the {device_count} devices (mesh.data=-1 takes the rest)")
    else:
      for name in ("batch_size", "eval.batch_size", "predict.batch_size"):
        node = _get(cfg, name)
        if isinstance(node, int) and node >= 1 and (node % n_data or
                                                    node % (process_count or 1)):
          out.append(f"{name}={node}: expected a multiple of the {n_data} data-parallel "
                     f"devices and the {process_count or 1} processes")
  return out


def _checkpoint_problems(cfg) -> list[str] | None:
  """Problems of the converted backbone; None when it is missing and will be
  fetched by backbone.hub_id at start (checked again once it is there)."""
  path = Path(cfg.backbone.checkpoint)
  if not path.is_dir():
    if cfg.backbone.hub_id:
      return None
    return [f"backbone.checkpoint={cfg.backbone.checkpoint!r} does not exist; convert "
            f"the weights first (python -m converters.{cfg.backbone.family} --src ... "
            f"--dst {cfg.backbone.checkpoint}), set backbone.hub_id, or set "
            "backbone.random_init=True"]
  try:
    backbones.check_checkpoint(cfg.backbone.family, cfg.backbone.variant, path)
  except backbones.BackboneError as e:
    return [str(e)]
  return []


def check(cfg, *, device_count: int | None = None, process_count: int | None = None) -> None:
  """Raises ConfigError listing every problem of `cfg`."""
  found = problems(cfg, device_count=device_count, process_count=process_count)
  if found:
    lines = "\n".join(f"  - {p}" for p in found)
    raise ConfigError(f"the config has {len(found)} problem{'s' * (len(found) > 1)}:\n"
                      f"{lines}")


def resolve_detector(config, *, device_count: int | None = None,
                     process_count: int | None = None) -> schema.RunConfig:
  """A `Detector`'s config (a `ConfigDict` or an already resolved
  `RunConfig`) with mode=predict, checked as `--config.mode=predict` checks it
  except for what comes per call (the images, object names and references)."""
  if isinstance(config, schema.RunConfig):
    config = schema.to_configdict(config)
  base = config.copy_and_resolve_references()
  base.mode = "predict"
  checked = base.copy_and_resolve_references()
  checked.predict.input = checked.predict.input or "<images given to predict()>"
  checked.predict.object_name = (checked.predict.object_name
                                 or "<object_name given to predict()>")
  if checked.predict.scoring == "few_shot":
    checked.predict.references = (checked.predict.references
                                  or "<images given to use_references()>")
  check(checked, device_count=device_count, process_count=process_count)
  return schema.from_configdict(base)


def resolve(cfg, *, device_count: int | None = None,
            process_count: int | None = None) -> schema.RunConfig:
  """The whole config checked (every problem in one `ConfigError`), then
  frozen as the typed `RunConfig` every layer below the commands reads."""
  check(cfg, device_count=device_count, process_count=process_count)
  try:
    return schema.from_configdict(cfg)
  except schema.ResolveError as e:
    raise ConfigError(str(e)) from None
