"""The frozen CLIP text tower (SPEC section 3) and its tokenizer files.

`ClipText.encode_text(ids)` maps int32 token ids [B, L] to the projected
features of the end-of-text (EOT) token, [B, E], before L2 normalisation:

  x = token_embedding(ids) + positional_embedding[:L]
  x = pre-LN residual blocks with causal self-attention and an MLP
  x = ln_final(x);  out = x[b, eot(b)] @ text_projection

EOT pooling: OpenAI CLIP takes `argmax(ids)` because its EOT (49407) is the
largest id of the vocabulary. That is what this module does whenever the
configured `eos_token_id` is the largest id (`vocab_size - 1`), which holds
for the real vocabulary and for the byte-level vocabularies written here.
For a vocabulary whose EOT is not the largest id (tiny test configurations)
it takes the first position holding `eos_token_id` instead; for any sequence
produced by the tokenizer (it always ends with one EOT) the two agree.

Because attention is causal, the EOT feature depends only on the tokens up
to the EOT; callers may therefore drop trailing padding columns (`L` may be
anything from the last EOT position + 1 up to `context_length`).

Tokenizers are transformers' `CLIPTokenizer`, built from `vocab.json` and
`merges.txt`. Text is cleaned first exactly as OpenAI's `simple_tokenizer`
does (`clean_text`: ftfy, HTML entities, whitespace, lower case); the
tokenizer's own normaliser (NFC, whitespace, Rust lower-casing) is removed
because it differs from OpenAI's on some text (a final sigma, combining
marks from HTML entities), so `tokenize` gives OpenAI's ids. Those files are written here in the OpenAI construction: the
256 byte symbols, the same with `</w>`, one token per merge (the merged
pair joined), then `<|startoftext|>` and `<|endoftext|>` as the two largest
ids. `write_tokenizer_from_openai_bpe` applies it to OpenAI's
`bpe_simple_vocab_16e6.txt.gz`; `write_byte_level_tokenizer` applies it to
merges learned from a small corpus (or none), so that a randomly initialised
tower can be used with no download.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gzip
import hashlib
import html
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adjax import atomic
from adjax.models import weights

KIND = "clip_text"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
# OpenAI keeps the first 49152 - 256 - 2 merges of bpe_simple_vocab_16e6,
# which with 512 byte symbols and 2 specials gives the 49408-token vocabulary.
OPENAI_NUM_MERGES = 49152 - 256 - 2


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
      f: _sha256_bytes((Path(path) / f).read_bytes()) for f in ("vocab.json", "merges.txt")}
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



# --------------------------------------------------------------------------
# Tokenizer files.


def bytes_to_unicode() -> dict[int, str]:
  """OpenAI/GPT-2 byte -> printable character table, in vocabulary order.

  Printable Latin-1 bytes map to themselves; the others to code points from
  256 on. The dict's order is the order of the first 256 vocabulary entries.
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def vocabulary(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
  """The OpenAI vocabulary construction: bytes, bytes + </w>, merges, specials."""
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
  tokens += [SOT_TOKEN, EOT_TOKEN]
  # A later duplicate wins, as in OpenAI's `dict(zip(vocab, range(len(vocab))))`.
  return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer_files(dst_dir: str | os.PathLike,
                          merges: Sequence[tuple[str, str]]) -> int:
  """Writes vocab.json + merges.txt for `merges`; returns the vocabulary size."""
  vocab = vocabulary(merges)
  write_vocab_merges(dst_dir, vocab, merges)
  return max(vocab.values()) + 1


def write_vocab_merges(dst_dir: str | os.PathLike, vocab: dict[str, int],
                       merges: Sequence[tuple[str, str]]) -> None:
  """vocab.json and merges.txt in the Hugging Face file format."""
  dst_dir = Path(dst_dir)
  atomic.write_text(dst_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
  atomic.write_text(dst_dir / "merges.txt",
                    "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def read_openai_bpe(path: str | os.PathLike,
                    num_merges: int = OPENAI_NUM_MERGES) -> list[tuple[str, str]]:
  """Merges of an OpenAI `bpe_simple_vocab_16e6.txt.gz` (first line is a header)."""
  path = Path(path)
  try:
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a gzip-compressed BPE merges file: {e}") from e
  merges = []
  for i, line in enumerate(lines[1:num_merges + 1], start=2):
    if not line:
      continue
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{path}: line {i} is not a merge 'a b': {line!r}")
    merges.append((parts[0], parts[1]))
  if not merges:
    raise ValueError(f"{path}: holds no merges")
  return merges


def write_tokenizer_from_openai_bpe(bpe_gz: str | os.PathLike,
                                   dst_dir: str | os.PathLike) -> int:
  """vocab.json + merges.txt from OpenAI's BPE file; returns the vocabulary size."""
  return write_tokenizer_files(dst_dir, read_openai_bpe(bpe_gz))


def learn_merges(corpus: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
  """A deterministic byte-level BPE learned on `corpus` (ties: smallest pair).

  Words are split like CLIP's pre-tokenizer does for plain lower-case text
  (runs of letters, single digits, runs of other non-space characters).
  Merges whose joined token already exists are skipped so every merge adds
  exactly one new token.
  """
  byte_map = bytes_to_unicode()
  words = collections.Counter()
  for text in corpus:
    for w in re.findall(r"[^\W\d_]+|\d|(?:[^\s\w]|_)+", text.lower()):
      symbols = [byte_map[b] for b in w.encode("utf-8")]
      symbols[-1] += "</w>"
      words[tuple(symbols)] += 1
  known = set(vocabulary([]))
  merges: list[tuple[str, str]] = []
  while len(merges) < num_merges:
    pairs = collections.Counter()
    for w, n in words.items():
      for a, b in zip(w, w[1:]):
        if a + b not in known:
          pairs[(a, b)] += n
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    merges.append(best)
    known.add(best[0] + best[1])
    merged = collections.Counter()
    for w, n in words.items():
      out, i = [], 0
      while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == best:
          out.append(w[i] + w[i + 1])
          i += 2
        else:
          out.append(w[i])
          i += 1
      merged[tuple(out)] += n
    words = merged
  return merges


def write_byte_level_tokenizer(dst_dir: str | os.PathLike, corpus: Iterable[str] = (),
                               num_merges: int = 0) -> int:
  """A CLIP BPE tokenizer needing no download; returns its vocabulary size.

  The vocabulary holds the 512 byte symbols, up to `num_merges` merges
  learned on `corpus`, and the two special tokens as the largest ids. A
  tower whose `eos_token_id` is its own largest id (every VARIANTS entry)
  pools correctly with it even when its embedding table is larger: the EOT
  is still the largest id in every tokenised sentence.
  """
  return write_tokenizer_files(dst_dir, learn_merges(corpus, num_merges))


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
  lines = Path(path).read_text(encoding="utf-8").split("\n")
  if lines and lines[0].startswith("#version"):
    lines = lines[1:]
  merges = []
  for i, line in enumerate(lines, start=1):
    if line.strip():
      parts = line.split()
      if len(parts) != 2:
        raise ValueError(f"{path}: line {i} is not a merge 'a b': {line!r}")
      merges.append((parts[0], parts[1]))
  return merges


# Names what `clean_text` does; part of the text-embedding cache key.
TEXT_CLEANING = "openai-simple-tokenizer:ftfy,html.unescape*2,whitespace,lower"


def clean_text(text: str) -> str:
  """OpenAI `simple_tokenizer`'s cleaning, applied before BPE.

  `ftfy.fix_text` (mojibake, ligatures such as 'ﬁ', full-width forms, NFC),
  HTML entities unescaped twice ('nut &amp;amp; bolt' -> 'nut & bolt'),
  runs of whitespace made one space, ends stripped, lower-cased (Python's
  `str.lower`, as OpenAI's).
  """
  import ftfy  # pylint: disable=g-import-not-at-top
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return re.sub(r"\s+", " ", text).strip().lower()


def load_tokenizer(path: str | os.PathLike):
  """transformers `CLIPTokenizer` from a directory's vocab.json + merges.txt.

  Its normaliser is removed: `tokenize` cleans text as OpenAI does instead.
  """
  from transformers import CLIPTokenizer
  path = Path(path)
  missing = [f for f in ("vocab.json", "merges.txt") if not (path / f).is_file()]
  if missing:
    raise FileNotFoundError(
        f"{path}: missing tokenizer file(s) {missing}; a converted CLIP text "
        "checkpoint holds vocab.json and merges.txt")
  vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
  for special in (SOT_TOKEN, EOT_TOKEN):
    if special not in vocab:
      raise ValueError(f"{path / 'vocab.json'}: has no {special} token")
  # transformers 5 ignores `vocab_file=`; the contents are passed directly.
  tokenizer = CLIPTokenizer(vocab=vocab, merges=read_merges(path / "merges.txt"))
  tokenizer.backend_tokenizer.normalizer = None
  return tokenizer


def tokenize(tokenizer, texts: Sequence[str], context_length: int) -> np.ndarray:
  """int32 [N, context_length]: SOT, tokens, EOT, then zeros (as OpenAI's).

  Each text is cleaned with `clean_text` first, as OpenAI's tokenizer does.
  The padding value never matters (attention is causal and pooling reads
  the EOT). A text that does not fit is an error, not a silent truncation.
  """
  ids = tokenizer([clean_text(t) for t in texts], add_special_tokens=True)["input_ids"]
  out = np.zeros((len(ids), context_length), np.int32)
  for i, row in enumerate(ids):
    if len(row) > context_length:
      raise ValueError(
          f"text {texts[i]!r} is {len(row)} tokens long, more than the context "
          f"length {context_length}")
    out[i, : len(row)] = row
  return out
