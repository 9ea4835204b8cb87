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

Layout and precision as in dinov3: blocks stacked on a leading `depth` axis
and run by one `lax.scan` that stops after the deepest requested block;
`dtype=jnp.bfloat16` runs the matmuls and attention in bfloat16 while the
parameters, residual stream, norms, softmax and the position-embedding
resize stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Generic pieces shared with DINOv3 (they read only dim, ffn_hidden, patch_size).
from adjax.models.dinov3 import Mlp, PatchEmbed, SwiGlu, attention, default_layers

KIND = "dinov2"
PIXEL_MEAN = (0.485, 0.456, 0.406)  # ImageNet, as the release normalises
PIXEL_STD = (0.229, 0.224, 0.225)

__all__ = ["KIND", "PIXEL_MEAN", "PIXEL_STD", "DinoV2Config", "VARIANTS", "DinoV2",
           "default_layers", "bicubic_matrix", "init_random", "load"]


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
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
    if self.ffn not in ("mlp", "swiglu"):
      raise ValueError(f"DinoV2Config.ffn: {self.ffn!r}, expected 'mlp' or 'swiglu'")
    if self.dim % self.num_heads:
      raise ValueError(f"DinoV2Config: dim {self.dim} is not divisible by "
                       f"num_heads {self.num_heads}")
    if self.num_registers < 0 or self.native_grid < 1 or self.interpolate_offset < 0:
      raise ValueError(
          f"DinoV2Config: num_registers {self.num_registers} (>= 0), native_grid "
          f"{self.native_grid} (>= 1), interpolate_offset {self.interpolate_offset} "
          "(>= 0) out of range")

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def num_prefix_tokens(self) -> int:
    """cls + registers, the tokens before the patches."""
    return 1 + self.num_registers

  @property
  def cls_index(self) -> int:
    return 0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


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

class Attention(nnx.Module):
  """Fused-qkv multi-head attention with bias on q, k and v."""

  def __init__(self, config: DinoV2Config, *, dtype, rngs: nnx.Rngs):
    d = config.dim
    self.num_heads = config.num_heads
    kw = dict(dtype=dtype, param_dtype=jnp.float32,
              kernel_init=nnx.initializers.truncated_normal(0.02), rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, **kw)
    self.proj = nnx.Linear(d, d, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return self.proj(out.reshape(b, t, d))


class Block(nnx.Module):
  """x += ls1 * attn(norm1 x); x += ls2 * ffn(norm2 x); x stays float32."""

  def __init__(self, config: DinoV2Config, *, dtype, rngs: nnx.Rngs):
    d = config.dim
    # Exact variance (not E[x^2] - E[x]^2): parity is checked to 1e-4.
    norm = dict(epsilon=config.layer_norm_eps, use_fast_variance=False,
                dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    self.norm1 = nnx.LayerNorm(d, **norm)
    self.attn = Attention(config, dtype=dtype, rngs=rngs)
    self.ls1 = nnx.Param(jnp.full((d,), 1e-5, jnp.float32))
    self.norm2 = nnx.LayerNorm(d, **norm)
    ffn = Mlp if config.ffn == "mlp" else SwiGlu
    self.ffn = ffn(config, dtype=dtype, rngs=rngs)
    self.ls2 = nnx.Param(jnp.full((d,), 1e-5, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.ls1[...] * self.attn(self.norm1(x)).astype(jnp.float32)
    return x + self.ls2[...] * self.ffn(self.norm2(x)).astype(jnp.float32)


class DinoV2(nnx.Module):
  """DINOv2 ViT. Params (NNX paths) follow Meta's names, blocks stacked."""

  def __init__(self, config: DinoV2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    d, n = config.dim, config.native_grid
    self.patch_embed = PatchEmbed(config, dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d,)))
    # Row 0 is the cls token's; rows 1.. the native grid, row-major.
    self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1 + n * n, d)))
    self.register_tokens = (
        nnx.Param(0.02 * jax.random.normal(rngs.params(), (config.num_registers, d)))
        if config.num_registers else None)

    @nnx.split_rngs(splits=config.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(config, dtype=dtype, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.norm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, use_fast_variance=False,
                              dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

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
    b, h, w, c = images.shape
    p = self.config.patch_size
    if c != 3 or h % p or w % p or h == 0 or w == 0:
      raise ValueError(
          f"DinoV2: images must be [B, H, W, 3] with H and W positive multiples of "
          f"{p}; got shape {tuple(images.shape)}")
    patches = self.patch_embed(images.astype(jnp.float32))
    pos = self.position_embeddings(h // p, w // p)
    cls = self.cls_token[...] + pos[0]
    prefix = [cls[None]]
    if self.register_tokens is not None:  # after the position embeddings: none for them
      prefix.append(self.register_tokens[...])
    prefix = jnp.concatenate(prefix)
    prefix = jnp.broadcast_to(prefix[None], (b,) + prefix.shape)
    return jnp.concatenate([prefix, patches + pos[1:]], axis=1)

  def get_intermediate_layers(self, images: jax.Array,
                              layers: Sequence[int]) -> list[jax.Array]:
    """Normed outputs of the given blocks, in the order given.

    Args:
      images: float32 [B, H, W, 3], ImageNet-normalised, H and W multiples of 14.
      layers: block indices (negative ones count from the end).

    Returns:
      one float32 [B, 1 + R + (H/14)(W/14), D] array per entry of `layers`.
    """
    from adjax.models import backbones
    return backbones.tapped_blocks("DinoV2", self.blocks, self.norm,
                                   lambda: self.embed(images), layers, self.config.depth)


# ------------------------------------------------------ construction

def _resolve(config_or_name: DinoV2Config | str) -> DinoV2Config:
  if isinstance(config_or_name, DinoV2Config):
    return config_or_name
  if config_or_name not in VARIANTS:
    raise ValueError(f"unknown DINOv2 variant {config_or_name!r}; known: {sorted(VARIANTS)}")
  return VARIANTS[config_or_name]


def init_random(config_or_variant_name: DinoV2Config | str, *, seed: int = 0,
                dtype=jnp.float32) -> DinoV2:
  """Random weights of a real architecture, for demos and benchmarks.

  Layer scales are drawn log-uniformly in [1e-5, 1e-1] per channel, and
  norms and biases are perturbed so that no parameter sits at a trivial value.
  """
  config = _resolve(config_or_variant_name)
  model = DinoV2(config, dtype=dtype, rngs=nnx.Rngs(params=seed))
  key = jax.random.key(seed + 1)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    key, sub = jax.random.split(key)
    name = path[-1]
    shape = var[...].shape
    if name in ("ls1", "ls2"):
      var.set_value(10.0 ** jax.random.uniform(sub, shape, minval=-5.0, maxval=-1.0))
    elif name == "scale":
      var.set_value(1.0 + 0.1 * jax.random.normal(sub, shape))
    elif name == "bias":
      var.set_value(0.02 * jax.random.normal(sub, shape))
  return model


def load(path: str | os.PathLike, *, dtype=jnp.float32, sharding=None) -> DinoV2:
  """The model with the weights of a converted checkpoint directory.

  `sharding`, if given, maps a '/'-joined parameter path to a
  jax.sharding.Sharding (see adjax.models.weights.assign).
  """
  from adjax.models import weights
  params, meta = weights.load(path, KIND)
  fields = {f.name for f in dataclasses.fields(DinoV2Config)}
  config = DinoV2Config(**{k: v for k, v in meta.items() if k in fields})
  # Built abstractly: no memory is spent on random weights that get replaced.
  model = nnx.eval_shape(lambda: DinoV2(config, dtype=dtype, rngs=nnx.Rngs(0)))
  weights.assign(model, params, sharding=sharding)
  return model
