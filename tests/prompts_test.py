"""Prompt ensemble: the prompt set, the ensemble math, the cache and its keys."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adjax.models import prompts
from adjax.models import clip_text

OBJECTS = ("bottle", "metal_nut", "01")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tok_dir = tmp_path_factory.mktemp("tok")
  corpus = [s for o in OBJECTS for g in prompts.prompt_sentences(o) for s in g]
  vocab_size = clip_text.write_byte_level_tokenizer(tok_dir, corpus, num_merges=60)
  cfg = clip_text.ClipTextConfig(vocab_size=vocab_size, context_length=77, width=32, layers=2,
                                 heads=2, mlp_dim=64, embed_dim=16,
                                 eos_token_id=vocab_size - 1, name="tiny")
  return clip_text.load_tokenizer(tok_dir), cfg, clip_text.init_random(cfg, seed=0)


@pytest.fixture(autouse=True)
def fresh_memory():
  prompts.clear_memory_cache()
  yield
  prompts.clear_memory_cache()


@pytest.fixture
def count_encodes(monkeypatch):
  calls = []
  real = prompts._encode_sentences

  def counting(model, ids):
    calls.append(ids.shape[0])
    return real(model, ids)
  monkeypatch.setattr(prompts, "_encode_sentences", counting)
  return calls


def test_prompt_set_sizes_and_composition():
  assert len(prompts.NORMAL_STATES) == 7 and len(prompts.ABNORMAL_STATES) == 5
  assert len(prompts.TEMPLATES) == 35 == len(set(prompts.TEMPLATES))
  normal, abnormal = prompts.prompt_sentences("metal_nut")
  assert len(normal) == 245 == len(set(normal)) and len(abnormal) == 175 == len(set(abnormal))
  assert normal[0] == "a bad photo of a metal_nut."
  assert normal[35] == "a bad photo of a flawless metal_nut."
  assert normal[-1] == "this is one metal_nut without damage in the scene."
  assert abnormal[0] == "a bad photo of a damaged metal_nut."
  assert abnormal[-1] == "this is one metal_nut with damage in the scene."


def _independent(model, tokenizer, name):
  """Sentences tokenised one by one, full context, one pass, numpy normalise/average."""
  out = []
  for group in prompts.prompt_sentences(name):
    rows = np.zeros((len(group), model.config.context_length), np.int32)
    for i, s in enumerate(group):
      ids = tokenizer(s)["input_ids"]
      rows[i, : len(ids)] = ids
    feats = np.asarray(model.encode_text(jnp.asarray(rows)), np.float64)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    mean = feats.mean(axis=0)
    out.append(mean / np.linalg.norm(mean))
  return np.stack(out)


def test_ensemble_matches_independent_computation(setup, monkeypatch, count_encodes):
  tokenizer, _, model = setup
  monkeypatch.setattr(prompts, "MAX_CHUNK", 300)  # several chunks, the last one padded
  emb = prompts.text_embeddings(model, tokenizer, ["bottle", "01"],
                                model_id=prompts.model_id_of(model))
  assert emb.shape == (2, 2, 16) and emb.dtype == np.float32
  assert count_encodes == [840]  # one batched pass for both objects
  for i, name in enumerate(["bottle", "01"]):
    np.testing.assert_allclose(emb[i], _independent(model, tokenizer, name), atol=2e-6)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)


def test_cache_hits_in_memory_and_on_disk(setup, tmp_path, count_encodes):
  tokenizer, _, model = setup
  mid = prompts.model_id_of(model)
  first = prompts.text_embeddings(model, tokenizer, OBJECTS, model_id=mid, cache_dir=tmp_path)
  assert len(count_encodes) == 1 and len(list(tmp_path.glob("*.npy"))) == 3
  again = prompts.text_embeddings(model, tokenizer, OBJECTS[::-1], model_id=mid, cache_dir=tmp_path)
  assert len(count_encodes) == 1  # memory hit, reordered
  np.testing.assert_array_equal(again, first[::-1])
  prompts.clear_memory_cache()
  disk = prompts.text_embeddings(model, tokenizer, OBJECTS, model_id=mid, cache_dir=tmp_path)
  assert len(count_encodes) == 1  # disk hit
  np.testing.assert_array_equal(disk, first)
  # Only the missing object is encoded.
  prompts.text_embeddings(model, tokenizer, ["bottle", "screw"], model_id=mid, cache_dir=tmp_path)
  assert count_encodes[1:] == [420]


def test_cache_invalidation(setup, count_encodes):
  tokenizer, cfg, model = setup
  base = prompts.text_embeddings(model, tokenizer, ["bottle"], model_id="ckpt-a")
  same = prompts.text_embeddings(model, tokenizer, ["bottle"], model_id="ckpt-a")
  assert len(count_encodes) == 1
  np.testing.assert_array_equal(base, same)
  prompts.text_embeddings(model, tokenizer, ["bottle"], model_id="ckpt-b")
  assert len(count_encodes) == 2
  # Same weights and id, other activation: a new key and a different result.
  gelu = clip_text.init_random(dataclasses.replace(cfg, activation="gelu"), seed=0)
  other = prompts.text_embeddings(gelu, tokenizer, ["bottle"], model_id="ckpt-a")
  assert len(count_encodes) == 3
  assert np.abs(other - base).max() > 1e-4
  keys = {prompts.cache_key("ckpt-a", "quick_gelu", jnp.float32, "bottle"),
          prompts.cache_key("ckpt-b", "quick_gelu", jnp.float32, "bottle"),
          prompts.cache_key("ckpt-a", "gelu", jnp.float32, "bottle"),
          prompts.cache_key("ckpt-a", "quick_gelu", jnp.bfloat16, "bottle"),
          prompts.cache_key("ckpt-a", "quick_gelu", jnp.float32, "bottle ")}
  assert len(keys) == 5


def test_display_names(setup, count_encodes):
  tokenizer, _, model = setup
  mid = prompts.model_id_of(model)
  mapped = prompts.text_embeddings(model, tokenizer, ["metal_nut"], model_id=mid,
                                   display_names={"metal_nut": "metal nut"})
  direct = prompts.text_embeddings(model, tokenizer, ["metal nut"], model_id=mid)
  assert len(count_encodes) == 1  # same sentences, same key
  np.testing.assert_array_equal(mapped, direct)
  folder = prompts.text_embeddings(model, tokenizer, ["metal_nut"], model_id=mid)
  assert len(count_encodes) == 2 and np.abs(folder - mapped).max() > 1e-4


def test_model_without_identity_is_refused(setup):
  _, cfg, model = setup
  bare = nnx.eval_shape(lambda: clip_text.ClipText(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="model_id"):
    prompts.model_id_of(bare)
  assert prompts.model_id_of(model) != prompts.model_id_of(clip_text.init_random(cfg, seed=1))
