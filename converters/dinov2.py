"""Converts a DINOv2 ViT checkpoint (Meta .pth or Hugging Face) for adjax.

  python -m converters.dinov2 --src SRC --dst DIR [--variant NAME] [--num-heads N]
      [--pos-interpolation {meta,hf}] [--overwrite]

SRC is one of
- an official Meta hub checkpoint file, e.g. dinov2_vitl14_reg4_pretrain.pth
  (`cls_token`, `pos_embed`, `register_tokens`, `blocks.N.attn.qkv`,
  `blocks.N.ls1.gamma`, `blocks.N.mlp.fc1` or the fused SwiGLU
  `blocks.N.mlp.w12`/`w3`; chunked `blocks.C.N.*` names are accepted);
- a Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` directory
  (config.json + model.safetensors or pytorch_model.bin, possibly sharded),
  in the names `save_pretrained` writes (`attention.attention.query`,
  `mlp.weights_in`) or those of the loaded modules (`attention.q_proj`,
  `mlp.gate_proj`);
- a hub repo id such as facebook/dinov2-small, fetched with huggingface_hub
  when the hub is reachable.

The architecture is inferred from the tensor shapes; the head count comes
from config.json or, for a Meta file, from the released variant the shapes
match (`--num-heads` or `--variant` otherwise). The position-embedding
resize follows the source's own reference (see adjax.models.dinov2):
`hf` = transformers (by size; antialiased for the register model), `meta` =
Meta's hub (offset 0.1 without registers; by size, antialiased with them);
`--pos-interpolation` picks the other. DIR receives the parameters as NNX
paths of `adjax.models.dinov2.DinoV2` and a config.json with the
architecture, the variant, the source file name and its sha256, written
atomically: a failed conversion leaves nothing at DIR.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from converters import common
from converters.common import (ConversionError, Rule, Source, apply_rules,
                               linear_kernel, stacked)

_HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


# ----------------------------------------------------------------- reading

def read_source(src: str) -> Source:
  source = common.read_source(
      src, _HF_MODEL_TYPES, "a Hugging Face Dinov2Model or Dinov2WithRegistersModel",
      "facebook/dinov2-small")
  # Meta's block_chunks > 0 layout, blocks.C.N.*, with global block indices N.
  if any(_CHUNKED.match(k) for k in source.tensors):
    source.tensors = {_CHUNKED.sub(r"blocks.\1.", k): v for k, v in source.tensors.items()}
  return source


# ---------------------------------------------------------------- layouts

@dataclasses.dataclass(frozen=True)
class Layout:
  """Source names of one checkpoint family; `{i}` is the block index."""
  name: str  # "meta" or "hf"
  cls: str
  pos: str
  registers: str
  patch: str
  norm: str
  block: str
  qkv: tuple[str, ...]  # one fused Linear, or query, key, value
  proj: str
  ls1: str
  ls2: str
  mlp: tuple[str, str]  # fc1, fc2
  swiglu: tuple[str, ...]  # fused (gate|up, down) or (gate, up, down)
  ignore: tuple[str, ...]


META = Layout(
    "meta", "cls_token", "pos_embed", "register_tokens", "patch_embed.proj", "norm",
    "blocks.{i}.", ("attn.qkv",), "attn.proj", "ls1.gamma", "ls2.gamma",
    ("mlp.fc1", "mlp.fc2"), ("mlp.w12", "mlp.w3"),
    (r"mask_token",))  # masked-image training only

# As `save_pretrained` writes them (and the hub holds them).
HF = Layout(
    "hf", "embeddings.cls_token", "embeddings.position_embeddings",
    "embeddings.register_tokens", "embeddings.patch_embeddings.projection", "layernorm",
    "encoder.layer.{i}.",
    ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    "attention.output.dense", "layer_scale1.lambda1", "layer_scale2.lambda1",
    ("mlp.fc1", "mlp.fc2"), ("mlp.weights_in", "mlp.weights_out"),
    (r"embeddings\.mask_token",))

# As transformers 5's modules name them (a `model.state_dict()` saved with torch).
HF_MODULES = dataclasses.replace(
    HF, qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    proj="attention.o_proj", swiglu=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


def detect_layout(tensors: dict[str, np.ndarray], origin: str) -> Layout:
  keys = set(tensors)
  if "storage_tokens" in keys or "rope_embed.periods" in keys or any(
      k.startswith("model.layer.") for k in keys):
    raise ConversionError(
        f"{origin}: a DINOv3 checkpoint (storage tokens / RoPE), not DINOv2; convert it "
        "with converters.dinov3 instead")
  if "cls_token" in keys and "blocks.0.norm1.weight" in keys:
    if "pos_embed" not in keys:
      raise ConversionError(f"{origin}: Meta-style keys but no pos_embed; not a DINOv2 ViT")
    return META
  if "embeddings.cls_token" in keys:
    return HF if "encoder.layer.0.attention.attention.query.weight" in keys else HF_MODULES
  raise common.unknown_layout(keys, origin, "DINOv2", "cls_token, pos_embed, blocks.N.*",
                              "embeddings.cls_token, encoder.layer.N.*")


# ---------------------------------------------------------- architecture

_ARCH_FIELDS = ("dim", "depth", "ffn", "ffn_hidden", "patch_size", "num_registers",
                "native_grid")


def interpolation(source_format: str, num_registers: int) -> dict:
  """The position-embedding resize of a reference (adjax.models.dinov2)."""
  if source_format == "hf":
    return dict(interpolate_offset=0.0, interpolate_antialias=num_registers > 0)
  if num_registers:
    return dict(interpolate_offset=0.0, interpolate_antialias=True)
  return dict(interpolate_offset=0.1, interpolate_antialias=False)


def infer_config(src: Source, layout: Layout, variant: str | None,
                 num_heads: int | None = None, pos_interpolation: str | None = None):
  """DinoV2Config from the shapes (+ config.json / num_heads), or --variant."""
  from adjax.models.dinov2 import VARIANTS, DinoV2Config
  t = src.tensors
  hc = src.hf_config or {}
  depth, swiglu, fc1 = common.vit_blocks(
      src, layout, [layout.cls, layout.pos, f"{layout.patch}.weight"])
  positions = t[layout.pos].shape[-2] - 1
  grid = math.isqrt(positions)
  if grid * grid != positions:
    raise ConversionError(
        f"{src.origin}: {layout.pos} has {positions} patch positions, not a square grid")
  hidden = t[fc1].shape[0]
  fused = swiglu and len(layout.swiglu) == 2  # gate and up in one matrix
  facts = dict(dim=t[layout.cls].shape[-1], depth=depth,
               ffn="swiglu" if swiglu else "mlp",
               ffn_hidden=hidden // 2 if fused else hidden,
               patch_size=t[f"{layout.patch}.weight"].shape[-1],
               num_registers=t[layout.registers].shape[-2] if layout.registers in t else 0,
               native_grid=grid)
  if hc:
    act = hc.get("hidden_act", "gelu")
    if not swiglu and act != "gelu":
      raise ConversionError(
          f"{src.origin}: hidden_act {act!r}; adjax's DINOv2 MLP uses exact 'gelu'")
    if hc.get("qkv_bias", True) is False:
      raise ConversionError(f"{src.origin}: qkv_bias is false; DINOv2 has q, k, v biases")
    if num_heads is None:
      num_heads = hc.get("num_attention_heads")
    facts["layer_norm_eps"] = float(hc.get("layer_norm_eps", 1e-6))
  interp = interpolation(pos_interpolation or layout.name, facts["num_registers"])
  if variant is not None:
    if variant not in VARIANTS:
      raise ConversionError(f"--variant {variant!r}: unknown; known: {sorted(VARIANTS)}")
    return dataclasses.replace(VARIANTS[variant], **interp)
  for v in VARIANTS.values():
    if (all(getattr(v, k) == facts[k] for k in _ARCH_FIELDS)
        and facts.get("layer_norm_eps", v.layer_norm_eps) == v.layer_norm_eps
        and num_heads in (None, v.num_heads)):
      return dataclasses.replace(v, **interp)
  if num_heads is None:
    raise ConversionError(
        f"{src.origin}: shapes {facts} match no released DINOv2 variant and the head "
        f"count is not stored; pass --num-heads (released models use head dim 64) or "
        f"--variant (one of {sorted(VARIANTS)})")
  try:
    return DinoV2Config(num_heads=num_heads, name="custom", **facts, **interp)
  except ValueError as e:
    raise ConversionError(f"{src.origin}: {e}") from e


# ----------------------------------------------------------------- rules

def _half(part: int, fn: Callable = lambda x: x) -> Callable:
  """Half `part` (0: gate, 1: up) of a fused [2h, ...] gate|up tensor."""
  def take(x):
    h = x.shape[0] // 2
    return fn(x[part * h:(part + 1) * h])
  return take


def build_rules(config, layout: Layout) -> tuple[dict, list]:
  """Target path -> Rule, and the source keys deliberately ignored."""
  depth, blk = config.depth, layout.block
  if config.ffn == "mlp":
    pairs = [("fc1", layout.mlp[0], lambda x: x), ("fc2", layout.mlp[1], lambda x: x)]
  elif len(layout.swiglu) == 2:  # w1 = gate = first half, w2 = up = second half
    fused, down = layout.swiglu
    pairs = [("w1", fused, _half(0)), ("w2", fused, _half(1)), ("w3", down, lambda x: x)]
  else:
    pairs = [(ours, theirs, lambda x: x) for ours, theirs in zip(("w1", "w2", "w3"),
                                                                   layout.swiglu)]
  rules = common.vit_rules(depth, layout, ("norm1", "norm2"), pairs)
  rules["pos_embed"] = Rule((layout.pos,), lambda x: x.reshape(x.shape[-2:]))
  rules["blocks/attn/qkv/kernel"] = stacked(
      depth, [f"{blk}{n}.weight" for n in layout.qkv],
      lambda *w: linear_kernel(np.concatenate(w)))
  rules["blocks/attn/qkv/bias"] = stacked(
      depth, [f"{blk}{n}.bias" for n in layout.qkv], lambda *b: np.concatenate(b))
  if config.num_registers:
    rules["register_tokens"] = Rule((layout.registers,), lambda x: x.reshape(x.shape[-2:]))
  return rules, list(layout.ignore)


# --------------------------------------------------------------- convert

def convert(src: str, dst: str, variant: str | None = None, overwrite: bool = False,
            num_heads: int | None = None, pos_interpolation: str | None = None) -> Path:
  """Converts `src` into the directory `dst`; raises ConversionError."""
  from flax import nnx

  from adjax.models import dinov2, weights
  common.refuse_existing(dst, overwrite)
  source = read_source(src)
  layout = detect_layout(source.tensors, source.origin)
  config = infer_config(source, layout, variant, num_heads, pos_interpolation)
  model = nnx.eval_shape(lambda: dinov2.DinoV2(config, rngs=nnx.Rngs(0)))
  rules, ignore = build_rules(config, layout)
  flat = apply_rules(rules, source.tensors, weights.param_shapes(model), ignore=ignore,
                     origin=source.origin)
  return common.save_backbone(dst, flat, config, dinov2.KIND, source, layout.name, overwrite)


def main(argv: Sequence[str] | None = None) -> int:
  from adjax.models.dinov2 import VARIANTS
  extra = (
      (("--num-heads",), dict(
          type=int, help="head count of a non-released architecture in a Meta file")),
      (("--pos-interpolation",), dict(
          choices=("meta", "hf"),
          help="position-embedding resize of that reference (default: the source's own)")))
  return common.backbone_main(
      argv, module="converters.dinov2", description=__doc__.split("\n")[0],
      src_help="Meta .pth file, HF Dinov2Model directory or hub repo id",
      variants=VARIANTS, extra=extra,
      convert=lambda args: convert(args.src, args.dst, args.variant, args.overwrite,
                                   args.num_heads, args.pos_interpolation),
      summary=lambda cfg: f"{cfg['num_registers']} registers, ")


if __name__ == "__main__":
  sys.exit(main())
