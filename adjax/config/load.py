"""A run's config outside `adjax.main`: from a config file or a workdir.

The deployment commands (`converters.head`, `adjax.export`) take the
experiment config the head was trained with. It comes either from a config
file (`configs/mvtec.py` or `configs/mvtec.py:cpu`, with `key=value`
overrides) or from the `config.json` a training run wrote into its workdir,
laid over the declared defaults so that a field added since is still there.
`tower_dims` reads the towers' widths from their variants or converted
checkpoints without building them (a ViT-L/16 is not loaded to learn 1024).
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from typing import Sequence

import ml_collections

from adjax.common.errors import UserError
from adjax.config import defaults as config_defaults
from adjax.workdir import Workdir


class RunConfigError(UserError, ValueError):
  """The config cannot be loaded; the message names the file or key."""


def from_file(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> its `get_config(arg)`, with `key=value` overrides."""
  path, _, arg = spec.partition(":")
  if not Path(path).is_file():
    raise RunConfigError(f"--config {spec}: no such config file")
  module_spec = importlib.util.spec_from_file_location("_adjax_run_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  cfg = module.get_config(arg or None)
  return apply_overrides(cfg, overrides)


def from_workdir(workdir: str | Path, overrides: Sequence[str] = (), *,
                 own_workdir: bool = False) -> ml_collections.ConfigDict:
  """The training config a run stored in `<workdir>/config.json`, over the
  defaults; `own_workdir`: an empty `workdir` field becomes `workdir`."""
  path = Workdir(workdir).config
  if not path.is_file():
    raise RunConfigError(
        f"{path}: no such file; pass the training config with --config "
        "(e.g. configs/mvtec.py)")
  try:
    stored = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise RunConfigError(f"{path}: not valid JSON ({e})") from e
  cfg = config_defaults.base_config()
  _overlay(cfg, stored)
  cfg = apply_overrides(cfg, overrides)
  if own_workdir and not cfg.workdir:
    cfg.workdir = str(workdir)
  return cfg


def _overlay(cfg: ml_collections.ConfigDict, stored: dict) -> None:
  for key, value in stored.items():
    if key not in cfg:
      if isinstance(cfg, ml_collections.ConfigDict) and not cfg.is_locked and (
          not any(isinstance(v, ml_collections.ConfigDict) for v in cfg.values())
          or len(cfg) == 0):
        cfg[key] = value      # free-form mappings such as text.display_names
      continue                # a field this version no longer has
    current = cfg[key]
    if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
      _overlay(current, value)
    elif isinstance(current, tuple) and isinstance(value, list):
      cfg[key] = tuple(value)
    elif isinstance(current, float) and isinstance(value, int):
      cfg[key] = float(value)
    else:
      cfg[key] = value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]):
  """`backbone.variant=vits16`-style overrides; an undeclared key is an error."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise RunConfigError(f"override {item!r}: expected key=value")
    node = cfg
    *parents, leaf = key.strip().split(".")
    for p in parents:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        raise RunConfigError(f"override {item!r}: the config has no section {p!r}")
      node = node[p]
    if leaf not in node:
      raise RunConfigError(f"override {item!r}: the config has no field {key!r}")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    if isinstance(node[leaf], str) and not isinstance(value, str):
      value = text
    if isinstance(node[leaf], tuple) and isinstance(value, list):
      value = tuple(value)
    node[leaf] = value
  return cfg


def tower_dims(cfg) -> tuple[int, int, int]:
  """(feature width D, text width E, number of tapped layers) of a config's towers."""
  from adjax.models import backbones, clip_text, weights  # deferred: JAX; a config loads without it
  if cfg.backbone.random_init:
    try:
      feature_dim = backbones.variant_config(cfg.backbone.family, cfg.backbone.variant).dim
    except backbones.BackboneError as e:
      raise RunConfigError(str(e)) from None
  else:
    kind = backbones.family_module(cfg.backbone.family).KIND
    feature_dim = int(_converted_config(cfg.backbone.checkpoint, kind, weights)["dim"])
  if cfg.text.random_init:
    if cfg.text.variant not in clip_text.VARIANTS:
      raise RunConfigError(f"text.variant={cfg.text.variant!r}; expected one of "
                           f"{sorted(clip_text.VARIANTS)}")
    text_dim = clip_text.VARIANTS[cfg.text.variant].embed_dim
  else:
    text_dim = int(_converted_config(cfg.text.checkpoint, clip_text.KIND, weights)["embed_dim"])
  num_layers = len(cfg.backbone.layers) if cfg.backbone.layers else 4
  return feature_dim, text_dim, num_layers


def _converted_config(path: str, kind: str, weights) -> dict:
  try:
    return weights.read_config(path, kind)
  except weights.WeightsError as e:
    raise RunConfigError(f"{e} (convert it with python -m converters.{kind}, or point the "
                         "config at the converted directory)") from e
