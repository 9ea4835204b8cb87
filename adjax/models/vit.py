"""The ViT layers both backbone families (dinov3.py, dinov2.py) are built from.

Patch embedding, multi-head attention (with the CPU grouped-head path), the
MLP and SwiGLU feed-forwards, the layer-scale block, the stacked blocks and
the scanned runner that taps requested blocks, plus what building and
loading a family's model share. A family module owns what differs: its
config fields and `VARIANTS`, its position encoding (RoPE, learned table),
its token layout and its `load`.

Layers read their sizes from a family config (`dim`, `num_heads`, `ffn`,
`ffn_hidden`, `patch_size`, `layer_norm_eps`, `depth`). Parameters are
float32; `dtype` is the compute dtype of the matmuls and attention, while
the residual stream, LayerNorms and softmax stay float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from adjax.models import weights


class ConfigMixin:
  """What every family config derives from its fields (a frozen dataclass)."""

  def _check_ffn(self) -> None:
    if self.ffn not in ("mlp", "swiglu"):
      raise ValueError(
          f"{type(self).__name__}.ffn: {self.ffn!r}, expected 'mlp' or 'swiglu'")

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


def default_layers(depth: int) -> list[int]:
  """Four evenly spaced block indices ending at the last (24 -> [5, 11, 17, 23])."""
  if depth < 4:
    raise ValueError(f"default_layers: depth {depth} < 4")
  step = depth // 4
  return [depth - 1 - step * i for i in (3, 2, 1, 0)]


def _linear_kwargs(dtype, rngs: nnx.Rngs) -> dict:
  return dict(dtype=dtype, param_dtype=jnp.float32,
              kernel_init=nnx.initializers.truncated_normal(0.02), rngs=rngs)


def layer_norm(config, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """float32 LayerNorm of width `dim`.

  use_fast_variance=False: E[x^2] - E[x]^2 loses digits on the large
  activations of late blocks, and parity is checked to 1e-4.
  """
  return nnx.LayerNorm(config.dim, epsilon=config.layer_norm_eps, use_fast_variance=False,
                       dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


# ------------------------------------------------------------- attention

class Attention(nnx.Module):
  """Fused-qkv multi-head attention.

  `bias`: "qkv" (one bias on the fused projection), "qv" (separate query and
  value biases; the key bias is structurally zero) or "none". `rope`, if
  given to the call, maps q and k ([B, T, heads, head_dim]) to their
  position-encoded values.
  """

  def __init__(self, config, *, bias: str, dtype, rngs: nnx.Rngs):
    if bias not in ("qkv", "qv", "none"):
      raise ValueError(f"Attention bias: {bias!r}, expected 'qkv', 'qv' or 'none'")
    d = config.dim
    self.num_heads = config.num_heads
    kw = _linear_kwargs(dtype, rngs)
    self.qkv = nnx.Linear(d, 3 * d, use_bias=bias == "qkv", **kw)
    if bias == "qv":
      self.q_bias = nnx.Param(jnp.zeros((d,), jnp.float32))
      self.v_bias = nnx.Param(jnp.zeros((d,), jnp.float32))
    else:
      self.q_bias = self.v_bias = None
    self.proj = nnx.Linear(d, d, **kw)

  def __call__(self, x: jax.Array, rope: Callable | None = None) -> jax.Array:
    b, t, d = x.shape
    qkv = self.qkv(x)
    if self.q_bias is not None:
      zeros = jnp.zeros_like(self.q_bias[...])
      qkv = qkv + jnp.concatenate(
          [self.q_bias[...], zeros, self.v_bias[...]]).astype(qkv.dtype)
    qkv = qkv.reshape(b, t, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if rope is not None:
      q, k = rope(q), rope(k)
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

  The path is chosen per platform when the function is lowered
  (`lax.platform_dependent`), not by the backend of the process that traces
  it: an export for `cpu,cuda` made on a CPU carries the CPU path for CPU
  and `dot_product_attention` for CUDA, each lowering only its own.
  """
  if _FIXED_PLATFORM:      # a converter that knows no platform_index (ONNX)
    return (_cpu_attention if _FIXED_PLATFORM[-1] == "cpu"
            else jax.nn.dot_product_attention)(q, k, v)
  return jax.lax.platform_dependent(q, k, v, cpu=_cpu_attention,
                                    default=jax.nn.dot_product_attention)


_FIXED_PLATFORM: list[str] = []


@contextlib.contextmanager
def attention_for(platform: str):
  """Within it, `attention` traces the path of `platform` alone ("cpu" or
  another), with no per-platform switch: for converters of a traced function
  to formats that carry no platforms (jax2onnx knows no `platform_index`)."""
  _FIXED_PLATFORM.append(platform)
  try:
    yield
  finally:
    _FIXED_PLATFORM.pop()


def _cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The CPU path of `attention`: cache-sized groups of (image, head) pairs."""
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


# ---------------------------------------------------------- feed-forward

class Mlp(nnx.Module):
  """fc2(gelu(fc1 x)), exact (erf) GELU."""

  def __init__(self, config, *, dtype, rngs: nnx.Rngs):
    kw = _linear_kwargs(dtype, rngs)
    self.fc1 = nnx.Linear(config.dim, config.ffn_hidden, **kw)
    self.fc2 = nnx.Linear(config.ffn_hidden, config.dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwiGlu(nnx.Module):
  """w3(silu(w1 x) * w2 x)."""

  def __init__(self, config, *, dtype, rngs: nnx.Rngs):
    kw = _linear_kwargs(dtype, rngs)
    self.w1 = nnx.Linear(config.dim, config.ffn_hidden, **kw)
    self.w2 = nnx.Linear(config.dim, config.ffn_hidden, **kw)
    self.w3 = nnx.Linear(config.ffn_hidden, config.dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.w3(jax.nn.silu(self.w1(x)) * self.w2(x))


# ---------------------------------------------------------------- blocks

class Block(nnx.Module):
  """x += ls1 * attn(norm1 x); x += ls2 * ffn(norm2 x); x stays float32.

  `attn_bias` is the Attention's `bias`; the call's `rope` goes to it.
  """

  def __init__(self, config, *, attn_bias: str, dtype, rngs: nnx.Rngs):
    d = config.dim
    self.norm1 = layer_norm(config, rngs)
    self.attn = Attention(config, bias=attn_bias, dtype=dtype, rngs=rngs)
    self.ls1 = nnx.Param(jnp.full((d,), 1e-5, jnp.float32))
    self.norm2 = layer_norm(config, rngs)
    ffn = Mlp if config.ffn == "mlp" else SwiGlu
    self.ffn = ffn(config, dtype=dtype, rngs=rngs)
    self.ls2 = nnx.Param(jnp.full((d,), 1e-5, jnp.float32))

  def __call__(self, x: jax.Array, rope: Callable | None = None) -> jax.Array:
    x = x + self.ls1[...] * self.attn(self.norm1(x), rope).astype(jnp.float32)
    return x + self.ls2[...] * self.ffn(self.norm2(x)).astype(jnp.float32)


def stacked_blocks(config, *, attn_bias: str, dtype, rngs: nnx.Rngs) -> Block:
  """`config.depth` blocks as one module, parameters stacked on a leading axis."""

  @nnx.split_rngs(splits=config.depth)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make_blocks(rngs):
    return Block(config, attn_bias=attn_bias, dtype=dtype, rngs=rngs)

  return make_blocks(rngs)


def tapped_blocks(name: str, blocks, norm, embed_fn, layers, depth: int, *block_args):
  """The normed outputs of the requested blocks of a stacked-block ViT, in order.

  `blocks` is a module whose parameters are stacked on a leading `depth`
  axis; the forward is one `lax.scan` that stops after the deepest requested
  block. `embed_fn()` gives the input tokens (called after the layers are
  checked); `block_args` go to every block. Negative indices count from the end.
  """
  layers = [int(i) for i in layers]
  if not layers or any(not -depth <= i < depth for i in layers):
    raise ValueError(f"{name}: layers {layers} must be non-empty block indices "
                     f"in [-{depth}, {depth})")
  layers = [i % depth for i in layers]
  wanted = sorted(set(layers))
  x = embed_fn()
  # Requested outputs land in `buf[slot]`; other blocks write to a spare
  # last slot, so each scan step is one in-place dynamic update.
  n = wanted[-1] + 1
  slot_of = np.full((n,), len(wanted), np.int32)
  slot_of[wanted] = np.arange(len(wanted))
  graphdef, state = nnx.split(blocks)
  state = jax.tree.map(lambda a: a[:n], state)

  def step(carry, xs):
    x, buf = carry
    block_state, slot = xs
    x = nnx.merge(graphdef, block_state)(x, *block_args)
    return (x, jax.lax.dynamic_update_index_in_dim(buf, x, slot, 0)), None

  buf = jnp.zeros((len(wanted) + 1,) + x.shape, jnp.float32)
  (_, buf), _ = jax.lax.scan(step, (x, buf), (state, jnp.asarray(slot_of)))
  normed = norm(buf[:-1])
  return [normed[wanted.index(i)] for i in layers]


# ----------------------------------------------------------------- tokens

class PatchEmbed(nnx.Module):
  """p x p stride-p conv as a matmul on flattened patches, row-major tokens.

  The kernel keeps the conv layout [p, p, 3, D] (converted checkpoints map
  onto it directly); flattening a patch as (row, col, channel) matches it.
  """

  def __init__(self, config, *, dtype, rngs: nnx.Rngs):
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


def check_images(name: str, images: jax.Array, patch_size: int) -> None:
  """Refuses anything but [B, H, W, 3] with H and W positive multiples of the patch."""
  _, h, w, c = images.shape
  p = patch_size
  if c != 3 or h % p or w % p or h == 0 or w == 0:
    raise ValueError(
        f"{name}: images must be [B, H, W, 3] with H and W positive multiples of "
        f"{p}; got shape {tuple(images.shape)}")


def with_prefix(prefix: jax.Array, tokens: jax.Array) -> jax.Array:
  """[P, D] prefix tokens (cls, registers) before every image's [B, N, D] tokens."""
  prefix = jnp.broadcast_to(prefix[None], (tokens.shape[0],) + prefix.shape)
  return jnp.concatenate([prefix, tokens], axis=1)


# ---------------------------------------------------------- construction

def resolve(config_or_name, config_cls: type, variants: dict, family: str):
  """A config, or the `variants` entry of a name (ValueError naming the known ones)."""
  if isinstance(config_or_name, config_cls):
    return config_or_name
  if config_or_name not in variants:
    raise ValueError(
        f"unknown {family} variant {config_or_name!r}; known: {sorted(variants)}")
  return variants[config_or_name]


def init_random(model_cls: type, config, *, seed: int, dtype) -> nnx.Module:
  """A family's model with realistic random weights, deterministic in `seed`.

  Layer scales are drawn log-uniformly in [1e-5, 1e-1] per channel (trained
  models have small ones), and norm scales and every bias (the query and
  value biases included) are perturbed so that no parameter sits at a
  trivial value.
  """
  model = model_cls(config, dtype=dtype, rngs=nnx.Rngs(params=seed))
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


def abstract_from_checkpoint(path, kind: str, config_cls: type, model_cls: type,
                             dtype) -> tuple[nnx.Module, dict]:
  """(model, params) of a converted checkpoint: the model built abstractly from
  the config in its config.json (no memory spent on random weights that get
  replaced), the params not yet assigned."""
  params, meta = weights.load(path, kind)
  fields = {f.name for f in dataclasses.fields(config_cls)}
  config = config_cls(**{k: v for k, v in meta.items() if k in fields})
  model = nnx.eval_shape(lambda: model_cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
  return model, params
