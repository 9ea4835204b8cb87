"""The frozen CLIP text tower (SPEC section 3); its tokenizer is clip_tokenizer.py.

`ClipText.encode_text(ids)` maps int32 token ids [B, L] to the projected
features of the end-of-text (EOT) token, [B, E], before L2 normalisation:

  x = token_embedding(ids) + positional_embedding[:L]
  x = pre-LN residual blocks with causal self-attention and an MLP
  x = ln_final(x);  out = x[b, eot(b)] @ text_projection

EOT pooling: OpenAI CLIP takes `argmax(ids)` because its EOT (49407) is the
largest id of the vocabulary. That is what this module does whenever the
configured `eos_token_id` is the largest id (`vocab_size - 1`), which holds
for the real vocabulary and for the byte-level vocabularies of clip_tokenizer.
For a vocabulary whose EOT is not the largest id (tiny test configurations)
it takes the first position holding `eos_token_id` instead; for any sequence
produced by the tokenizer (it always ends with one EOT) the two agree.

Because attention is causal, the EOT feature depends only on the tokens up
to the EOT; callers may therefore drop trailing padding columns (`L` may be
anything from the last EOT position + 1 up to `context_length`).

The tokenizer (files, text cleaning, `tokenize`) is
`adjax.models.clip_tokenizer`; a converted checkpoint holds its files, and
`model_id_of` names both.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from adjax.models import clip_tokenizer, weights
# The tokenizer names that callers use beside the tower's (prompts, towers, bench).
from adjax.models.clip_tokenizer import (  # noqa: F401
    EOT_TOKEN, TEXT_CLEANING, load_tokenizer, tokenize, write_byte_level_tokenizer)

KIND = "clip_text"


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  """Sizes of a CLIP text tower.

  `embed_dim` is the projection (output) size; `eos_token_id` the EOT id
  used for pooling (see the module docstring).
  """
  vocab_size: int = 49408
  context_length: int = 77
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  embed_dim: int = 768
  activation: str = "quick_gelu"
  eos_token_id: int = 49407
  name: str = "vit-l-14"

  def __post_init__(self):
    if self.activation not in ("quick_gelu", "gelu"):
      raise ValueError(
          f"activation must be 'quick_gelu' or 'gelu', got {self.activation!r}")
    if self.width % self.heads:
      raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
    if not 0 <= self.eos_token_id < self.vocab_size:
      raise ValueError(
          f"eos_token_id {self.eos_token_id} is outside the vocabulary "
          f"(vocab_size {self.vocab_size})")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "ClipTextConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields})


# Text towers of the OpenAI CLIP releases. The paper uses ViT-L/14@336px,
# whose text tower is the same as ViT-L/14's.
VARIANTS = {
    "vit-l-14": ClipTextConfig(name="vit-l-14"),
    "vit-l-14-336": ClipTextConfig(name="vit-l-14-336"),
    "vit-b-16": ClipTextConfig(width=512, layers=12, heads=8, mlp_dim=2048,
                               embed_dim=512, name="vit-b-16"),
    "vit-b-32": ClipTextConfig(width=512, layers=12, heads=8, mlp_dim=2048,
                               embed_dim=512, name="vit-b-32"),
    # Not a released tower: a small random one for the built-in demo and
    # tests, where encoding the prompt set with a real-size tower on a CPU
    # would dominate the run.
    "tiny": ClipTextConfig(width=128, layers=2, heads=2, mlp_dim=512, embed_dim=256,
                           name="tiny"),
}


def _activation(name: str):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  return functools.partial(jax.nn.gelu, approximate=False)


class CausalSelfAttention(nnx.Module):
  """Multi-head self-attention where a token sees itself and earlier tokens."""

  def __init__(self, width: int, heads: int, *, dtype, rngs: nnx.Rngs):
    self.heads = heads
    in_init = nnx.initializers.normal(width ** -0.5)
    linear = functools.partial(nnx.Linear, width, width, dtype=dtype,
                               bias_init=nnx.initializers.zeros, rngs=rngs)
    self.q = linear(kernel_init=in_init)
    self.k = linear(kernel_init=in_init)
    self.v = linear(kernel_init=in_init)
    self.out = linear(kernel_init=in_init)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, w = x.shape
    split = lambda y: y.reshape(b, t, self.heads, w // self.heads)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (w // self.heads) ** -0.5
    causal = jnp.tril(jnp.ones((t, t), bool))
    # Softmax in float32 whatever the compute dtype.
    logits = jnp.where(causal, logits.astype(jnp.float32), -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, w)
    return self.out(y)


class ResidualBlock(nnx.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, config: ClipTextConfig, *, dtype, rngs: nnx.Rngs):
    w = config.width
    norm = functools.partial(nnx.LayerNorm, w, epsilon=1e-5, dtype=dtype,
                             use_fast_variance=False, rngs=rngs)
    self.ln_1 = norm()
    self.attn = CausalSelfAttention(w, config.heads, dtype=dtype, rngs=rngs)
    self.ln_2 = norm()
    self.fc = nnx.Linear(w, config.mlp_dim, dtype=dtype, rngs=rngs,
                         kernel_init=nnx.initializers.normal((2 * w) ** -0.5))
    self.proj = nnx.Linear(
        config.mlp_dim, w, dtype=dtype, rngs=rngs,
        kernel_init=nnx.initializers.normal(w ** -0.5 * (2 * config.layers) ** -0.5))
    self.activation = config.activation

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x))
    return x + self.proj(_activation(self.activation)(self.fc(self.ln_2(x))))


class ClipText(nnx.Module):
  """CLIP text transformer with EOT pooling and the text projection."""

  def __init__(self, config: ClipTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    # Provenance for cache keys (set by `load` / `init_random`).
    self.model_id = None
    w = config.width
    self.token_embedding = nnx.Embed(
        config.vocab_size, w, dtype=dtype, rngs=rngs,
        embedding_init=nnx.initializers.normal(0.02))
    self.positional_embedding = nnx.Param(
        nnx.initializers.normal(0.01)(rngs.params(), (config.context_length, w)))
    self.blocks = nnx.List(
        [ResidualBlock(config, dtype=dtype, rngs=rngs) for _ in range(config.layers)])
    self.ln_final = nnx.LayerNorm(w, epsilon=1e-5, dtype=dtype,
                                  use_fast_variance=False, rngs=rngs)
    self.text_projection = nnx.Param(
        nnx.initializers.normal(w ** -0.5)(rngs.params(), (w, config.embed_dim)))

  def eot_positions(self, ids: jax.Array) -> jax.Array:
    if self.config.eos_token_id == self.config.vocab_size - 1:
      return jnp.argmax(ids, axis=-1)
    return jnp.argmax(ids == self.config.eos_token_id, axis=-1)

  def encode_text(self, ids: jax.Array) -> jax.Array:
    """int32 [B, L] token ids -> [B, E] projected EOT features (not normalised)."""
    if ids.ndim != 2 or ids.shape[1] > self.config.context_length:
      raise ValueError(
          f"ids must be [batch, length] with length <= context_length "
          f"{self.config.context_length}; got shape {ids.shape}")
    pos = self.positional_embedding.get_value()[: ids.shape[1]]
    x = self.token_embedding(ids) + pos.astype(self.dtype)
    for block in self.blocks:
      x = block(x)
    x = self.ln_final(x)
    pooled = jnp.take_along_axis(x, self.eot_positions(ids)[:, None, None], axis=1)[:, 0]
    return pooled @ self.text_projection.get_value().astype(self.dtype)


def _config_of(config_or_name) -> ClipTextConfig:
  if isinstance(config_or_name, ClipTextConfig):
    return config_or_name
  if config_or_name not in VARIANTS:
    raise ValueError(
        f"unknown CLIP text variant {config_or_name!r}; known: {sorted(VARIANTS)}")
  return VARIANTS[config_or_name]


def init_random(config_or_name, *, seed: int = 0, dtype=jnp.float32) -> ClipText:
  """A randomly initialised tower (OpenAI-like init scales), for tests and benchmarks."""
  config = _config_of(config_or_name)
  model = ClipText(config, dtype=dtype, rngs=nnx.Rngs(params=jax.random.key(seed)))
  model.model_id = "random-init:" + json.dumps(
      dict(config.to_dict(), seed=seed), sort_keys=True)
  return model


def model_id_of(path: str | os.PathLike) -> str:
  """Identity of a converted checkpoint: its source hash and its tokenizer files."""
  config = weights.read_config(path, KIND)
  tok = config.get("tokenizer_sha256") or {
      f: _sha256_bytes((Path(path) / f).read_bytes()) for f in clip_tokenizer.TOKENIZER_FILES}
  return "sha256:" + _sha256_bytes(json.dumps(
      {"source_sha256": config.get("source_sha256"), "tokenizer": tok},
      sort_keys=True).encode())


def _sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def load(path: str | os.PathLike, *, activation: str | None = None,
         dtype=jnp.float32) -> ClipText:
  """The tower of a converted checkpoint directory.

  Args:
    path: directory written by `python -m converters.clip_text`.
    activation: override the stored activation ('gelu' selects the release's
      exact-GELU quirk, SPEC section 9; 'quick_gelu' is what CLIP was trained
      with).
    dtype: compute dtype; parameters stay float32.
  """
  params, stored = weights.load(path, KIND)
  config = ClipTextConfig.from_dict(stored)
  if activation is not None:
    config = dataclasses.replace(config, activation=activation)
  model = nnx.eval_shape(lambda: ClipText(config, dtype=dtype, rngs=nnx.Rngs(0)))
  weights.assign(model, params)
  model.model_id = model_id_of(path)
  return model

