"""Storage of converted (frozen) tower weights.

A converted checkpoint is a directory:

  config.json   {"kind": "dinov3" | "clip_text", "format_version": 1,
                 ...model config..., "source": ..., "source_sha256": ...}
  params/       an Orbax checkpoint of a nested dict of float32 arrays whose
                paths are the NNX state paths of the model

In memory, parameters are flat dicts keyed by '/'-joined NNX state paths.

Converters call `save`; the models' `load()` functions call `load`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import orbax.checkpoint as ocp

from adjax.common import atomic
from adjax.common import quiet as _quiet
from adjax.common.errors import UserError

_quiet.drop_library_noise()   # orbax's missing-metadata warning on every restore

FORMAT_VERSION = 1


class WeightsError(UserError, ValueError):
  """A converted checkpoint directory is missing, incomplete or of another kind."""


def save(dst: str | os.PathLike, params: dict[str, np.ndarray], config: dict[str, Any],
         overwrite: bool = False) -> Path:
  """Writes params ('/'-joined paths -> arrays) + config to `dst` atomically.

  Nothing is left at `dst` on failure.
  """
  config = dict(config, format_version=FORMAT_VERSION)
  with atomic.atomic_dir(dst, overwrite=overwrite) as tmp:
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp / "params", unflatten(params))
    ckpt.wait_until_finished()
    ckpt.close()
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
  return Path(dst)


def read_config(path: str | os.PathLike, kind: str) -> dict[str, Any]:
  """Reads and checks `config.json` of a converted checkpoint of `kind`."""
  path = Path(path)
  cfg_file = path / "config.json"
  if not path.is_dir():
    raise WeightsError(
        f"{path}: not a directory; expected a converted {kind} checkpoint "
        f"(config.json + params/) written by `python -m converters.{kind}`")
  if not cfg_file.is_file() or not (path / "params").is_dir():
    raise WeightsError(
        f"{path}: missing config.json or params/; expected a converted {kind} "
        f"checkpoint written by `python -m converters.{kind}`")
  config = json.loads(cfg_file.read_text())
  if config.get("kind") != kind:
    raise WeightsError(
        f"{cfg_file}: kind is {config.get('kind')!r}, expected {kind!r}")
  if config.get("format_version") != FORMAT_VERSION:
    raise WeightsError(
        f"{cfg_file}: format_version {config.get('format_version')!r}, "
        f"expected {FORMAT_VERSION}; convert the checkpoint again")
  return config


def load(path: str | os.PathLike, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Returns ('/'-joined path -> numpy array, config) of a converted checkpoint."""
  config = read_config(path, kind)
  ckpt = ocp.StandardCheckpointer()
  params = ckpt.restore(Path(path).absolute() / "params")
  ckpt.close()
  return {k: np.asarray(v) for k, v in flatten(params).items()}, config


def unflatten(flat: Mapping[str, np.ndarray], sep: str = "/") -> dict:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split(sep)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten(tree: Mapping, sep: str = "/", prefix: str = "") -> dict:
  """{'a': {'b': x}} -> {'a/b': x}."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{sep}{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, sep, key))
    else:
      out[key] = v
  return out


def param_shapes(module) -> dict[str, tuple[int, ...]]:
  """'/'-joined NNX state path -> shape, for every nnx.Param of `module`.

  Works on an abstract module from `nnx.eval_shape` (no memory allocated).
  """
  from flax import nnx  # deferred: JAX; a checkpoint's config reads without it
  flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
  return {"/".join(map(str, path)): tuple(v.get_value().shape) for path, v in flat}


def assign(module, flat: dict[str, np.ndarray], dtype=None, sharding=None) -> None:
  """Sets every nnx.Param of `module` from `flat` ('/'-joined paths).

  Every parameter must be present with the right shape (a converted
  checkpoint is complete by construction; this re-checks it on load).
  `sharding`, if given, is a function path -> jax.sharding.Sharding used to
  place each array (the frozen backbone's weights can be split this way).
  """
  import jax  # deferred: JAX; a checkpoint's config reads without it
  import jax.numpy as jnp  # deferred: JAX; a checkpoint's config reads without it
  from flax import nnx  # deferred: JAX; a checkpoint's config reads without it
  state = nnx.state(module, nnx.Param)
  expected = param_shapes(module)
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  wrong = sorted(p for p in expected if p in flat and tuple(np.shape(flat[p])) != expected[p])
  if missing or extra or wrong:
    raise WeightsError(
        f"checkpoint does not fit the model: missing {missing}, unexpected {extra}, "
        f"mis-shaped {[(p, np.shape(flat[p]), expected[p]) for p in wrong]}")
  for path, var in nnx.to_flat_state(state):
    key = "/".join(map(str, path))
    value = np.asarray(flat[key], dtype or np.float32)
    var.set_value(jax.device_put(value, sharding(key)) if sharding else jnp.asarray(value))
  nnx.update(module, state)
