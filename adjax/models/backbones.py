"""The backbone contract and the table of backbone families.

A backbone family is a module in `adjax/models/` with:
- `KIND` (the converted checkpoint's kind), `VARIANTS` (name -> config),
  `PIXEL_MEAN` / `PIXEL_STD` (RGB, on the [0, 1] scale), `default_layers(depth)`,
  `init_random(variant, seed=, dtype=)` and `load(path, dtype=, sharding=)`;
- configs with `patch_size`, `depth`, `dim`, `num_prefix_tokens` (cls plus
  registers, before the patch tokens) and `cls_index`;
- models whose `get_intermediate_layers(images, layers)` takes normalised
  float32 NHWC images and returns one `[B, prefix + patches, D]` array per
  requested block, through the final norm, patch tokens row-major.

Everything outside the family modules reads those facts from a `Backbone`
(patch grid, prefix tokens, normalisation, cache keys, config checks); no
other module knows 16, 14 or ImageNet's statistics. Adding a family is one
module (built on the ViT layers of `adjax.models.vit`) plus one row in `FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path

import numpy as np

from adjax import modes
from adjax.common.errors import UserError

# family name -> module implementing the contract above.
FAMILIES: dict[str, str] = {
    "dinov3": "adjax.models.dinov3",
    "dinov2": "adjax.models.dinov2",
}


class BackboneError(UserError, ValueError):
  """An unknown family or variant, or a checkpoint that does not match the config."""


def family_module(family: str):
  if family not in FAMILIES:
    raise BackboneError(f"backbone.family={family!r}; expected one of {sorted(FAMILIES)}")
  return importlib.import_module(FAMILIES[family])


def variants(family: str) -> list[str]:
  return sorted(family_module(family).VARIANTS)


@dataclasses.dataclass(frozen=True)
class Backbone:
  """What the rest of adjax needs to know about a backbone, without its weights."""
  family: str
  variant: str
  patch_size: int
  num_prefix_tokens: int
  cls_index: int
  depth: int
  dim: int
  pixel_mean: tuple[float, float, float]
  pixel_std: tuple[float, float, float]

  def grid(self, height: int, width: int | None = None) -> tuple[int, int]:
    """The patch grid of an input size (which must be a multiple of the patch)."""
    width = height if width is None else width
    if height % self.patch_size or width % self.patch_size or height <= 0 or width <= 0:
      raise BackboneError(
          f"image size {height}x{width} is not a positive multiple of the "
          f"{self.family} {self.variant} patch size {self.patch_size}")
    return height // self.patch_size, width // self.patch_size

  def default_layers(self) -> tuple[int, ...]:
    return tuple(family_module(self.family).default_layers(self.depth))

  def normalize(self, images):
    """uint8 RGB [..., 3] -> float32 normalised (jnp or np, as given)."""
    if isinstance(images, np.ndarray):
      xp = np
    else:
      import jax.numpy as xp  # deferred: JAX; backbones are described without it
    mean = xp.asarray(self.pixel_mean, xp.float32)
    std = xp.asarray(self.pixel_std, xp.float32)
    return (images.astype(xp.float32) * xp.float32(1.0 / 255.0) - mean) / std

  def denormalize(self, images: np.ndarray) -> np.ndarray:
    """Normalised float [..., 3] -> uint8 RGB."""
    rgb = np.asarray(images, np.float32) * np.asarray(self.pixel_std, np.float32)
    rgb = rgb + np.asarray(self.pixel_mean, np.float32)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def find_variant(name: str) -> tuple[str, object]:
  """(family, config) of a variant name from any family ("vitl16", "vitl14_reg")."""
  for family in FAMILIES:
    module = family_module(family)
    if name in module.VARIANTS:
      return family, module.VARIANTS[name]
  known = {f: variants(f) for f in FAMILIES}
  raise BackboneError(f"unknown backbone variant {name!r}; known: {known}")


def describe(family: str, config) -> Backbone:
  """The contract's facts for a family and one of its configs."""
  module = family_module(family)
  return Backbone(
      family=family, variant=config.name, patch_size=int(config.patch_size),
      num_prefix_tokens=int(config.num_prefix_tokens), cls_index=int(config.cls_index),
      depth=int(config.depth), dim=int(config.dim),
      pixel_mean=tuple(float(v) for v in module.PIXEL_MEAN),
      pixel_std=tuple(float(v) for v in module.PIXEL_STD))


def variant_config(family: str, variant: str):
  module = family_module(family)
  if variant not in module.VARIANTS:
    raise BackboneError(f"backbone.variant={variant!r} is not a {family} variant; "
                        f"expected one of {sorted(module.VARIANTS)}")
  return module.VARIANTS[variant]


def abstract_model(family: str, variant: str, dtype=None):
  """The model with ShapeDtypeStruct weights: traces at any size, allocates nothing."""
  from flax import nnx  # deferred: JAX; backbones are described without it
  import jax.numpy as jnp  # deferred: JAX; backbones are described without it
  module = family_module(family)
  config = variant_config(family, variant)
  return nnx.eval_shape(lambda: module.init_random(config, dtype=dtype or jnp.float32))


def checkpoint_meta(path: str | os.PathLike) -> dict:
  """The `config.json` of a converted backbone directory (kind, variant, sizes)."""
  meta_file = Path(path) / "config.json"
  try:
    return json.loads(meta_file.read_text())
  except (OSError, ValueError) as e:
    raise BackboneError(f"{meta_file}: not a converted backbone checkpoint ({e})") from None


def describe_checkpoint(family: str, path: str | os.PathLike) -> Backbone:
  """The contract's facts of a converted checkpoint, from its config.json alone
  (for architectures outside VARIANTS: `backbone.variant=""`)."""
  meta = checkpoint_meta(path)
  _check_kind(family, meta, path)
  module = family_module(family)
  try:
    return Backbone(
        family=family, variant=str(meta.get("name") or meta.get("variant") or "custom"),
        patch_size=int(meta["patch_size"]), num_prefix_tokens=1 + int(meta["num_registers"]),
        cls_index=0, depth=int(meta["depth"]), dim=int(meta["dim"]),
        pixel_mean=tuple(float(v) for v in module.PIXEL_MEAN),
        pixel_std=tuple(float(v) for v in module.PIXEL_STD))
  except (KeyError, TypeError, ValueError) as e:
    raise BackboneError(f"{Path(path) / 'config.json'}: not a converted {family} "
                        f"checkpoint (field {e})") from None


def _check_kind(family: str, meta: dict, path) -> None:
  if meta.get("kind") != family_module(family).KIND:
    raise BackboneError(
        f"backbone.checkpoint={os.fspath(path)!r} holds a {meta.get('kind')!r} model, "
        f"but backbone.family={family!r}")


def check_checkpoint(family: str, variant: str, path: str | os.PathLike) -> None:
  """Refuses a converted checkpoint of another family or architecture than
  configured; `variant=""` accepts the checkpoint's own architecture."""
  meta = checkpoint_meta(path)
  _check_kind(family, meta, path)
  if not variant:
    return
  want = variant_config(family, variant)
  stored = meta.get("name") or meta.get("variant")
  shape_fields = ("dim", "depth", "num_heads", "ffn", "ffn_hidden", "patch_size")
  differs = [f for f in shape_fields if f in meta and meta[f] != getattr(want, f)]
  if differs:
    detail = ", ".join(f"{f} {meta[f]} (config: {getattr(want, f)})" for f in differs)
    raise BackboneError(
        f"backbone.checkpoint={os.fspath(path)!r} is a {stored or 'different'} model "
        f"({detail}), but backbone.variant={variant!r}; set backbone.variant to match "
        "(or to \"\" to take the checkpoint's architecture)")


def model_problems(backbone: Backbone, layers, image_size: int,
                   image_score: str) -> list[str]:
  """What does not fit together in a model description (for the config check)."""
  problems = []
  if image_score not in modes.IMAGE_SCORES:
    problems.append(f"eval.image_score={image_score!r}: expected one of {modes.IMAGE_SCORES}")
  if image_size <= 0 or image_size % backbone.patch_size:
    problems.append(f"image_size={image_size}: expected a positive multiple of the "
                    f"{backbone.family} {backbone.variant} patch size {backbone.patch_size}")
  bad = [l for l in layers if not 0 <= int(l) < backbone.depth]
  if not layers or bad:
    problems.append(f"backbone.layers={tuple(layers)}: expected block indices in "
                    f"[0, {backbone.depth}) for {backbone.variant} (depth {backbone.depth})")
  return problems
