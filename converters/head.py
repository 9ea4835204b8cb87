"""Imports a head trained with the PyTorch AD-DINOv3 release into an adjax workdir.

  python -m converters.head --src 99.pth --dst runs/release_mvtec \
      [--config configs/mvtec.py[:arg]] [--set key=value ...] [--overwrite]

The release saves one file per epoch, `{'cls_token_adapter': sd,
'patch_token_adapter': sd, 'prompt_adapter': sd}`, where each `sd` is the
state dict of an `nn.ModuleList` of `ClipAdapter`s: `N.fc1.0.weight`
`[E, c_in]` (the bias-free Linear inside `fc1 = Sequential(Linear,
LeakyReLU)`) and `N.fc2.0.weight` `[c_in, E]`, whose output the release never
uses (SPEC section 5). A flat `CLIP_Inplanted` state dict
(`cls_token_adapter.N.fc1.0.weight`, ...) and the shorter `N.fc1.weight`
spelling are read too. Mapping, per tapped layer l and text adapter k:

  cls_adapters/l/kernel    <- cls_token_adapter.l.fc1.0.weight    (transposed)
  patch_adapters/l/kernel  <- patch_token_adapter.l.fc1.0.weight  (transposed)
  text_adapters/k/kernel   <- prompt_adapter.k.fc1.0.weight       (k=0 normal, 1 abnormal)

Every head parameter must be filled with the shape the configured towers
imply (feature width D from the backbone, text width E from the text tower,
one adapter pair per tapped layer); every source key must be used or be an
`fc2` weight (ignored, and reported). DST becomes a workdir holding a step-0
checkpoint (head parameters with fresh optimiser state, the layout
`adjax.workdir.checkpoints` writes) and the config, usable as
`--workdir=DST --config.mode=evaluate|predict` or `--config.init_from=DST`.
It is written atomically: a failure leaves nothing at DST.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from adjax.common import errors
from adjax.workdir import Workdir
from converters.common import (ConversionError, Rule, apply_rules, linear_kernel,
                               sha256_file)

GROUPS = {"cls_token_adapter": "cls_adapters", "patch_token_adapter": "patch_adapters",
          "prompt_adapter": "text_adapters"}
IGNORED = (r"(cls_token_adapter|patch_token_adapter|prompt_adapter)\.\d+\.fc2\.0\.weight",)
_SHORT = re.compile(r"^(.*\.fc[12])\.weight$")
IMPORT_STEP = 0


def read_release(path: str | Path) -> dict[str, np.ndarray]:
  """Flat `group.N.fcK.0.weight` -> float32 array from a release `.pth`."""
  from converters.common import _as_float_numpy, _require_torch
  path = Path(path)
  if not path.is_file():
    raise ConversionError(f"--src {path}: no such file")
  torch = _require_torch(path)
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or "
                          f"corrupt?): {type(e).__name__}: {e}") from e
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path}: expected a dict of adapter state dicts, found "
                          f"{type(obj).__name__}")
  flat: dict[str, np.ndarray] = {}

  def walk(node, prefix):
    for k, v in node.items():
      key = f"{prefix}{k}"
      if isinstance(v, Mapping):
        walk(v, key + ".")
      elif hasattr(v, "detach") or isinstance(v, np.ndarray):
        # The release's keys are `N.fc1.0.weight`; accept `N.fc1.weight` too.
        m = _SHORT.match(key)
        flat[f"{m.group(1)}.0.weight" if m else key] = _as_float_numpy(v)
  walk(obj, "")
  if not any(k.split(".")[0] in GROUPS for k in flat):
    raise ConversionError(
        f"{path}: no AD-DINOv3 adapter weights (expected top-level keys "
        f"{sorted(GROUPS)}); found {sorted({k.split('.')[0] for k in flat})[:8]}")
  return flat


def build_rules(num_layers: int) -> dict[str, Rule]:
  rules = {}
  for src, dst in GROUPS.items():
    for i in range(2 if src == "prompt_adapter" else num_layers):
      rules[f"{dst}/{i}/kernel"] = Rule((f"{src}.{i}.fc1.0.weight",), linear_kernel)
  return rules


def _layer_count_note(source: Mapping[str, np.ndarray], num_layers: int) -> str:
  found = {int(k.split(".")[1]) for k in source
           if k.startswith(("cls_token_adapter.", "patch_token_adapter."))
           and k.split(".")[1].isdigit()}
  if found and len(found) != num_layers:
    return (f"the file has adapters for {len(found)} tapped layers, the config taps "
            f"{num_layers} (backbone.layers); ")
  return ""


def convert_params(source: Mapping[str, np.ndarray], feature_dim: int, text_dim: int,
                   num_layers: int, origin: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """-> (head parameters by NNX path, ignored source keys); raises ConversionError."""
  from flax import nnx

  from adjax.models import head as head_lib
  from adjax.models import weights
  head = nnx.eval_shape(lambda: head_lib.ADHead(feature_dim, text_dim, num_layers,
                                                rngs=nnx.Rngs(0)))
  targets = weights.param_shapes(head)
  try:
    flat = apply_rules(build_rules(num_layers), source, targets, ignore=IGNORED,
                       origin=origin)
  except ConversionError as e:
    note = _layer_count_note(source, num_layers)
    shapes = (f" (config: feature width {feature_dim}, text width {text_dim}, "
              f"{num_layers} tapped layers)")
    detail = str(e).replace(":\n  ", ": ").replace("\n  ", "; ")
    raise ConversionError(f"{note}{detail}{shapes}") from None
  ignored = sorted(k for k in source if any(re.fullmatch(p, k) for p in IGNORED))
  return flat, ignored


def convert(src: str, dst: str, cfg, overwrite: bool = False) -> dict:
  """Writes the workdir `dst`; returns a summary. Raises ConversionError."""
  import jax
  from flax import nnx

  from adjax import steps
  from adjax.common import atomic
  from adjax.config import load as run_config
  from adjax.config import schema
  from adjax.models import head as head_lib
  from adjax.models import weights
  from adjax.workdir import checkpoints, identity

  if Path(dst).exists() and not overwrite:
    raise ConversionError(f"--dst {dst}: already exists; pass --overwrite to replace it")
  try:
    feature_dim, text_dim, num_layers = run_config.tower_dims(cfg)
  except run_config.RunConfigError as e:
    raise ConversionError(str(e)) from None
  source = read_release(src)
  flat, ignored = convert_params(source, feature_dim, text_dim, num_layers, str(src))

  head = nnx.eval_shape(lambda: head_lib.ADHead(feature_dim, text_dim, num_layers,
                                                rngs=nnx.Rngs(0)))
  weights.assign(head, flat)
  _, params = nnx.split(head)
  typed = schema.from_configdict(cfg)
  tx, _ = steps.make_optimizer(typed.optimizer, 1, typed.model.reference_quirks)
  state = steps.init_state(params, tx)
  config_json = json.loads(typed.to_json())
  summary = {"source": Path(src).name, "source_sha256": sha256_file(src),
             "step": IMPORT_STEP, "feature_dim": feature_dim, "text_dim": text_dim,
             "num_layers": num_layers, "ignored_keys": ignored,
             "parameters": {k: list(v.shape) for k, v in sorted(flat.items())}}
  with atomic.atomic_dir(dst, overwrite=overwrite) as tmp:
    ckpts = checkpoints.RunCheckpoints(tmp, keep=1)
    try:
      ckpts.save(IMPORT_STEP, jax.device_get(state), {}, config_json)
    finally:
      ckpts.close()
    run = Workdir(tmp)        # the workdir, built under a temporary name
    run.config.write_text(typed.to_json(indent=2))
    run.imported_from.write_text(json.dumps(summary, indent=2))
    # The model the head belongs to: evaluating it under another is refused.
    run.run_identity.write_text(
        json.dumps({"training": identity.training_fields(typed)}, indent=2, sort_keys=True))
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m converters.head",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--src", required=True, help="release checkpoint, e.g. ckpt/99.pth")
  parser.add_argument("--dst", required=True, help="workdir to create (atomically)")
  parser.add_argument("--config", default="configs/mvtec.py",
                      help="the experiment config the towers come from (path[:arg])")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. backbone.checkpoint=ckpts/vitl16")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  args = parser.parse_args(argv)
  from adjax.config import load as run_config
  rc, summary = errors.run_command(
      lambda: convert(args.src, args.dst, run_config.from_file(args.config, args.set),
                      args.overwrite))
  if rc:
    return rc
  print(f"wrote {args.dst}: {len(summary['parameters'])} adapters ({summary['num_layers']} "
        f"tapped layers, feature width {summary['feature_dim']}, text width "
        f"{summary['text_dim']}); ignored {len(summary['ignored_keys'])} unused fc2 weights")
  return 0


if __name__ == "__main__":
  sys.exit(main())
