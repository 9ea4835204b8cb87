"""The CLIP BPE tokenizer: its files, text cleaning and tokenisation.

Tokenizers are transformers' `CLIPTokenizer`, built from `vocab.json` and
`merges.txt` (`load_tokenizer`). Text is cleaned first exactly as OpenAI's
`simple_tokenizer` does (`clean_text`: ftfy, HTML entities, whitespace,
lower case); the tokenizer's own normaliser (NFC, whitespace, Rust
lower-casing) is removed because it differs from OpenAI's on some text (a
final sigma, combining marks from HTML entities), so `tokenize` gives
OpenAI's ids.

Those files are written here in the OpenAI construction: the 256 byte
symbols, the same with `</w>`, one token per merge (the merged pair joined),
then `<|startoftext|>` and `<|endoftext|>` as the two largest ids.
`write_tokenizer_from_openai_bpe` applies it to OpenAI's
`bpe_simple_vocab_16e6.txt.gz`; `write_byte_level_tokenizer` applies it to
merges learned from a small corpus (or none), so that a randomly initialised
tower (adjax.models.clip_text) can be used with no download. `read_merges`
reads both merges-file forms.
"""

from __future__ import annotations

import collections
import gzip
import html
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from adjax.common import atomic

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
# OpenAI keeps the first 49152 - 256 - 2 merges of bpe_simple_vocab_16e6,
# which with 512 byte symbols and 2 specials gives the 49408-token vocabulary.
OPENAI_NUM_MERGES = 49152 - 256 - 2
# The files of a tokenizer directory (and of a converted CLIP text checkpoint).
TOKENIZER_FILES = ("vocab.json", "merges.txt")


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


def write_tokenizer_from_openai_bpe(bpe_gz: str | os.PathLike,
                                   dst_dir: str | os.PathLike) -> int:
  """vocab.json + merges.txt from OpenAI's BPE file; returns the vocabulary size."""
  return write_tokenizer_files(dst_dir,
                              read_merges(bpe_gz, OPENAI_NUM_MERGES, openai_bpe=True))


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


def read_merges(path: str | os.PathLike, num_merges: int | None = None, *,
                openai_bpe: bool | None = None) -> list[tuple[str, str]]:
  """The merges ('a b' lines) of a BPE merges file, in rank order.

  Two forms: a Hugging Face `merges.txt` (an optional `#version` first line),
  and OpenAI's `bpe_simple_vocab_16e6.txt.gz` (`openai_bpe`; by default a
  name ending in .gz): gzip-compressed, its first line always a header, and
  holding no merges is an error. `num_merges` keeps only the lines after the
  header up to that count. Line numbers in errors are the file's.
  """
  path = Path(path)
  gz = path.name.endswith(".gz") if openai_bpe is None else openai_bpe
  if gz:
    try:
      with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: not a gzip-compressed BPE merges file: {e}") from e
  else:
    text = path.read_text(encoding="utf-8")
  lines = text.split("\n")
  start = 1 if gz or (lines and lines[0].startswith("#version")) else 0
  end = None if num_merges is None else start + num_merges
  merges = []
  for i, line in enumerate(lines[start:end], start=start + 1):
    if line.strip():
      parts = line.split()
      if len(parts) != 2:
        raise ValueError(f"{path}: line {i} is not a merge 'a b': {line!r}")
      merges.append((parts[0], parts[1]))
  if gz and not merges:
    raise ValueError(f"{path}: holds no merges")
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
  import ftfy  # deferred: optional package
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return re.sub(r"\s+", " ", text).strip().lower()


def load_tokenizer(path: str | os.PathLike):
  """transformers `CLIPTokenizer` from a directory's vocab.json + merges.txt.

  Its normaliser is removed: `tokenize` cleans text as OpenAI does instead.
  """
  from transformers import CLIPTokenizer  # deferred: optional package
  path = Path(path)
  missing = [f for f in TOKENIZER_FILES if not (path / f).is_file()]
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
