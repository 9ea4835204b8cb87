"""Converts a DINOv3 ViT checkpoint (Meta .pth or Hugging Face) for adjax.

  python -m converters.dinov3 --src SRC --dst DIR [--variant NAME] [--overwrite]

SRC is one of
- an official Meta checkpoint file, e.g. dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth
  (`blocks.N.attn.qkv` with a `bias_mask`, `storage_tokens`, `ls1.gamma`,
  `rope_embed.periods`);
- a Hugging Face `DINOv3ViTModel` directory (config.json + model.safetensors,
  possibly sharded) or a single .safetensors file in that layout;
- a hub repo id such as facebook/dinov3-vitl16-pretrain-lvd1689m, fetched with
  huggingface_hub when the hub is reachable.

The variant is inferred from the tensor shapes (plus the head count from the
RoPE periods or config.json); `--variant` forces one. DIR receives the
parameters as NNX paths of `adjax.models.dinov3.DinoV3` and a config.json
with the architecture, the variant, the source file name and its sha256. It
is written atomically: a failed conversion leaves nothing at DIR.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from converters import common
from converters.common import (ConversionError, Rule, Source, apply_rules,
                               linear_kernel, stacked)

_HF_MODEL_TYPES = ("dinov3_vit",)


# ----------------------------------------------------------------- reading

def read_source(src: str) -> Source:
  return common.read_source(src, _HF_MODEL_TYPES, "a Hugging Face DINOv3ViTModel",
                            "facebook/dinov3-vitl16-pretrain-lvd1689m")


# ---------------------------------------------------------------- layouts

@dataclasses.dataclass(frozen=True)
class Layout:
  """Source names of one checkpoint family; `{i}` is the block index."""
  name: str
  cls: str
  registers: str
  patch: str
  norm: str
  block: str
  norm1: str
  norm2: str
  proj: str
  ls1: str
  ls2: str
  mlp: tuple[str, str]  # fc1, fc2
  swiglu: tuple[str, str, str]  # w1 (gate), w2 (up), w3 (down)
  ignore: tuple[str, ...]


META = Layout(
    "meta", "cls_token", "storage_tokens", "patch_embed.proj", "norm", "blocks.{i}.",
    "norm1", "norm2", "attn.proj", "ls1.gamma", "ls2.gamma",
    ("mlp.fc1", "mlp.fc2"), ("mlp.w1", "mlp.w2", "mlp.w3"),
    # mask_token: masked-image training only; local_cls_norm: the 7B's
    # training-time norm of local crops' cls token.
    (r"mask_token", r"local_cls_norm\..*"))

HF = Layout(
    "hf", "embeddings.cls_token", "embeddings.register_tokens",
    "embeddings.patch_embeddings", "norm", "model.layer.{i}.",
    "norm1", "norm2", "attention.o_proj", "layer_scale1.lambda1", "layer_scale2.lambda1",
    ("mlp.up_proj", "mlp.down_proj"), ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    (r"embeddings\.mask_token", r"rope_embeddings\.inv_freq"))


def detect_layout(tensors: dict[str, np.ndarray], origin: str) -> Layout:
  keys = set(tensors)
  if "cls_token" in keys and "blocks.0.attn.qkv.weight" in keys:
    if "pos_embed" in keys or "storage_tokens" not in keys:
      raise ConversionError(
          f"{origin}: has {'pos_embed' if 'pos_embed' in keys else 'no storage_tokens'}"
          ": a DINOv2-style checkpoint, not DINOv3 (4 storage tokens, RoPE)")
    if any(k.startswith("cls_norm.") for k in keys):
      raise ConversionError(
          f"{origin}: has untied cls/patch norms (cls_norm.*); adjax's DINOv3 "
          "applies the one final `norm` to all tokens and cannot represent them")
    return META
  if "embeddings.cls_token" in keys:
    if any(k.startswith("layer.") for k in keys):  # transformers 4.x names
      return dataclasses.replace(HF, block="layer.{i}.")
    return HF
  raise common.unknown_layout(
      keys, origin, "DINOv3", "cls_token, storage_tokens, blocks.N.attn.qkv.weight",
      "embeddings.cls_token, model.layer.N.*")


# ---------------------------------------------------------- architecture

def infer_config(src: Source, layout: Layout, variant: str | None):
  """DinoV3Config from the shapes (+ RoPE periods / config.json), or --variant."""
  from adjax.models.dinov3 import VARIANTS, DinoV3Config
  t = src.tensors
  if variant is not None:
    if variant not in VARIANTS:
      raise ConversionError(f"--variant {variant!r}: unknown; known: {sorted(VARIANTS)}")
    return VARIANTS[variant]
  depth, swiglu, fc1 = common.vit_blocks(
      src, layout, [layout.cls, layout.registers, f"{layout.patch}.weight"])
  b0 = layout.block.format(i=0)
  qkv_bias = (f"{b0}attn.qkv.bias" if layout.name == "meta"
              else f"{b0}attention.q_proj.bias") in t
  facts = dict(dim=t[layout.cls].shape[-1], depth=depth,
               ffn="swiglu" if swiglu else "mlp", ffn_hidden=t[fc1].shape[0],
               qkv_bias=qkv_bias, patch_size=t[f"{layout.patch}.weight"].shape[-1],
               num_registers=t[layout.registers].shape[-2])
  dim = facts["dim"]
  extra = {}
  heads = None
  if src.hf_config:
    hc = src.hf_config
    heads = hc.get("num_attention_heads")
    extra = dict(rope_base=float(hc.get("rope_theta", 100.0)),
                 layer_norm_eps=float(hc.get("layer_norm_eps", 1e-5)))
    act = hc.get("hidden_act", "gelu")
    if act != ("silu" if swiglu else "gelu"):
      raise ConversionError(
          f"{src.origin}: hidden_act {act!r} with use_gated_mlp={swiglu}; DINOv3 uses "
          "'gelu' (exact) for the MLP and 'silu' for SwiGLU")
  elif "rope_embed.periods" in t:
    periods = t["rope_embed.periods"].astype(np.float64)
    heads = dim // (4 * len(periods))
    if len(periods) >= 2:  # periods[1] = base ** (4 / head_dim)
      extra = dict(rope_base=float(np.round(periods[1] ** (len(periods)), 4)))
  for v in VARIANTS.values():
    if all(getattr(v, k) == val for k, val in facts.items()) and heads in (None, v.num_heads):
      config = dataclasses.replace(v, **extra)
      return config if config == v else dataclasses.replace(config, name="custom")
  if heads is None:
    raise ConversionError(
        f"{src.origin}: shapes {facts} match no released DINOv3 variant and the "
        f"head count is unknown; pass --variant (one of {sorted(VARIANTS)})")
  return DinoV3Config(num_heads=heads, name="custom", **facts, **extra)


# ----------------------------------------------------------------- rules

def _qkv_bias(part: int, origin: str, dim: int):
  """Bias of q (part 0) or v (part 2) after the bias mask; the key bias must vanish."""
  def fn(bias, mask=None):
    if mask is not None:
      if not np.all(np.isfinite(mask)):
        raise ConversionError(f"{origin}: attn.qkv.bias_mask holds non-finite values "
                              "(an uninitialised mask)")
      bias = bias * mask
    if np.any(bias[dim:2 * dim] != 0):
      raise ConversionError(
          f"{origin}: the key bias is not zero and no bias_mask zeroes it; DINOv3 "
          "has no key bias")
    return bias[part * dim:(part + 1) * dim]
  return fn


def build_rules(config, layout: Layout, tensors: dict, origin: str) -> tuple[dict, list]:
  """Target path -> Rule, and the source keys deliberately ignored."""
  d, depth = config.dim, config.depth
  blk = layout.block
  if config.ffn == "mlp":
    ffn = zip(("fc1", "fc2"), layout.mlp)
  else:
    ffn = zip(("w1", "w2", "w3"), layout.swiglu)
  rules = common.vit_rules(depth, layout, (layout.norm1, layout.norm2),
                           [(ours, theirs, lambda x: x) for ours, theirs in ffn])
  rules["register_tokens"] = Rule((layout.registers,), lambda x: x.reshape(x.shape[-2:]))
  if layout.name == "meta":
    rules["blocks/attn/qkv/kernel"] = stacked(depth, [blk + "attn.qkv.weight"], linear_kernel)
    bias_keys = [blk + "attn.qkv.bias"]
    if blk.format(i=0) + "attn.qkv.bias_mask" in tensors:
      bias_keys.append(blk + "attn.qkv.bias_mask")
    if "rope_embed.periods" in tensors:
      rules["rope_periods"] = Rule(("rope_embed.periods",))
  else:
    a = blk + "attention."
    rules["blocks/attn/qkv/kernel"] = stacked(
        depth, [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
        lambda q, k, v: linear_kernel(np.concatenate([q, k, v])))
    if config.qkv_bias:
      # HF drops the key bias; a present one is accepted only if it is zero.
      has_k = blk.format(i=0) + "attention.k_proj.bias" in tensors
      names = ("q_proj", "k_proj", "v_proj") if has_k else ("q_proj", "v_proj")
      bias_keys = [f"{a}{n}.bias" for n in names]
      for part, target in ((0, "q_bias"), (2, "v_bias")):
        pick = _qkv_bias(part, origin, d)
        rules[f"blocks/attn/{target}"] = stacked(
            depth, bias_keys,
            lambda *x, pick=pick: pick(np.concatenate(
                x if len(x) == 3 else (x[0], np.zeros_like(x[0]), x[1]))))
    return rules, list(layout.ignore)
  if config.qkv_bias:
    rules["blocks/attn/q_bias"] = stacked(depth, bias_keys, _qkv_bias(0, origin, d))
    rules["blocks/attn/v_bias"] = stacked(depth, bias_keys, _qkv_bias(2, origin, d))
  return rules, list(layout.ignore)


# --------------------------------------------------------------- convert

def convert(src: str, dst: str, variant: str | None = None, overwrite: bool = False) -> Path:
  """Converts `src` into the directory `dst`; raises ConversionError."""
  from flax import nnx

  from adjax.models import dinov3, weights
  common.refuse_existing(dst, overwrite)
  source = read_source(src)
  layout = detect_layout(source.tensors, source.origin)
  config = infer_config(source, layout, variant)
  model = nnx.eval_shape(lambda: dinov3.DinoV3(config, rngs=nnx.Rngs(0)))
  targets = weights.param_shapes(model)
  rules, ignore = build_rules(config, layout, source.tensors, source.origin)
  if "rope_periods" in rules:
    targets["rope_periods"] = (config.head_dim // 4,)
  flat = apply_rules(rules, source.tensors, targets, ignore=ignore, origin=source.origin)
  flat.setdefault("rope_periods", dinov3.rope_periods(config))
  return common.save_backbone(dst, flat, config, dinov3.KIND, source, layout.name, overwrite)


def main(argv: Sequence[str] | None = None) -> int:
  from adjax.models.dinov3 import VARIANTS
  return common.backbone_main(
      argv, module="converters.dinov3", description=__doc__.split("\n")[0],
      src_help="Meta .pth file, HF DINOv3ViTModel directory or hub repo id",
      variants=VARIANTS,
      convert=lambda args: convert(args.src, args.dst, args.variant, args.overwrite))


if __name__ == "__main__":
  sys.exit(main())
