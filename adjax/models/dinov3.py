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
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

KIND = "dinov3"
# Input normalisation (RGB on the [0, 1] scale): ImageNet's statistics.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DinoV3Config:
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
    if self.ffn not in ("mlp", "swiglu"):
      raise ValueError(f"DinoV3Config.ffn: {self.ffn!r}, expected 'mlp' or 'swiglu'")
    if self.dim % self.num_heads or (self.dim // self.num_heads) % 4:
      raise ValueError(
          f"DinoV3Config: dim {self.dim} / num_heads {self.num_heads} must give a "
          "head dim divisible by 4 (axial RoPE)")

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def num_prefix_tokens(self) -> int:
    """cls + registers, before the patch tokens."""
    return 1 + self.num_registers

  @property
  def cls_index(self) -> int:
    return 0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


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


def default_layers(depth: int) -> list[int]:
  """Four evenly spaced block indices ending at the last (24 -> [5, 11, 17, 23])."""
  if depth < 4:
    raise ValueError(f"default_layers: depth {depth} < 4")
  step = depth // 4
  return [depth - 1 - step * i for i in (3, 2, 1, 0)]


def rope_periods(config: DinoV3Config) -> np.ndarray:
  """`base ** (2i / (head_dim/2))` for i < head_dim/4, rounded once to float32."""
  quarter = config.head_dim // 4
  exponents = 2.0 * np.arange(quarter, dtype=np.float64) / (config.head_dim // 2)
  return (float(config.rope_base) ** exponents).astype(np.float32)


class RopePeriods(nnx.Variable):
  """Non-trainable RoPE periods (a buffer, never an nnx.Param)."""


class Attention(nnx.Module):
  """Fused-qkv multi-head attention; RoPE on the patch tokens; no key bias."""

  def __init__(self, config: DinoV3Config, *, dtype, rngs: nnx.Rngs):
    d = config.dim
    self.num_heads = config.num_heads
    self.dtype = dtype
    init = nnx.initializers.truncated_normal(0.02)
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False, dtype=dtype,
                          param_dtype=jnp.float32, kernel_init=init, rngs=rngs)
    if config.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((d,), jnp.float32))
      self.v_bias = nnx.Param(jnp.zeros((d,), jnp.float32))
    else:
      self.q_bias = self.v_bias = None
    self.proj = nnx.Linear(d, d, dtype=dtype, param_dtype=jnp.float32,
                           kernel_init=init, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    b, t, d = x.shape
    qkv = self.qkv(x)
    if self.q_bias is not None:
      zeros = jnp.zeros_like(self.q_bias[...])
      qkv = qkv + jnp.concatenate(
          [self.q_bias[...], zeros, self.v_bias[...]]).astype(qkv.dtype)
    qkv = qkv.reshape(b, t, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    return self.proj(attention(q, k, v).reshape(b, t, d))


# Per step of the CPU attention loop, at most this many bytes of float32
# logits (a few MB: stays in the L2/L3 cache between the two matmuls).
CPU_ATTENTION_LOGITS_BYTES = 8 << 20


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v on [B, T, heads, head_dim] arrays.

  `jax.nn.dot_product_attention`, so that XLA can pick a fused kernel on
  GPU/TPU. On CPU there is no fused kernel, and both its reference path and
  one batched einsum over all heads materialise the [B, heads, T, T] logits
  (68 MB per image for ViT-L/16 at 512) and stream them through memory
  several times (matmul, max, exp, sum, divide, matmul). There the (image,
  head) pairs are split into groups whose logits fit in
  `CPU_ATTENTION_LOGITS_BYTES` and a `lax.map` runs one group at a time, so
  the logits stay in cache from the first matmul to the second: about 3x
  faster attention at ViT-L/16 512 (one head per step). When all pairs fit
  (ViT-S/16 or ViT-L/16 at 224) it is one batched einsum with the heads in
  front and no loop, which is faster there. Logits and softmax are float32,
  and every path does the same arithmetic op for op.
  """
  if jax.default_backend() != "cpu":
    return jax.nn.dot_product_attention(q, k, v)
  b, t, n, h = q.shape
  per_pair = t * t * 4
  if not isinstance(b, int):
    # A symbolic batch (jax.export with a dynamic batch): the groups are of
    # heads, with the whole batch in each step, sized as for one image.
    group = _group(n, per_pair)
    q, k, v = (x.transpose(2, 0, 1, 3).reshape(n // group, group * b, t, h)
               for x in (q, k, v))
    out = _attention_groups(q, k, v, h, loop=group < n)
    return out.reshape(n, b, t, h).transpose(1, 2, 0, 3)
  pairs = b * n
  group = _group(pairs, per_pair)
  q, k, v = (x.transpose(0, 2, 1, 3).reshape(pairs // group, group, t, h) for x in (q, k, v))
  out = _attention_groups(q, k, v, h, loop=group < pairs)
  return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)


def _group(pairs: int, per_pair: int) -> int:
  """The largest divisor of `pairs` whose logits fit CPU_ATTENTION_LOGITS_BYTES."""
  return max([g for g in range(1, pairs + 1)
              if pairs % g == 0 and g * per_pair <= CPU_ATTENTION_LOGITS_BYTES] or [1])


def _attention_groups(q, k, v, h: int, loop: bool) -> jax.Array:
  """[steps, g, T, h] inputs: attention one step at a time (`loop`) or at once."""

  def heads(qkv):
    q, k, v = qkv
    logits = jnp.einsum("gth,gsh->gts", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * h ** -0.5, axis=-1).astype(v.dtype)
    return jnp.einsum("gts,gsh->gth", probs, v)

  return jax.lax.map(heads, (q, k, v)) if loop else heads((q[0], k[0], v[0]))[None]


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin in float32; cos/sin: [T, head_dim].

  The prefix tokens carry cos = 1, sin = 0, which leaves them exactly
  unchanged; this avoids splitting and re-concatenating the sequence.
  """
  xf = x.astype(jnp.float32)
  half = xf.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


class Mlp(nnx.Module):
  """fc2(gelu(fc1 x)), exact (erf) GELU."""

  def __init__(self, config: DinoV3Config, *, dtype, rngs: nnx.Rngs):
    init = nnx.initializers.truncated_normal(0.02)
    kw = dict(dtype=dtype, param_dtype=jnp.float32, kernel_init=init, rngs=rngs)
    self.fc1 = nnx.Linear(config.dim, config.ffn_hidden, **kw)
    self.fc2 = nnx.Linear(config.ffn_hidden, config.dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwiGlu(nnx.Module):
  """w3(silu(w1 x) * w2 x)."""

  def __init__(self, config: DinoV3Config, *, dtype, rngs: nnx.Rngs):
    init = nnx.initializers.truncated_normal(0.02)
    kw = dict(dtype=dtype, param_dtype=jnp.float32, kernel_init=init, rngs=rngs)
    self.w1 = nnx.Linear(config.dim, config.ffn_hidden, **kw)
    self.w2 = nnx.Linear(config.dim, config.ffn_hidden, **kw)
    self.w3 = nnx.Linear(config.ffn_hidden, config.dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.w3(jax.nn.silu(self.w1(x)) * self.w2(x))


class Block(nnx.Module):
  """x += ls1 * attn(norm1 x); x += ls2 * ffn(norm2 x); x stays float32."""

  def __init__(self, config: DinoV3Config, *, dtype, rngs: nnx.Rngs):
    d = config.dim
    # use_fast_variance=False: E[x^2] - E[x]^2 loses digits on the large
    # activations of late blocks, and parity is checked to 1e-4.
    norm = dict(epsilon=config.layer_norm_eps, use_fast_variance=False,
                dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    self.norm1 = nnx.LayerNorm(d, **norm)
    self.attn = Attention(config, dtype=dtype, rngs=rngs)
    self.ls1 = nnx.Param(jnp.full((d,), 1e-5, jnp.float32))
    self.norm2 = nnx.LayerNorm(d, **norm)
    ffn = Mlp if config.ffn == "mlp" else SwiGlu
    self.ffn = ffn(config, dtype=dtype, rngs=rngs)
    self.ls2 = nnx.Param(jnp.full((d,), 1e-5, jnp.float32))

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    x = x + self.ls1[...] * self.attn(self.norm1(x), cos, sin).astype(jnp.float32)
    return x + self.ls2[...] * self.ffn(self.norm2(x)).astype(jnp.float32)


class PatchEmbed(nnx.Module):
  """16x16 stride-16 conv as a matmul on flattened patches, row-major tokens.

  The kernel keeps the conv layout [p, p, 3, D] (converted checkpoints map
  onto it directly); flattening a patch as (row, col, channel) matches it.
  """

  def __init__(self, config: DinoV3Config, *, dtype, rngs: nnx.Rngs):
    p, d = config.patch_size, config.dim
    self.patch_size = p
    self.dtype = dtype
    self.kernel = nnx.Param(
        nnx.initializers.truncated_normal(0.02)(rngs.params(), (p, p, 3, d)))
    self.bias = nnx.Param(jnp.zeros((d,), jnp.float32))

  def __call__(self, images: jax.Array) -> jax.Array:
    b, h, w, c = images.shape
    p = self.patch_size
    gh, gw = h // p, w // p
    patches = images.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, gh * gw, p * p * c).astype(self.dtype)
    kernel = self.kernel[...].reshape(p * p * c, -1).astype(self.dtype)
    return jnp.dot(patches, kernel).astype(jnp.float32) + self.bias[...]


class DinoV3(nnx.Module):
  """DINOv3 ViT. Params (NNX paths) mirror the official names, blocks stacked."""

  def __init__(self, config: DinoV3Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    d = config.dim
    self.patch_embed = PatchEmbed(config, dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d,)))
    self.register_tokens = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (config.num_registers, d)))
    self.rope_periods = RopePeriods(jnp.asarray(rope_periods(config)))

    @nnx.split_rngs(splits=config.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(config, dtype=dtype, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.norm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, use_fast_variance=False,
                              dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

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
    b, h, w, c = images.shape
    p = self.config.patch_size
    if c != 3 or h % p or w % p or h == 0 or w == 0:
      raise ValueError(
          f"DinoV3: images must be [B, H, W, 3] with H and W positive multiples of "
          f"{p}; got shape {tuple(images.shape)}")
    tokens = self.patch_embed(images.astype(jnp.float32))
    prefix = jnp.concatenate([self.cls_token[...][None], self.register_tokens[...]])
    prefix = jnp.broadcast_to(prefix[None], (b,) + prefix.shape)
    return jnp.concatenate([prefix, tokens], axis=1)

  def get_intermediate_layers(self, images: jax.Array,
                              layers: Sequence[int]) -> list[jax.Array]:
    """Normed outputs of the given blocks, in the order given.

    Args:
      images: float32 [B, H, W, 3], ImageNet-normalised, H and W multiples of 16.
      layers: block indices (negative ones count from the end).

    Returns:
      one float32 [B, 1 + 4 + (H/16)(W/16), D] array per entry of `layers`.
    """
    from adjax.models import backbones
    p = self.config.patch_size
    cos, sin = self._rope_tables(images.shape[1] // p, images.shape[2] // p)
    return backbones.tapped_blocks("DinoV3", self.blocks, self.norm,
                                   lambda: self.embed(images), layers, self.config.depth,
                                   cos, sin)


def _resolve(config_or_name: DinoV3Config | str) -> DinoV3Config:
  if isinstance(config_or_name, DinoV3Config):
    return config_or_name
  if config_or_name not in VARIANTS:
    raise ValueError(f"unknown DINOv3 variant {config_or_name!r}; known: {sorted(VARIANTS)}")
  return VARIANTS[config_or_name]


def init_random(config_or_variant_name: DinoV3Config | str, *, seed: int = 0,
                dtype=jnp.float32) -> DinoV3:
  """Random weights of a real architecture, for demos and benchmarks.

  Layer scales are drawn log-uniformly in [1e-5, 1e-1] per channel (trained
  DINOv3 models have small ones), and norms, biases and the query/value
  biases are perturbed so that no parameter sits at a trivial value.
  """
  config = _resolve(config_or_variant_name)
  model = DinoV3(config, dtype=dtype, rngs=nnx.Rngs(params=seed))
  key = jax.random.key(seed + 1)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    key, sub = jax.random.split(key)
    name = path[-1]
    shape = var[...].shape
    if name in ("ls1", "ls2"):
      var.set_value(10.0 ** jax.random.uniform(sub, shape, minval=-5.0, maxval=-1.0))
    elif name == "scale":
      var.set_value(1.0 + 0.1 * jax.random.normal(sub, shape))
    elif name in ("bias", "q_bias", "v_bias"):
      var.set_value(0.02 * jax.random.normal(sub, shape))
  return model


def load(path: str | os.PathLike, *, dtype=jnp.float32, sharding=None) -> DinoV3:
  """The model with the weights of a converted checkpoint directory.

  `sharding`, if given, maps a '/'-joined parameter path to a
  jax.sharding.Sharding (see adjax.models.weights.assign).
  """
  from adjax.models import weights
  params, meta = weights.load(path, KIND)
  fields = {f.name for f in dataclasses.fields(DinoV3Config)}
  config = DinoV3Config(**{k: v for k, v in meta.items() if k in fields})
  # Built abstractly: no memory is spent on random weights that get replaced.
  model = nnx.eval_shape(lambda: DinoV3(config, dtype=dtype, rngs=nnx.Rngs(0)))
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
