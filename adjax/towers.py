"""Building the frozen towers and the text table from a run config.

The text tower is used once, at start: every object name's prompt-ensemble
embedding is computed (or read from the on-disk cache) into a table
`[num_objects, 2, E]` that stays on device and is indexed by category in
every step. The text tower itself is then dropped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from flax import nnx
import jax.numpy as jnp
import numpy as np

from adjax.ad_model import ADModel, Behaviour
from adjax.models import backbones, clip_text, prompts
from adjax.workdir import Workdir


@dataclasses.dataclass
class Towers:
  backbone: nnx.Module         # any family of adjax.models.backbones.FAMILIES
  backbone_id: str             # what determines the backbone's features (cache keys)
  info: backbones.Backbone     # the backbone's contract (patch, prefix, normalisation)
  text_dim: int
  text_embed: "TextEmbedder | None"   # None: built without the text tower (neighbour modes)

  def model(self, spec) -> ADModel:
    """The detector a `ModelConfig` (`run.model`) describes over these towers."""
    return ADModel.create(spec, self.info, self.text_dim)


def _dtype(name: str):
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
  except KeyError:
    raise ValueError(f"backbone.dtype={name!r}; expected float32 or bfloat16") from None


class TextEmbedder:
  """Object names -> [K, 2, E] prompt-ensemble table, cached per name."""

  def __init__(self, model, tokenizer, model_id: str, cache_dir, display_names):
    self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
    self.cache_dir = cache_dir
    self.display_names = dict(display_names or {})

  @property
  def dim(self) -> int:
    return self.model.config.embed_dim

  def problem(self, object_name: str) -> str:
    """Why `object_name` cannot be embedded ("" when it can): its longest
    prompt sentence, tokenised as `prompts.text_embeddings` does, must fit the
    text tower's context."""
    name = self.display_names.get(object_name, object_name)
    normal, abnormal = prompts.prompt_sentences(name)
    context = int(self.model.config.context_length)
    longest = prompts.longest_tokens(self.tokenizer, normal + abnormal)
    if longest <= context:
      return ""
    around = prompts.longest_tokens(self.tokenizer, sum(prompts.prompt_sentences(""), []))
    return (f"object name {object_name!r}: its longest prompt sentence is {longest} tokens, "
            f"more than the text tower's context of {context}; give a shorter name (about "
            f"{max(context - around, 0)} tokens fit beside the prompt's own words)")

  def __call__(self, object_names: list[str]) -> np.ndarray:
    return prompts.text_embeddings(
        self.model, self.tokenizer, list(object_names), cache_dir=self.cache_dir,
        model_id=self.model_id, display_names=self.display_names)


def build_backbone(cfg) -> tuple[nnx.Module, str]:
  """The configured backbone (family and variant from the table) and its identity."""
  family, variant = cfg.backbone.family, cfg.backbone.variant
  module = backbones.family_module(family)
  dtype = _dtype(cfg.backbone.dtype)
  if cfg.backbone.random_init:
    model = module.init_random(backbones.variant_config(family, variant), seed=cfg.seed,
                               dtype=dtype)
    return model, f"random:{family}:{variant}:seed{cfg.seed}"
  path = _converted(cfg.backbone.checkpoint, "backbone", family,
                    f"<{family} checkpoint>")
  backbones.check_checkpoint(family, variant, path)
  model = module.load(path, dtype=dtype)
  return model, f"{family}:{_sha_of(path)}"


def _converted(checkpoint: str, field: str, converter: str, source: str) -> Path:
  path = Path(checkpoint)
  if not path.exists():
    raise FileNotFoundError(
        f"{field}.checkpoint={checkpoint!r} does not exist; convert the weights first: "
        f"python -m converters.{converter} --src {source} --dst {path}  (or set "
        f"{field}.random_init=True for random weights)")
  return path


def _sha_of(path: Path) -> str:
  cfg = json.loads((path / "config.json").read_text())
  return cfg.get("source_sha256") or str(path.absolute())


def build_text(cfg, workdir: Path) -> TextEmbedder:
  exact_gelu = Behaviour.of(cfg.reference_quirks).text_exact_gelu
  activation = cfg.text.activation or ("gelu" if exact_gelu else None)
  if cfg.text.random_init:
    if cfg.text.variant not in clip_text.VARIANTS:
      raise ValueError(f"text.variant={cfg.text.variant!r}; expected one of "
                       f"{sorted(clip_text.VARIANTS)}")
    config = clip_text.VARIANTS[cfg.text.variant]
    if activation:
      config = dataclasses.replace(config, activation=activation)
    model = clip_text.init_random(config, seed=cfg.seed)
    tok_dir = Workdir(workdir).tokenizer
    if not (tok_dir / "vocab.json").exists():
      clip_text.write_byte_level_tokenizer(tok_dir)
    tokenizer = clip_text.load_tokenizer(tok_dir)
  else:
    path = _converted(cfg.text.checkpoint, "text", "clip_text", "<CLIP checkpoint>")
    model = clip_text.load(path, activation=activation or None)
    tokenizer = clip_text.load_tokenizer(path)
  cache_dir = Path(cfg.text.cache_dir) if cfg.text.cache_dir else Workdir(workdir).text_cache
  # model_id: the checkpoint's source and tokenizer hashes, or the random
  # init's config and seed (the text cache's key).
  return TextEmbedder(model, tokenizer, model.model_id, cache_dir,
                      dict(cfg.text.display_names))


def build(cfg, workdir: Path, *, text: bool = True) -> Towers:
  """The backbone and (unless `text=False`: scoring modes without the head) the
  text tower."""
  backbone, backbone_id = build_backbone(cfg)
  info = backbones.describe(cfg.backbone.family, backbone.config)
  embed = build_text(cfg, workdir) if text else None
  logging.info("backbone %s %s (%s); text tower %s", info.family, info.variant,
               backbone_id, embed.model_id if embed else "not built")
  return Towers(backbone, backbone_id, info, embed.dim if embed else 0, embed)
