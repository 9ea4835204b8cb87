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


# ------------------------------------------------ Hugging Face directories

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


@dataclasses.dataclass
class Source:
  """Flat tensors plus what is known about them besides their shapes."""
  tensors: dict[str, np.ndarray]
  origin: str  # for messages
  file_name: str
  sha256: str
  hf_config: dict | None = None


def read_file_source(path: str | os.PathLike) -> Source:
  """A single checkpoint file (.pth/.pt/.bin/.safetensors) as a Source."""
  path = Path(path)
  return Source(read_state_dict(path), str(path), path.name, sha256_file(path))


def read_hf_dir(path: str | os.PathLike, model_types: Sequence[str], what: str) -> Source:
  """A Hugging Face model directory: config.json + weights, possibly sharded.

  `model_types`: accepted `model_type`s of config.json (a missing
  config.json is accepted; the layout is then known from the keys alone).
  `what`: the expected model, for messages ("a Hugging Face Dinov2Model").
  A sharded checkpoint's digest is the sha256 of its shards' digests in
  name order.
  """
  import json
  path = Path(path)
  present = [path / f for f in HF_WEIGHT_FILES if (path / f).is_file()]
  if not present:
    raise ConversionError(
        f"{path}: no weights found; expected one of {list(HF_WEIGHT_FILES)} ({what} "
        "directory) or pass the checkpoint file itself")
  hf_config = None
  if (path / "config.json").is_file():
    hf_config = json.loads((path / "config.json").read_text())
    if hf_config.get("model_type") not in (None, *model_types):
      raise ConversionError(
          f"{path / 'config.json'}: model_type {hf_config.get('model_type')!r}, "
          f"expected one of {list(model_types)} ({what})")
  weights = present[0]
  if not weights.name.endswith(".index.json"):
    return Source(read_state_dict(weights), str(weights), weights.name,
                  sha256_file(weights), hf_config)
  shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
  tensors = {}
  for shard in shards:
    tensors.update(read_state_dict(path / shard))
  digest = hashlib.sha256("".join(sha256_file(path / s) for s in shards).encode()).hexdigest()
  return Source(tensors, str(path), weights.name, digest, hf_config)


def download_hf_repo(repo_id: str, example: str) -> Path:
  """Fetches a hub repo's json and safetensors files; ConversionError if it cannot."""
  try:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
  except Exception as e:  # offline, unknown repo, gated repo: all reported alike
    raise ConversionError(
        f"--src {repo_id}: not a local path, and fetching it from the Hugging Face "
        f"hub failed (hub unreachable, repo unknown or gated?): {type(e).__name__}: "
        f"{e}. Download the checkpoint yourself and pass the local file or "
        f"directory (config.json + model.safetensors), e.g. for {example}") from e
