"""Converts a CLIP text tower to an adjax checkpoint directory.

  python -m converters.clip_text --src SRC --dst DIR [--tokenizer TOK]
      [--activation quick_gelu|gelu] [--overwrite]

SRC is one of
  - a Hugging Face `CLIPModel` or `CLIPTextModelWithProjection` directory
    (config.json + model.safetensors / pytorch_model.bin, sharded or not),
    e.g. a download of openai/clip-vit-large-patch14-336;
  - an OpenAI / OpenCLIP state dict (.pt, .pth, .bin, .safetensors);
  - the OpenAI TorchScript archive (ViT-L-14-336px.pt).
Only the text tower is kept; vision weights and `logit_scale` are ignored by
name. Half-precision weights are upcast to float32.

TOK supplies the tokenizer when SRC has none (the OpenAI files): a directory
with vocab.json + merges.txt (or tokenizer.json), or OpenAI's
`bpe_simple_vocab_16e6.txt.gz`, from which the vocabulary is built the way
OpenAI builds it. A Hugging Face directory's own tokenizer files are used
when TOK is not given.

DIR (written atomically, nothing left on failure) is self-contained:
config.json (kind "clip_text", sizes, activation, source, source_sha256,
tokenizer_sha256), params/ and vocab.json + merges.txt.

A Hugging Face `CLIPTextModel` (no projection) is refused: the projection is
a learned part of the tower that the prompt embeddings need, and no other
weights stand in for it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

from adjax.common import atomic, errors
from adjax.models import clip_text, clip_tokenizer, weights
from converters import common
from converters.common import ConversionError, Rule

# Keys deliberately dropped: the vision tower, the contrastive temperature,
# integer buffers of the OpenAI TorchScript archive, HF's position_ids buffer.
IGNORE_OPENAI = (r"visual\..*", r"logit_scale", r"input_resolution", r"context_length",
                 r"vocab_size", r"(.*\.)?attn_mask", r"logit_bias")
IGNORE_HF = (r"vision_model\..*", r"visual_projection\..*", r"logit_scale",
             r"logit_bias", r"text_model\.embeddings\.position_ids")

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _t(w: np.ndarray) -> np.ndarray:
  return common.linear_kernel(w)


def openai_rules(layers: int, width: int) -> dict[str, Rule]:
  """Target path -> rule for the OpenAI/OpenCLIP layout (text_projection is x @ P)."""
  rules = {
      "token_embedding/embedding": Rule(("token_embedding.weight",)),
      "positional_embedding": Rule(("positional_embedding",)),
      "ln_final/scale": Rule(("ln_final.weight",)),
      "ln_final/bias": Rule(("ln_final.bias",)),
      "text_projection": Rule(("text_projection",)),
  }
  for i in range(layers):
    s, t = f"transformer.resblocks.{i}.", f"blocks/{i}/"
    for ln in ("ln_1", "ln_2"):
      rules[t + f"{ln}/scale"] = Rule((s + f"{ln}.weight",))
      rules[t + f"{ln}/bias"] = Rule((s + f"{ln}.bias",))
    # in_proj_weight stacks q, k, v along its rows: [3W, W].
    for j, name in enumerate("qkv"):
      sl = slice(j * width, (j + 1) * width)
      rules[t + f"attn/{name}/kernel"] = Rule(
          (s + "attn.in_proj_weight",), lambda w, sl=sl: _t(w[sl]))
      rules[t + f"attn/{name}/bias"] = Rule(
          (s + "attn.in_proj_bias",), lambda b, sl=sl: b[sl])
    for dst, src in (("attn/out", "attn.out_proj"), ("fc", "mlp.c_fc"), ("proj", "mlp.c_proj")):
      rules[t + f"{dst}/kernel"] = Rule((s + f"{src}.weight",), _t)
      rules[t + f"{dst}/bias"] = Rule((s + f"{src}.bias",))
  return rules


def hf_rules(layers: int) -> dict[str, Rule]:
  """Target path -> rule for transformers' CLIPModel / CLIPTextModelWithProjection."""
  p = "text_model."
  rules = {
      "token_embedding/embedding": Rule((p + "embeddings.token_embedding.weight",)),
      "positional_embedding": Rule((p + "embeddings.position_embedding.weight",)),
      "ln_final/scale": Rule((p + "final_layer_norm.weight",)),
      "ln_final/bias": Rule((p + "final_layer_norm.bias",)),
      # nn.Linear(W, E, bias=False).weight is [E, W] = P transposed.
      "text_projection": Rule(("text_projection.weight",), _t),
  }
  for i in range(layers):
    s, t = f"{p}encoder.layers.{i}.", f"blocks/{i}/"
    for ln, src in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
      rules[t + f"{ln}/scale"] = Rule((s + f"{src}.weight",))
      rules[t + f"{ln}/bias"] = Rule((s + f"{src}.bias",))
    for dst, src in (("attn/q", "self_attn.q_proj"), ("attn/k", "self_attn.k_proj"),
                     ("attn/v", "self_attn.v_proj"), ("attn/out", "self_attn.out_proj"),
                     ("fc", "mlp.fc1"), ("proj", "mlp.fc2")):
      rules[t + f"{dst}/kernel"] = Rule((s + f"{src}.weight",), _t)
      rules[t + f"{dst}/bias"] = Rule((s + f"{src}.bias",))
  return rules


def _looks_like_dinov3(keys) -> bool:
  markers = ("patch_embed.proj.weight", "storage_tokens", "cls_token", "mask_token",
             "embeddings.patch_embeddings.weight", "embeddings.register_tokens")
  return any(k.endswith(m) for k in keys for m in markers) or any(
      re.match(r"(model\.)?layer\.\d+\.", k) for k in keys)


def detect_layout(sd: dict, origin: str) -> str:
  """'hf' or 'openai'; a clear error for anything else."""
  keys = list(sd)
  if any(k.startswith("text_model.") for k in keys):
    if "text_projection.weight" not in sd:
      raise ConversionError(
          f"{origin}: a Hugging Face CLIPTextModel without `text_projection.weight`; "
          "the prompt embeddings need the text projection. Convert the CLIPModel or "
          "CLIPTextModelWithProjection checkpoint instead")
    return "hf"
  if "embeddings.token_embedding.weight" in sd:  # transformers 5 CLIPTextModel
    raise ConversionError(
        f"{origin}: a Hugging Face CLIPTextModel (no text projection); the prompt "
        "embeddings need `text_projection`. Convert the CLIPModel or "
        "CLIPTextModelWithProjection checkpoint instead")
  if "token_embedding.weight" in sd or any(k.startswith("transformer.resblocks.") for k in keys):
    return "openai"
  if any(k.startswith(("vision_model.", "visual.", "visual_projection")) for k in keys):
    raise ConversionError(
        f"{origin}: holds only a CLIP vision tower (no `text_model.*` or "
        "`token_embedding.weight` / `transformer.resblocks.*` keys); this converter "
        "needs the text tower")
  if _looks_like_dinov3(keys):
    raise ConversionError(
        f"{origin}: looks like a DINOv3 image-backbone checkpoint, not a CLIP text "
        "tower; convert it with `python -m converters.dinov3`")
  raise ConversionError(
      f"{origin}: not a CLIP checkpoint (expected `text_model.*` (Hugging Face) or "
      f"`token_embedding.weight`, `transformer.resblocks.*` (OpenAI) keys); "
      f"found e.g. {sorted(keys)[:8]}")


def _strip_module_prefix(sd: dict) -> dict:
  if sd and all(k.startswith("module.") for k in sd):
    return {k[len("module."):]: v for k, v in sd.items()}
  return sd


def _read_hf_dir(src: Path) -> tuple[dict, list[Path]]:
  """All tensors of a Hugging Face model directory and the files they came from."""
  files = []
  for name in _WEIGHT_FILES:
    index = src / f"{name}.index.json"
    if index.is_file():
      shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      files = [src / s for s in shards]
      break
    if (src / name).is_file():
      files = [src / name]
      break
  if not files:
    raise ConversionError(
        f"{src}: no weights found (expected one of {list(_WEIGHT_FILES)} or a "
        "sharded *.index.json)")
  sd = {}
  for f in files:
    sd.update(common.read_state_dict(f))
  return sd, files


def _hf_text_config(cfg_dir: Path, origin: str):
  from transformers import CLIPTextConfig
  cfg_file = cfg_dir / "config.json"
  if not cfg_file.is_file():
    raise ConversionError(
        f"{origin}: Hugging Face layout but no config.json in {cfg_dir} (it gives "
        "the number of attention heads and the activation)")
  model_type = json.loads(cfg_file.read_text()).get("model_type")
  if model_type not in ("clip", "clip_text_model"):
    raise ConversionError(
        f"{cfg_file}: model_type is {model_type!r}, expected 'clip' or 'clip_text_model'")
  return CLIPTextConfig.from_pretrained(str(cfg_dir))


def _count_layers(keys, pattern: str) -> int:
  ids = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  if ids != set(range(len(ids))):
    raise ConversionError(f"layer indices are not contiguous: {sorted(ids)}")
  return len(ids)


def model_config(sd: dict, layout: str, hf_cfg, activation: str | None,
                 eos_token_id: int, name: str) -> clip_text.ClipTextConfig:
  """Sizes from the tensors; heads and activation from the HF config or OpenAI's rules."""
  if layout == "hf":
    p = "text_model."
    vocab, width = sd[p + "embeddings.token_embedding.weight"].shape
    context = sd[p + "embeddings.position_embedding.weight"].shape[0]
    layers = _count_layers(sd, r"text_model\.encoder\.layers\.(\d+)\.")
    mlp = sd[p + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    embed = sd["text_projection.weight"].shape[0]
    heads = hf_cfg.num_attention_heads
    default_act = hf_cfg.hidden_act
    if hf_cfg.layer_norm_eps not in (None, 1e-5):
      raise ConversionError(f"{name}: layer_norm_eps {hf_cfg.layer_norm_eps}, the model uses 1e-5")
  else:
    vocab, width = sd["token_embedding.weight"].shape
    context = sd["positional_embedding"].shape[0]
    layers = _count_layers(sd, r"transformer\.resblocks\.(\d+)\.")
    mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    embed = sd["text_projection"].shape[1]
    heads = width // 64  # OpenAI's rule: 64-dimensional heads
    default_act = "quick_gelu"  # what OpenAI CLIP was trained with
  act = activation or default_act
  if act not in ("quick_gelu", "gelu"):
    raise ConversionError(f"{name}: activation {act!r} is not 'quick_gelu' or 'gelu'")
  if layers == 0:
    raise ConversionError(f"{name}: no transformer layers found")
  if not 0 <= eos_token_id < vocab:
    raise ConversionError(
        f"{name}: the tokenizer's {clip_tokenizer.EOT_TOKEN} id {eos_token_id} is outside "
        f"the model's vocabulary of {vocab}")
  return clip_text.ClipTextConfig(
      vocab_size=int(vocab), context_length=int(context), width=int(width),
      layers=layers, heads=int(heads), mlp_dim=int(mlp), embed_dim=int(embed),
      activation=act, eos_token_id=int(eos_token_id), name=name)


def to_params(sd: dict, layout: str, config: clip_text.ClipTextConfig,
              origin: str = "source") -> dict[str, np.ndarray]:
  """Flat model parameters ('/'-joined NNX paths) from a state dict, strictly."""
  from flax import nnx
  abstract = nnx.eval_shape(lambda: clip_text.ClipText(config, rngs=nnx.Rngs(0)))
  if layout == "openai":
    rules, ignore = openai_rules(config.layers, config.width), IGNORE_OPENAI
  else:
    rules, ignore = hf_rules(config.layers), IGNORE_HF
  return common.apply_rules(rules, sd, weights.param_shapes(abstract), ignore=ignore,
                            origin=origin)


def _tokenizer_from_json(path: Path) -> tuple[dict, list[tuple[str, str]]]:
  model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
  if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
    raise ConversionError(f"{path}: not a BPE tokenizer.json with vocab and merges")
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  return model["vocab"], merges


def read_tokenizer(tok: Path | None, src: Path) -> tuple[dict, list[tuple[str, str]], str]:
  """(vocab, merges, description) from --tokenizer, or from a HF source directory."""
  candidates = [tok] if tok is not None else ([src] if src.is_dir() else [])
  for c in candidates:
    if c.is_file() and c.name.endswith(".gz"):
      try:
        merges = clip_tokenizer.read_merges(c, clip_tokenizer.OPENAI_NUM_MERGES,
                                              openai_bpe=True)
      except ValueError as e:
        raise ConversionError(str(e)) from e
      return clip_tokenizer.vocabulary(merges), merges, f"built from {c.name}"
    if c.is_dir() and (c / "vocab.json").is_file() and (c / "merges.txt").is_file():
      vocab = json.loads((c / "vocab.json").read_text(encoding="utf-8"))
      try:
        merges = clip_tokenizer.read_merges(c / "merges.txt")
      except ValueError as e:
        raise ConversionError(str(e)) from e
      return vocab, merges, "vocab.json + merges.txt"
    if c.is_dir() and (c / "tokenizer.json").is_file():
      vocab, merges = _tokenizer_from_json(c / "tokenizer.json")
      return vocab, merges, "tokenizer.json"
  where = f"--tokenizer {tok}" if tok is not None else f"the source {src}"
  raise ConversionError(
      f"no tokenizer files in {where} (expected vocab.json + merges.txt, tokenizer.json, "
      "or OpenAI's bpe_simple_vocab_16e6.txt.gz); pass --tokenizer DIR_OR_BPE_GZ")


def _source_sha256(files: list[Path], src: Path) -> str:
  if src.is_file():
    return common.sha256_file(src)
  digests = {f.name: common.sha256_file(f) for f in files + [src / "config.json"] if f.is_file()}
  return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def convert(src, dst, *, tokenizer=None, activation: str | None = None,
            overwrite: bool = False) -> Path:
  """Converts SRC to DST; every check runs before anything is written."""
  src, dst = Path(src), Path(dst)
  tok = Path(tokenizer) if tokenizer is not None else None
  if dst.exists() and not overwrite:
    raise ConversionError(f"{dst} already exists; pass --overwrite to replace it")
  if not src.exists():
    raise ConversionError(f"{src}: no such file or directory")
  if tok is not None and not tok.exists():
    raise ConversionError(f"--tokenizer {tok}: no such file or directory")
  if src.is_dir():
    sd, files = _read_hf_dir(src)
  else:
    sd, files = common.read_state_dict(src), [src]
  sd = _strip_module_prefix(sd)
  layout = detect_layout(sd, str(src))
  hf_cfg = _hf_text_config(src if src.is_dir() else src.parent, str(src)) if layout == "hf" else None
  vocab, merges, tok_desc = read_tokenizer(tok, src)
  for special in (clip_tokenizer.SOT_TOKEN, clip_tokenizer.EOT_TOKEN):
    if special not in vocab:
      raise ConversionError(f"tokenizer ({tok_desc}) has no {special} token")
  name = src.name
  config = model_config(sd, layout, hf_cfg, activation, vocab[clip_tokenizer.EOT_TOKEN], name)
  tok_size = max(vocab.values()) + 1
  if tok_size != config.vocab_size:
    raise ConversionError(
        f"the tokenizer ({tok_desc}) has {tok_size} ids but the model's token "
        f"embedding has {config.vocab_size} rows; they do not belong together")

  flat = to_params(sd, layout, config, origin=str(src))

  source_sha256 = _source_sha256(files, src)
  with atomic.atomic_dir(dst, overwrite=overwrite) as tmp:
    clip_tokenizer.write_vocab_merges(tmp, vocab, merges)
    tok_sha = {f: common.sha256_file(tmp / f) for f in ("vocab.json", "merges.txt")}
    meta = dict(config.to_dict(), kind=clip_text.KIND, source=str(src.absolute()),
                source_name=src.name, source_layout=layout,
                source_sha256=source_sha256, tokenizer=tok_desc,
                tokenizer_sha256=tok_sha)
    weights.save(tmp / "w", flat, meta)
    for item in ("params", "config.json"):
      (tmp / "w" / item).rename(tmp / item)
    (tmp / "w").rmdir()
    clip_tokenizer.load_tokenizer(tmp)  # the written files must load
  return dst


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m converters.clip_text", description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", required=True,
                      help="HF CLIP directory, OpenAI/OpenCLIP state dict or TorchScript file")
  parser.add_argument("--dst", required=True, help="output directory (written atomically)")
  parser.add_argument("--tokenizer", default=None,
                      help="directory with vocab.json + merges.txt (or tokenizer.json), "
                           "or OpenAI's bpe_simple_vocab_16e6.txt.gz")
  parser.add_argument("--activation", choices=("quick_gelu", "gelu"), default=None,
                      help="override the activation (default: the source's; "
                           "quick_gelu for OpenAI files)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  args = parser.parse_args(argv)
  rc, out = errors.run_command(
      lambda: convert(args.src, args.dst, tokenizer=args.tokenizer,
                      activation=args.activation, overwrite=args.overwrite))
  if rc:
    return rc
  cfg = weights.read_config(out, clip_text.KIND)
  print(f"wrote {out}: {cfg['layers']} layers, width {cfg['width']}, heads {cfg['heads']}, "
        f"embed {cfg['embed_dim']}, vocab {cfg['vocab_size']}, activation {cfg['activation']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
