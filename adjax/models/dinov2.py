"""DINOv2 ViT image backbone (patch 14, learned position embeddings) in Flax NNX.

A second frozen feature extractor beside `adjax.models.dinov3`, with the
same contract: `VARIANTS`, `init_random()`, `load()` from a checkpoint
converted by `python -m converters.dinov2`, and
`get_intermediate_layers(images, layers)`, which returns each requested
block's output tokens passed through the final LayerNorm, as
`[cls, registers..., patches row-major]`.

What differs from DINOv3:
- Absolute learned position embeddings for the cls token and a square
  native grid (37 x 37 at 518 px), resized to the input's patch grid by
  bicubic interpolation; the register tokens get none and are inserted
  after the cls token once the position embeddings are added.
- q, k and v all have a bias; LayerNorm eps 1e-6; no RoPE.

Position-embedding resizing follows PyTorch's
`interpolate(mode="bicubic", align_corners=False)` exactly, as two
interpolation matrices (`bicubic_matrix`). The references disagree on two
details, both recorded in the config:
- `interpolate_offset`: Meta's hub models without registers ask for a scale
  factor `(grid + 0.1) / native` instead of an output size; the output size
  is the same but the sampling positions shift slightly. transformers'
  `Dinov2Model` asks for the size (offset 0). The hub's `_reg` models use 0.
- `interpolate_antialias`: `Dinov2WithRegistersModel` and Meta's `_reg`
  models resize with `antialias=True` (a PIL-style bicubic, a = -0.5,
  widened when shrinking, renormalised at the borders); the others without.
When the input grid is the native grid, the table is used as is (as both
references do), whatever these settings.

Layers (adjax.models.vit), layout and precision as in dinov3: blocks
stacked on a leading `depth` axis and run by one `lax.scan` that stops
after the deepest requested block;
`dtype=jnp.bfloat16` runs the matmuls and attention in bfloat16 while the
parameters, residual stream, norms, softmax and the position-embedding
resize stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from adjax.models import vit, weights

KIND = "dinov2"
PIXEL_MEAN = (0.485, 0.456, 0.406)  # ImageNet, as the release normalises
PIXEL_STD = (0.229, 0.224, 0.225)

__all__ = ["KIND", "PIXEL_MEAN", "PIXEL_STD", "DinoV2Config", "VARIANTS", "DinoV2",
           "default_layers", "bicubic_matrix", "init_random", "load"]


@dataclasses.dataclass(frozen=True)
class DinoV2Config(vit.ConfigMixin):
  """Architecture of a DINOv2 ViT; the released ones are in `VARIANTS`."""
  dim: int
  depth: int
  num_heads: int
  ffn: str  # "mlp" (GELU, exact) or "swiglu"
  ffn_hidden: int
  patch_size: int = 14
  num_registers: int = 0
  layer_norm_eps: float = 1e-6
  native_grid: int = 37  # side of the position-embedding grid (518 px / 14)
  interpolate_offset: float = 0.1  # Meta hub; 0 = resize to the size (HF, _reg)
  interpolate_antialias: bool = False
  name: str = "custom"

  def __post_init__(self):
    self._check_ffn()
    if self.dim % self.num_heads:
      raise ValueError(f"DinoV2Config: dim {self.dim} is not divisible by "
                       f"num_heads {self.num_heads}")
    if self.num_registers < 0 or self.native_grid < 1 or self.interpolate_offset < 0:
      raise ValueError(
          f"DinoV2Config: num_registers {self.num_registers} (>= 0), native_grid "
          f"{self.native_grid} (>= 1), interpolate_offset {self.interpolate_offset} "
          "(>= 0) out of range")


def _variants() -> dict[str, DinoV2Config]:
  archs = {"vits14": (384, 12, 6, "mlp", 1536), "vitb14": (768, 12, 12, "mlp", 3072),
           "vitl14": (1024, 24, 16, "mlp", 4096),
           # Meta's "swiglufused": hidden int(4 * 1536 * 2/3) rounded up to 8.
           "vitg14": (1536, 40, 24, "swiglu", 4096)}
  out = {}
  for name, arch in archs.items():
    out[name] = DinoV2Config(*arch, name=name)
    # The hub's register models resize by size, antialiased.
    out[name + "_reg"] = DinoV2Config(*arch, num_registers=4, interpolate_offset=0.0,
                                      interpolate_antialias=True, name=name + "_reg")
  return out


VARIANTS: dict[str, DinoV2Config] = _variants()
default_layers = vit.default_layers  # (the family contract: adjax.models.backbones)


# ------------------------------------------------------ bicubic resizing

def _fma(a, b, c) -> np.ndarray:
  """float32 a * b + c rounded once, like the fused multiply-adds of torch's kernels."""
  return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a, float32 Horner steps as FMAs.

  PyTorch's CPU kernels evaluate these polynomials with fused multiply-adds;
  plain float32 steps differ from them by up to ~2e-6 near |x| = 2.
  """
  x = np.abs(np.asarray(x, np.float32))
  a = np.float32(a)
  near = _fma(_fma(a + 2, x, -(a + 3)) * x, x, np.float32(1))
  far = _fma(_fma(_fma(a, x, -5 * a), x, 8 * a), x, -4 * a)
  return np.where(x <= 1, near, np.where(x < 2, far, np.float32(0))).astype(np.float32)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int, scale_factor: float | None = None,
                   antialias: bool = False) -> np.ndarray:
  """[n_out, n_in] weights of torch's 1-D bicubic resize, align_corners=False.

  `scale_factor` is the one given to `torch.nn.functional.interpolate`
  (out / in, used for the sampling positions); None means a size was given
  (in / out is used). Index arithmetic is float32 as in PyTorch's CPU kernels.
  Without antialias: source x = s (i + 0.5) - 0.5, 4 taps, a = -0.75,
  clamped indices. With antialias: PIL's filter, a = -0.5, support widened
  by s when shrinking, taps outside the input dropped and the rest
  renormalised; a pass whose size does not change is skipped (identity).
  """
  f = np.float32
  scale = f(1.0 / scale_factor) if scale_factor else f(n_in) / f(n_out)
  out = np.zeros((n_out, n_in), np.float32)
  i = np.arange(n_out, dtype=f)
  if not antialias:
    src = _fma(scale, i + f(0.5), f(-0.5))
    lo = np.floor(src)
    t = np.clip(src - lo, 0, 1).astype(f)
    taps = (_cubic(t + 1, -0.75), _cubic(t, -0.75), _cubic(1 - t, -0.75),
            _cubic((1 - t) + 1, -0.75))
    for k, w in enumerate(taps):
      np.add.at(out, (np.arange(n_out), np.clip(lo.astype(int) - 1 + k, 0, n_in - 1)), w)
    return out
  if n_in == n_out:
    return np.eye(n_in, dtype=f)
  support = f(2.0) * scale if scale >= 1 else f(2.0)
  inv = f(1.0) / scale if scale >= 1 else f(1.0)
  center = scale * (i + f(0.5))
  for o in range(n_out):
    lo = max(int(center[o] - support + f(0.5)), 0)
    hi = min(int(center[o] + support + f(0.5)), n_in)
    w = _cubic((np.arange(lo, hi, dtype=f) - center[o] + f(0.5)) * inv, -0.5)
    total = w.sum(dtype=f)
    out[o, lo:hi] = w / total if total != 0 else w
  return out


# ------------------------------------------------------------- modules

class DinoV2(nnx.Module):
  """DINOv2 ViT. Params (NNX paths) follow Meta's names, blocks stacked."""

  def __init__(self, config: DinoV2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    d, n = config.dim, config.native_grid
    self.patch_embed = vit.PatchEmbed(config, dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d,)))
    # Row 0 is the cls token's; rows 1.. the native grid, row-major.
    self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1 + n * n, d)))
    self.register_tokens = (
        nnx.Param(0.02 * jax.random.normal(rngs.params(), (config.num_registers, d)))
        if config.num_registers else None)
    self.blocks = vit.stacked_blocks(config, attn_bias="qkv", dtype=dtype, rngs=rngs)
    self.norm = vit.layer_norm(config, rngs)

  def position_embeddings(self, gh: int, gw: int) -> jax.Array:
    """[1 + gh*gw, D] float32: the cls row, then the table resized to gh x gw."""
    c = self.config
    n = c.native_grid
    table = self.pos_embed[...]
    if (gh, gw) == (n, n):
      return table
    if c.interpolate_offset:
      sh, sw = (gh + c.interpolate_offset) / n, (gw + c.interpolate_offset) / n
    else:
      sh = sw = None
    rh = jnp.asarray(bicubic_matrix(n, gh, sh, c.interpolate_antialias))
    rw = jnp.asarray(bicubic_matrix(n, gw, sw, c.interpolate_antialias))
    grid = table[1:].reshape(n, n, -1)
    grid = jnp.einsum("Hh,hwd,Ww->HWd", rh, grid, rw, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([table[:1], grid.reshape(gh * gw, -1)])

  def embed(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> float32 tokens [B, 1 + R + HW/p^2, D]."""
    _, h, w, _ = images.shape
    p = self.config.patch_size
    vit.check_images("DinoV2", images, p)
    patches = self.patch_embed(images.astype(jnp.float32))
    pos = self.position_embeddings(h // p, w // p)
    cls = self.cls_token[...] + pos[0]
    prefix = [cls[None]]
    if self.register_tokens is not None:  # after the position embeddings: none for them
      prefix.append(self.register_tokens[...])
    return vit.with_prefix(jnp.concatenate(prefix), patches + pos[1:])

  def get_intermediate_layers(self, images: jax.Array,
                              layers: Sequence[int]) -> list[jax.Array]:
    """Normed outputs of the given blocks, in the order given.

    Args:
      images: float32 [B, H, W, 3], ImageNet-normalised, H and W multiples of 14.
      layers: block indices (negative ones count from the end).

    Returns:
      one float32 [B, 1 + R + (H/14)(W/14), D] array per entry of `layers`.
    """
    return vit.tapped_blocks("DinoV2", self.blocks, self.norm,
                             lambda: self.embed(images), layers, self.config.depth)


# ------------------------------------------------------ construction

def init_random(config_or_variant_name: DinoV2Config | str, *, seed: int = 0,
                dtype=jnp.float32) -> DinoV2:
  """Random weights of a real architecture, for demos and benchmarks
  (see vit.init_random: small layer scales, no trivial norms or biases)."""
  config = vit.resolve(config_or_variant_name, DinoV2Config, VARIANTS, "DINOv2")
  return vit.init_random(DinoV2, config, seed=seed, dtype=dtype)


def load(path: str | os.PathLike, *, dtype=jnp.float32, sharding=None) -> DinoV2:
  """The model with the weights of a converted checkpoint directory.

  `sharding`, if given, maps a '/'-joined parameter path to a
  jax.sharding.Sharding (see adjax.models.weights.assign).
  """
  model, params = vit.abstract_from_checkpoint(path, KIND, DinoV2Config, DinoV2, dtype)
  weights.assign(model, params, sharding=sharding)
  return model
