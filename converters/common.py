"""What every converter shares: reading sources, strict name mapping, hashing,
and the ViT backbone converters' source reading, stacked-block rules and
command line.

A converter is a table from target parameter paths (the model's NNX state
paths, '/'-joined) to a `Rule`: the source keys it reads and a transform that
turns those tensors into the target array. `apply_rules` fills every target,
checks every shape, and accounts for every source key (used, or matched by an
explicit ignore pattern); anything else is a `ConversionError` that lists the
offending names.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from adjax.common import errors
from adjax.common.errors import UserError


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


# ------------------------------------------------ ViT backbone converters

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Names only CLIP checkpoints (OpenAI, open_clip, HF CLIPModel/CLIPTextModel) have.
_CLIP_KEY = re.compile(r"(^|\.)(text_model|vision_model|resblocks|visual|token_embedding|"
                       r"text_projection|logit_scale)(\.|$)")


def read_source(src: str, model_types: Sequence[str], what: str, example: str) -> Source:
  """--src as a checkpoint file, a Hugging Face directory (`model_types`,
  `what`: as for read_hf_dir) or a hub repo id such as `example`, fetched
  when the hub is reachable."""
  path = Path(src)
  if path.is_file():
    return read_file_source(path)
  if path.is_dir():
    return read_hf_dir(path, model_types, what)
  if _HUB_ID.match(src) and not src.startswith((".", "/", "~")):
    return read_hf_dir(download_hf_repo(src, example), model_types, what)
  raise ConversionError(
      f"--src {src}: no such file or directory (and not a hub repo id like '{example}')")


def unknown_layout(keys, origin: str, family: str, meta_keys: str,
                   hf_keys: str) -> ConversionError:
  """The error for keys in neither of a family's layouts: a CLIP checkpoint
  is named as such; otherwise the expected keys and the first found."""
  sample = sorted(keys)[:6]
  if any(_CLIP_KEY.search(k) for k in keys):
    return ConversionError(
        f"{origin}: this looks like a CLIP checkpoint (keys such as {sample}), "
        f"not a {family} ViT; convert it with converters.clip_text instead")
  return ConversionError(
      f"{origin}: not a {family} checkpoint: found neither the Meta keys "
      f"({meta_keys}) nor the Hugging Face keys ({hf_keys}); first keys: {sample}")


def vit_blocks(src: Source, layout, keys: Sequence[str]) -> tuple[int, bool, str]:
  """(depth, swiglu, the first block's first FFN weight key) of a ViT checkpoint.

  `layout` names the blocks (`block`, with `{i}` for the index) and the FFN
  weights (`mlp`, `swiglu`); `keys` must be present too. Raises naming
  what is missing.
  """
  t = src.tensors
  block_re = re.compile(re.escape(layout.block).replace(r"\{i\}", r"(\d+)"))
  indices = [int(m.group(1)) for k in t if (m := block_re.match(k))]
  b0 = layout.block.format(i=0)
  swiglu = f"{b0}{layout.swiglu[0]}.weight" in t
  fc1 = f"{b0}{(layout.swiglu if swiglu else layout.mlp)[0]}.weight"
  absent = [k for k in (*keys, fc1) if k not in t]
  if absent or not indices:
    raise ConversionError(
        f"{src.origin}: cannot infer the architecture: missing source keys "
        f"{absent or [b0 + '*']} ({layout.name} layout)")
  return 1 + max(indices), swiglu, fc1


def stacked(depth: int, keys: Sequence[str], fn: Callable = lambda x: x) -> Rule:
  """Rule stacking fn(*block_i_tensors) over blocks; keys contain `{i}`."""
  per_block = [tuple(k.format(i=i) for k in keys) for i in range(depth)]
  n = len(keys)

  def stack(*arrays):
    return np.stack([fn(*arrays[i * n:(i + 1) * n]) for i in range(depth)])
  return Rule(tuple(k for ks in per_block for k in ks), stack)


def vit_rules(depth: int, layout, norms: Sequence[str],
              ffn: Sequence[tuple[str, str, Callable]]) -> dict[str, Rule]:
  """The rules every ViT backbone shares.

  The patch embedding, cls token and final norm, and stacked over the
  blocks the layer scales, the attention output projection, the two norms
  (source names `norms`) and the feed-forward: `ffn` holds (our name, the
  source name, a function picking our part of the source tensor) triples.
  `layout` names the source (`patch`, `cls`, `norm`, `block`, `ls1`,
  `ls2`, `proj`).
  """
  blk = layout.block
  rules = {
      "patch_embed/kernel": Rule((f"{layout.patch}.weight",), conv_kernel),
      "patch_embed/bias": Rule((f"{layout.patch}.bias",)),
      "cls_token": Rule((layout.cls,), lambda x: x.reshape(-1)),
      "norm/scale": Rule((f"{layout.norm}.weight",)),
      "norm/bias": Rule((f"{layout.norm}.bias",)),
      "blocks/ls1": stacked(depth, [blk + layout.ls1]),
      "blocks/ls2": stacked(depth, [blk + layout.ls2]),
      "blocks/attn/proj/kernel": stacked(depth, [f"{blk}{layout.proj}.weight"], linear_kernel),
      "blocks/attn/proj/bias": stacked(depth, [f"{blk}{layout.proj}.bias"]),
  }
  for ours, theirs in zip(("norm1", "norm2"), norms):
    rules[f"blocks/{ours}/scale"] = stacked(depth, [f"{blk}{theirs}.weight"])
    rules[f"blocks/{ours}/bias"] = stacked(depth, [f"{blk}{theirs}.bias"])
  for ours, theirs, pick in ffn:
    rules[f"blocks/ffn/{ours}/kernel"] = stacked(
        depth, [f"{blk}{theirs}.weight"], lambda w, pick=pick: linear_kernel(pick(w)))
    rules[f"blocks/ffn/{ours}/bias"] = stacked(depth, [f"{blk}{theirs}.bias"], pick)
  return rules


def refuse_existing(dst, overwrite: bool) -> None:
  if Path(dst).exists() and not overwrite:
    raise ConversionError(f"--dst {dst}: already exists; pass --overwrite to replace it")


def save_backbone(dst, flat: dict, config, kind: str, source: Source, source_format: str,
                  overwrite: bool) -> Path:
  """A converted backbone: its params and config.json (the architecture, the
  variant, the source file name, its sha256 and format), written atomically."""
  from adjax.models import weights
  meta = dict(config.to_dict(), kind=kind, variant=config.name,
              source=source.file_name, source_sha256=source.sha256,
              source_format=source_format)
  return weights.save(dst, flat, meta, overwrite=overwrite)


def backbone_main(argv: Sequence[str] | None, *, module: str, description: str,
                  src_help: str, variants: Sequence[str], convert: Callable,
                  extra: Sequence[tuple[tuple[str, ...], dict]] = (),
                  summary: Callable[[dict], str] = lambda cfg: "") -> int:
  """The command line of a backbone converter.

  Options --src, --dst, --variant, the converter's `extra` ((flags, kwargs)
  pairs for add_argument), --overwrite; `convert(args)` returns the written
  directory. A user error is one line (exit 2); success prints one line,
  with `summary(config)` before the source.
  """
  parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
  parser.add_argument("--src", required=True, help=src_help)
  parser.add_argument("--dst", required=True, help="output directory (created atomically)")
  parser.add_argument("--variant", choices=sorted(variants),
                      help="force a variant instead of inferring it from the shapes")
  for flags, kwargs in extra:
    parser.add_argument(*flags, **kwargs)
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  args = parser.parse_args(argv)
  rc, out = errors.run_command(lambda: convert(args))
  if rc:
    return rc
  cfg = json.loads((out / "config.json").read_text())
  print(f"wrote {out} (variant {cfg['variant']}, {cfg['depth']} blocks, dim {cfg['dim']}, "
        f"{summary(cfg)}from {cfg['source_format']} {cfg['source']})")
  return 0
