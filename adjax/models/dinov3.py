"""DINOv3 ViT image backbone (patch 16, 4 register tokens, axial RoPE) in Flax NNX.

The frozen feature extractor of AD-DINOv3 (SPEC section 2). Every released
variant is in `VARIANTS`; weights come from a checkpoint converted by
`python -m converters.dinov3` and are read with `load()`. The model only runs
forward: `get_intermediate_layers(images, layers)` returns, for each requested
block, its output tokens passed through the final LayerNorm.

Layout and precision:
- The blocks' parameters are stacked on a leading `depth` axis and the forward
  is one `lax.scan`, so a 24- or 40-block model compiles one block body, and
  blocks after the deepest requested one are not computed.
- `dtype=jnp.bfloat16` runs the matmuls (and attention) in bfloat16 while the
  parameters, the residual stream, the LayerNorms, RoPE and the softmax stay
  float32; outputs are always float32.
- The key bias is structurally zero: only query and value biases exist.

The layers (patch embedding, attention, MLP / SwiGLU, blocks, the scanned
runner) are `adjax.models.vit`'s; this module owns the config, `VARIANTS`,
the axial RoPE and the token layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from adjax.models import vit, weights

KIND = "dinov3"
# Input normalisation (RGB on the [0, 1] scale): ImageNet's statistics.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DinoV3Config(vit.ConfigMixin):
  """Architecture of a DINOv3 ViT; the released ones are in `VARIANTS`."""
  dim: int
  depth: int
  num_heads: int
  ffn: str  # "mlp" (GELU, exact) or "swiglu"
  ffn_hidden: int
  patch_size: int = 16
  num_registers: int = 4
  rope_base: float = 100.0
  layer_norm_eps: float = 1e-5
  qkv_bias: bool = True
  name: str = "custom"

  def __post_init__(self):
    self._check_ffn()
    if self.dim % self.num_heads or (self.dim // self.num_heads) % 4:
      raise ValueError(
          f"DinoV3Config: dim {self.dim} / num_heads {self.num_heads} must give a "
          "head dim divisible by 4 (axial RoPE)")


VARIANTS: dict[str, DinoV3Config] = {
    c.name: c for c in (
        DinoV3Config(384, 12, 6, "mlp", 1536, name="vits16"),
        DinoV3Config(384, 12, 6, "swiglu", 1536, name="vits16plus"),
        DinoV3Config(768, 12, 12, "mlp", 3072, name="vitb16"),
        DinoV3Config(1024, 24, 16, "mlp", 4096, name="vitl16"),
        DinoV3Config(1024, 24, 16, "swiglu", 4096, name="vitl16plus"),
        DinoV3Config(1280, 32, 20, "swiglu", 5120, name="vith16plus"),
        DinoV3Config(4096, 40, 32, "swiglu", 8192, qkv_bias=False, name="vit7b16"),
    )
}


default_layers = vit.default_layers  # (the family contract: adjax.models.backbones)


def rope_periods(config: DinoV3Config) -> np.ndarray:
  """`base ** (2i / (head_dim/2))` for i < head_dim/4, rounded once to float32."""
  quarter = config.head_dim // 4
  exponents = 2.0 * np.arange(quarter, dtype=np.float64) / (config.head_dim // 2)
  return (float(config.rope_base) ** exponents).astype(np.float32)


class RopePeriods(nnx.Variable):
  """Non-trainable RoPE periods (a buffer, never an nnx.Param)."""


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin in float32; cos/sin: [T, head_dim].

  The prefix tokens carry cos = 1, sin = 0, which leaves them exactly
  unchanged; this avoids splitting and re-concatenating the sequence.
  """
  xf = x.astype(jnp.float32)
  half = xf.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


class DinoV3(nnx.Module):
  """DINOv3 ViT. Params (NNX paths) mirror the official names, blocks stacked."""

  def __init__(self, config: DinoV3Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    d = config.dim
    self.patch_embed = vit.PatchEmbed(config, dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d,)))
    self.register_tokens = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (config.num_registers, d)))
    self.rope_periods = RopePeriods(jnp.asarray(rope_periods(config)))
    self.blocks = vit.stacked_blocks(config, attn_bias="qv" if config.qkv_bias else "none",
                                     dtype=dtype, rngs=rngs)
    self.norm = vit.layer_norm(config, rngs)

  def _rope_tables(self, gh: int, gw: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin [prefix + gh*gw, head_dim]; prefix rows are (1, 0)."""
    ch = (jnp.arange(gh, dtype=jnp.float32) + 0.5) / gh
    cw = (jnp.arange(gw, dtype=jnp.float32) + 0.5) / gw
    coords = jnp.stack(jnp.meshgrid(ch, cw, indexing="ij"), axis=-1).reshape(-1, 2)
    coords = 2.0 * coords - 1.0
    angles = 2 * math.pi * coords[:, :, None] / self.rope_periods[...]
    angles = jnp.tile(angles.reshape(gh * gw, -1), (1, 2))
    prefix = 1 + self.config.num_registers
    cos = jnp.concatenate([jnp.ones((prefix, angles.shape[1])), jnp.cos(angles)])
    sin = jnp.concatenate([jnp.zeros((prefix, angles.shape[1])), jnp.sin(angles)])
    return cos, sin

  def embed(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> float32 tokens [B, 1 + R + HW/p^2, D]."""
    vit.check_images("DinoV3", images, self.config.patch_size)
    tokens = self.patch_embed(images.astype(jnp.float32))
    prefix = jnp.concatenate([self.cls_token[...][None], self.register_tokens[...]])
    return vit.with_prefix(prefix, tokens)

  def get_intermediate_layers(self, images: jax.Array,
                              layers: Sequence[int]) -> list[jax.Array]:
    """Normed outputs of the given blocks, in the order given.

    Args:
      images: float32 [B, H, W, 3], ImageNet-normalised, H and W multiples of 16.
      layers: block indices (negative ones count from the end).

    Returns:
      one float32 [B, 1 + 4 + (H/16)(W/16), D] array per entry of `layers`.
    """
    p = self.config.patch_size
    cos, sin = self._rope_tables(images.shape[1] // p, images.shape[2] // p)
    rope = functools.partial(_rope, cos=cos, sin=sin)
    return vit.tapped_blocks("DinoV3", self.blocks, self.norm,
                             lambda: self.embed(images), layers, self.config.depth, rope)


def init_random(config_or_variant_name: DinoV3Config | str, *, seed: int = 0,
                dtype=jnp.float32) -> DinoV3:
  """Random weights of a real architecture, for demos and benchmarks
  (see vit.init_random: small layer scales, no trivial norms or biases)."""
  config = vit.resolve(config_or_variant_name, DinoV3Config, VARIANTS, "DINOv3")
  return vit.init_random(DinoV3, config, seed=seed, dtype=dtype)


def load(path: str | os.PathLike, *, dtype=jnp.float32, sharding=None) -> DinoV3:
  """The model with the weights of a converted checkpoint directory.

  `sharding`, if given, maps a '/'-joined parameter path to a
  jax.sharding.Sharding (see adjax.models.weights.assign).
  """
  model, params = vit.abstract_from_checkpoint(path, KIND, DinoV3Config, DinoV3, dtype)
  config = model.config
  flat = dict(params)
  periods = flat.pop("rope_periods", None)
  if periods is None:
    periods = rope_periods(config)
  if np.shape(periods) != (config.head_dim // 4,):
    raise weights.WeightsError(
        f"{path}: rope_periods has shape {np.shape(periods)}, expected "
        f"({config.head_dim // 4},)")
  weights.assign(model, flat, sharding=sharding)
  model.rope_periods.set_value(jnp.asarray(periods, jnp.float32))
  return model
