"""What every converter shares: reading sources, strict name mapping, hashing.

A converter is a table from target parameter paths (the model's NNX state
paths, '/'-joined) to a `Rule`: the source keys it reads and a transform that
turns those tensors into the target array. `apply_rules` fills every target,
checks every shape, and accounts for every source key (used, or matched by an
explicit ignore pattern); anything else is a `ConversionError` that lists the
offending names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from adjax.errors import UserError


class ConversionError(UserError, ValueError):
  """The source cannot be converted; the message names keys and files."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """target = fn(*[source[k] for k in sources])."""
  sources: tuple[str, ...]
  fn: Callable[..., np.ndarray] = lambda x: x


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> Flax kernel [in, out]."""
  return np.ascontiguousarray(w.T)


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> Flax kernel [kh, kw, in, out]."""
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def _as_float_numpy(t) -> np.ndarray:
  """torch tensor / numpy array -> numpy; half and bfloat16 upcast to float32."""
  if hasattr(t, "detach"):
    import torch  # only reachable when torch produced the tensor
    t = t.detach().cpu()
    if t.is_floating_point():
      t = t.to(torch.float32)
    return t.numpy()
  a = np.asarray(t)
  if a.dtype.kind == "f" and a.dtype != np.float32:
    a = a.astype(np.float32)
  return a


def _require_torch(path: Path):
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the install
    raise ConversionError(
        f"{path}: reading this file needs PyTorch; install the conversion "
        "extra: pip install 'adjax[convert]'") from e
  return torch


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a flat tensor dict from .safetensors, .pth/.pt/.bin or TorchScript.

  Half-precision tensors are upcast to float32. Wrapped state dicts
  ({"model": {...}}, {"state_dict": {...}}, {"teacher": {...}}) are unwrapped.
  """
  path = Path(path)
  if not path.is_file():
    raise ConversionError(f"{path}: no such file")
  if path.stat().st_size == 0:
    raise ConversionError(f"{path}: the file is empty")
  if path.suffix == ".safetensors":
    from safetensors import safe_open
    try:
      out = {}
      with safe_open(str(path), framework="np") as f:
        for k in f.keys():
          out[k] = _as_float_numpy(f.get_tensor(k))
      return out
    except Exception as e:  # safetensors raises several error types
      raise ConversionError(
          f"{path}: not a readable safetensors file (truncated or corrupt?): {e}"
      ) from e
  torch = _require_torch(path)
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as first_error:
    # The OpenAI CLIP release is a TorchScript archive, not a pickled dict.
    try:
      obj = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception:
      raise ConversionError(
          f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
          f"{first_error}") from first_error
  for wrapper in ("state_dict", "model", "teacher", "module"):
    if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if hasattr(v, "detach") or isinstance(v, np.ndarray):
      out[str(k)] = _as_float_numpy(v)
  if not out:
    raise ConversionError(f"{path}: the file holds no tensors")
  return out


def apply_rules(
    rules: Mapping[str, Rule],
    source: Mapping[str, np.ndarray],
    target_shapes: Mapping[str, tuple[int, ...]],
    ignore: Sequence[str] = (),
    origin: str = "source",
) -> dict[str, np.ndarray]:
  """Fills every target from `source`; raises listing every problem found.

  Args:
    rules: target path -> Rule.
    source: flat source tensors.
    target_shapes: every parameter the model has, path -> shape.
    ignore: regexes of source keys that are deliberately unused.
    origin: a name for the source in messages (the file path).

  Returns:
    flat dict target path -> float32 array.
  """
  problems = []
  no_rule = sorted(set(target_shapes) - set(rules))
  if no_rule:
    problems.append(f"model parameters with no source: {no_rule}")
  extra_rules = sorted(set(rules) - set(target_shapes))
  if extra_rules:
    problems.append(f"rules for parameters the model lacks: {extra_rules}")
  needed = {k for r in rules.values() for k in r.sources}
  missing = sorted(needed - set(source))
  if missing:
    problems.append(f"missing source keys: {missing}")
  ignore_re = [re.compile(p) for p in ignore]
  unexpected = sorted(
      k for k in source
      if k not in needed and not any(r.fullmatch(k) for r in ignore_re))
  if unexpected:
    problems.append(f"unexpected source keys: {unexpected}")
  out = {}
  bad_shapes = []
  if not missing:
    for target, rule in rules.items():
      if target not in target_shapes:
        continue
      value = np.asarray(rule.fn(*[source[k] for k in rule.sources]), np.float32)
      if tuple(value.shape) != tuple(target_shapes[target]):
        bad_shapes.append(
            f"{target} <- {list(rule.sources)}: got {tuple(value.shape)}, "
            f"expected {tuple(target_shapes[target])}")
      out[target] = value
  if bad_shapes:
    problems.append("mis-shaped parameters: " + "; ".join(bad_shapes))
  if problems:
    raise ConversionError(f"{origin}: cannot convert:\n  " + "\n  ".join(problems))
  return out
