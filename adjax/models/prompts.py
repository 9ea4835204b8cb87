"""Prompt-ensemble text embeddings (SPEC section 4), computed once per object.

For an object name, 7 normal and 5 abnormal state phrases are put into 35
templates (245 + 175 sentences). Each sentence is encoded by the frozen CLIP
text tower and L2-normalised; each group is averaged and the average is
L2-normalised again. The result per object is [2, E]: row 0 normal, row 1
abnormal.

The tower is frozen and the computation deterministic, so `text_embeddings`
encodes an object's sentences once and keeps the result in memory and, when
given a `cache_dir`, on disk (one atomic .npy per key). The key hashes the
model's identity (checkpoint sha256 + tokenizer, or a description of a random
init), its activation and compute dtype, the prompt set, the object name, and
how text is cleaned before tokenisation (`clip_text.TEXT_CLEANING`).
Training and evaluation call this once per run and index the
result by category; nothing is re-encoded per image or per step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adjax.common import atomic
from adjax.models import clip_text

NORMAL_STATES = (
    "{}", "flawless {}", "perfect {}", "unblemished {}",
    "{} without flaw", "{} without defect", "{} without damage",
)
ABNORMAL_STATES = (
    "damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage",
)
TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.",
    "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a photo of one {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "a low resolution photo of a {}.", "a photo of a large {}.",
    "a blurry photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a photo of the small {}.",
    "a photo of the large {}.", "a black and white photo of a {}.",
    "a dark photo of a {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.",
    "this is one {} in the scene.",
)

# Changes to the lists or to how they are combined change this and with it
# every cache key.
PROMPT_SET_ID = hashlib.sha256(json.dumps(
    {"version": 1, "normal": NORMAL_STATES, "abnormal": ABNORMAL_STATES,
     "templates": TEMPLATES, "combine": "template.format(state.format(obj))"}
).encode()).hexdigest()[:16]

# Sentences encoded per jitted call (larger sets are split into equal chunks).
MAX_CHUNK = 1024

_MEMORY: dict[str, np.ndarray] = {}


def prompt_sentences(obj: str) -> tuple[list[str], list[str]]:
  """(245 normal sentences, 175 abnormal sentences) for object name `obj`."""
  def group(states):
    return [t.format(s.format(obj)) for s in states for t in TEMPLATES]
  return group(NORMAL_STATES), group(ABNORMAL_STATES)


def longest_tokens(tokenizer, sentences: Sequence[str]) -> int:
  """The most tokens (with SOT and EOT) any of `sentences` takes, cleaned and
  tokenised as `text_embeddings` tokenises them."""
  ids = tokenizer([clip_text.clip_tokenizer.clean_text(t) for t in sentences],
                  add_special_tokens=True)["input_ids"]
  return max((len(row) for row in ids), default=0)


def model_id_of(path_or_model) -> str:
  """The identity of a text tower for cache keys.

  A converted checkpoint directory (or a model returned by `load`) is
  identified by the sha256 of its source and tokenizer files; a model from
  `init_random` by its config and seed.
  """
  if isinstance(path_or_model, (str, os.PathLike)):
    return clip_text.model_id_of(path_or_model)
  model_id = getattr(path_or_model, "model_id", None)
  if not model_id:
    raise ValueError(
        "this model carries no identity (not from clip_text.load or init_random); "
        "pass model_id= explicitly")
  return model_id


def cache_key(model_id: str, activation: str, dtype, display_name: str) -> str:
  return hashlib.sha256(json.dumps(
      {"model": model_id, "activation": activation, "dtype": jnp.dtype(dtype).name,
       "prompts": PROMPT_SET_ID, "object": display_name,
       "text_cleaning": clip_text.TEXT_CLEANING}, sort_keys=True).encode()
  ).hexdigest()


def _encode_sentences(model: clip_text.ClipText, ids: np.ndarray) -> np.ndarray:
  """float32 [N, E] features of token ids [N, L], in equal jitted chunks."""
  n = ids.shape[0]
  chunks = math.ceil(n / MAX_CHUNK)
  size = math.ceil(n / chunks)
  padded = np.zeros((chunks * size, ids.shape[1]), ids.dtype)
  padded[:n] = ids
  padded[n:] = ids[0]  # filler rows: any valid sentence
  out = [np.asarray(_jitted_encode(model, jnp.asarray(padded[i * size:(i + 1) * size])))
         for i in range(chunks)]
  return np.concatenate(out, axis=0)[:n].astype(np.float32)


@nnx.jit
def _jitted_encode(model: clip_text.ClipText, ids: jax.Array) -> jax.Array:
  return model.encode_text(ids).astype(jnp.float32)


def _l2(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _trim(ids: np.ndarray, eot: int) -> np.ndarray:
  """Drops the padding columns after the last EOT (kept to a multiple of 8).

  Attention is causal, so an EOT feature does not depend on later columns;
  prompts are ~10-20 tokens long, so this skips most of a 77-token context.
  """
  last = int(np.max(np.argmax(ids == eot, axis=1))) + 1
  return ids[:, : min(ids.shape[1], -(-last // 8) * 8)]


def text_embeddings(model: clip_text.ClipText, tokenizer, object_names: Sequence[str], *,
                    model_id: str, cache_dir: str | os.PathLike | None = None,
                    display_names: Mapping[str, str] | None = None) -> np.ndarray:
  """float32 [num_objects, 2, E]: normalised ensemble embeddings, row 0 normal.

  Args:
    model: the text tower.
    tokenizer: its `CLIPTokenizer` (`clip_text.load_tokenizer`).
    object_names: category folder names, in the order of the result.
    model_id: the tower's identity (`model_id_of(path_or_model)`).
    cache_dir: where per-object results are kept across runs (optional).
    display_names: folder name -> name used in the sentences (e.g.
      {"metal_nut": "metal nut"}); default: the folder name (release behaviour).
  """
  display_names = dict(display_names or {})
  cfg = model.config
  if not object_names:
    return np.zeros((0, 2, cfg.embed_dim), np.float32)
  names = [display_names.get(o, o) for o in object_names]
  keys = [cache_key(model_id, cfg.activation, model.dtype, n) for n in names]
  cache_dir = Path(cache_dir) if cache_dir is not None else None
  for key in keys:
    if key not in _MEMORY and cache_dir is not None and (cache_dir / f"{key}.npy").is_file():
      arr = np.load(cache_dir / f"{key}.npy")
      if arr.shape == (2, cfg.embed_dim):
        _MEMORY[key] = arr
  todo = sorted({(k, n) for k, n in zip(keys, names) if k not in _MEMORY})
  if todo:
    sentences = []
    for _, name in todo:
      normal, abnormal = prompt_sentences(name)
      sentences += normal + abnormal
    ids = clip_text.tokenize(tokenizer, sentences, cfg.context_length)
    ids = _trim(ids, tokenizer.convert_tokens_to_ids(clip_text.EOT_TOKEN))
    feats = _l2(_encode_sentences(model, ids).astype(np.float64))
    per = len(NORMAL_STATES) * len(TEMPLATES)
    step = per + len(ABNORMAL_STATES) * len(TEMPLATES)
    for i, (key, _) in enumerate(todo):
      block = feats[i * step:(i + 1) * step]
      result = _l2(np.stack([block[:per].mean(0), block[per:].mean(0)])).astype(np.float32)
      _MEMORY[key] = result
      if cache_dir is not None:
        with atomic.atomic_file(cache_dir / f"{key}.npy", "wb") as f:
          np.save(f, result)
  return np.stack([_MEMORY[k] for k in keys])


def clear_memory_cache() -> None:
  _MEMORY.clear()
