"""Building the frozen towers and the text table from a run config.

The text tower is used once, at start: every object name's prompt-ensemble
embedding is computed (or read from the on-disk cache) into a table
`[num_objects, 2, E]` that stays on device and is indexed by category in
every step. The text tower itself is then dropped.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from adjax import prompts
from adjax.models import clip_text, dinov3


@dataclasses.dataclass
class Towers:
  backbone: dinov3.DinoV3
  backbone_id: str             # what determines the backbone's features (cache keys)
  layers: tuple[int, ...]
  feature_dim: int
  text_dim: int
  text_embed: "TextEmbedder"


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

  def __call__(self, object_names: list[str]) -> np.ndarray:
    return prompts.text_embeddings(
        self.model, self.tokenizer, list(object_names), cache_dir=self.cache_dir,
        model_id=self.model_id, display_names=self.display_names)


def build_backbone(cfg) -> tuple[dinov3.DinoV3, str]:
  dtype = _dtype(cfg.backbone.dtype)
  if cfg.backbone.random_init:
    model = dinov3.init_random(cfg.backbone.variant, seed=cfg.seed, dtype=dtype)
    return model, f"random:{cfg.backbone.variant}:seed{cfg.seed}"
  path = _converted(cfg.backbone.checkpoint, "backbone", "dinov3",
                    "<DINOv3 .pth or Hugging Face directory>")
  model = dinov3.load(path, dtype=dtype)
  return model, f"dinov3:{_sha_of(path)}"


def _converted(checkpoint: str, field: str, converter: str, source: str) -> Path:
  path = Path(checkpoint)
  if not path.exists():
    raise FileNotFoundError(
        f"{field}.checkpoint={checkpoint!r} does not exist; convert the weights first: "
        f"python -m converters.{converter} --src {source} --dst {path}  (or set "
        f"{field}.random_init=True for random weights)")
  return path


def _sha_of(path: Path) -> str:
  import json
  cfg = json.loads((path / "config.json").read_text())
  return cfg.get("source_sha256") or str(path.absolute())


def build_text(cfg, workdir: Path) -> TextEmbedder:
  activation = cfg.text.activation or ("gelu" if cfg.reference_quirks else None)
  if cfg.text.random_init:
    if cfg.text.variant not in clip_text.VARIANTS:
      raise ValueError(f"text.variant={cfg.text.variant!r}; expected one of "
                       f"{sorted(clip_text.VARIANTS)}")
    config = clip_text.VARIANTS[cfg.text.variant]
    if activation:
      config = dataclasses.replace(config, activation=activation)
    model = clip_text.init_random(config, seed=cfg.seed)
    tok_dir = workdir / "tokenizer"
    if not (tok_dir / "vocab.json").exists():
      clip_text.write_byte_level_tokenizer(tok_dir)
    tokenizer = clip_text.load_tokenizer(tok_dir)
  else:
    path = _converted(cfg.text.checkpoint, "text", "clip_text", "<CLIP checkpoint>")
    model = clip_text.load(path, activation=activation or None)
    tokenizer = clip_text.load_tokenizer(path)
  cache_dir = Path(cfg.text.cache_dir) if cfg.text.cache_dir else workdir / "text_cache"
  # model_id: the checkpoint's source and tokenizer hashes, or the random
  # init's config and seed (the text cache's key).
  return TextEmbedder(model, tokenizer, model.model_id, cache_dir,
                      cfg.text.display_names.to_dict())


def build(cfg, workdir: Path) -> Towers:
  backbone, backbone_id = build_backbone(cfg)
  depth = backbone.config.depth
  layers = tuple(cfg.backbone.layers) if cfg.backbone.layers else tuple(
      dinov3.default_layers(depth))
  bad = [l for l in layers if not 0 <= l < depth]
  if len(layers) != 4 or bad:
    raise ValueError(f"backbone.layers={layers}: expected 4 block indices in "
                     f"[0, {depth}) for {cfg.backbone.variant}")
  text = build_text(cfg, workdir)
  logging.info("backbone %s (%s), layers %s; text tower %s", cfg.backbone.variant,
               backbone_id, layers, text.model_id)
  return Towers(backbone, backbone_id, layers, backbone.config.dim, text.dim, text)
