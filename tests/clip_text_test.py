"""CLIP text tower: parity with transformers, converter layouts and errors, tokenizer files."""

import dataclasses
import functools
import gzip
import html
import json
import re
import warnings

import jax.numpy as jnp
import ftfy
import numpy as np
import pytest
import regex
import torch
import transformers
from flax import nnx

from adjax.models import prompts
from adjax.models import clip_text, clip_tokenizer, weights
from converters import clip_text as conv
from converters.common import ConversionError

MVTEC = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
         "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, projection_dim=32)


def _corpus():
  return [s for o in MVTEC + ("metal nut",) for g in prompts.prompt_sentences(o) for s in g]


def _perturbed(model, seed):
  """Random values everywhere, including LayerNorm scales and all biases."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _token_batch(vocab, eos, bos, length, eot_positions, seed):
  """Rows: bos, random tokens, eos at the given position, then random garbage."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (len(eot_positions), length))
  for r, p in enumerate(eot_positions):
    body = ids[r, 1:p]
    body[(body == eos) | (body == bos)] = 7
    ids[r, 0], ids[r, p] = bos, eos
  return ids.astype(np.int32)


# ---------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
  """Tokenizer dirs: EOT the largest id ('max'), and EOT moved to id 300 ('mid')."""
  root = tmp_path_factory.mktemp("tok")
  vocab_size = clip_tokenizer.write_byte_level_tokenizer(root / "max", _corpus(), num_merges=150)
  (root / "mid").mkdir()
  vocab = json.loads((root / "max" / "vocab.json").read_text())
  displaced = next(t for t, i in vocab.items() if i == 300)
  vocab[displaced], vocab[clip_tokenizer.EOT_TOKEN] = vocab[clip_tokenizer.EOT_TOKEN], 300
  (root / "mid" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
  (root / "mid" / "merges.txt").write_text((root / "max" / "merges.txt").read_text())
  return {"max": root / "max", "mid": root / "mid", "vocab_size": vocab_size}


def _gpt2_bytes():
  # The GPT-2 / OpenAI byte table, written out independently of the module.
  keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
  rest = [b for b in range(256) if b not in keep]
  return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


@functools.lru_cache(maxsize=4)
def _reference_tables(merges):
  table = _gpt2_bytes()
  symbols = list(table.values())
  vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  return table, {t: i for i, t in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}


_PAT = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                     r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


def _openai_clean(text):
  """simple_tokenizer.py: whitespace_clean(basic_clean(text)).lower()."""
  text = ftfy.fix_text(text)  # basic_clean
  text = html.unescape(html.unescape(text))
  text = text.strip()
  text = re.sub(r"\s+", " ", text)  # whitespace_clean
  text = text.strip()
  return text.lower()


def _reference_encode(text, merges):
  """OpenAI's cleaning and BPE encoding algorithm, independently of transformers."""
  table, encoder, ranks = _reference_tables(tuple(merges))
  pat = _PAT
  out = [encoder["<|startoftext|>"]]
  for word in pat.findall(_openai_clean(text)):
    w = [table[b] for b in word.encode("utf-8")]
    w[-1] += "</w>"
    while len(w) > 1:
      pair = min(zip(w, w[1:]), key=lambda p: ranks.get(p, float("inf")))
      if pair not in ranks:
        break
      merged, i = [], 0
      while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
          merged.append(w[i] + w[i + 1])
          i += 2
        else:
          merged.append(w[i])
          i += 1
      w = merged
    out += [encoder[s] for s in w]
  return out + [encoder["<|endoftext|>"]]


def test_tokenization_matches_openai_algorithm_over_prompt_set(tok_dirs):
  tok = clip_tokenizer.load_tokenizer(tok_dirs["max"])
  merges = clip_tokenizer.read_merges(tok_dirs["max"] / "merges.txt")
  assert len(merges) == 150
  sentences = _corpus()
  ids = clip_tokenizer.tokenize(tok, sentences, 77)
  assert ids.shape == (len(sentences), 77) and ids.dtype == np.int32
  for s, row in zip(sentences, ids):
    ref = _reference_encode(s, merges)
    np.testing.assert_array_equal(row[: len(ref)], ref, err_msg=s)
    assert not row[len(ref):].any()
  # Merged tokens must occur, or this test would only check single bytes.
  assert ((ids >= 512) & (ids < tok_dirs["vocab_size"] - 2)).sum() > len(sentences)


# Names that exercise each cleaning step and where transformers' own
# normaliser (NFC, \s+, Rust lower-casing) would differ from OpenAI's.
AWKWARD_NAMES = (
    "nut &amp; bolt", "nut &amp;amp; bolt", "&lt;chip&gt;", "ﬁsh ﬂake", "cafÃ©",
    "Metal_Nut", "METAL NUT", "  metal\tnut\n ", "metal\u00a0nut", "ΟΔΟΣ",
    "e&#769;cru", "Ｆｕｌｌ ｗｉｄｔｈ", "it’s broken", "don't", "pcb4", "macaroni2",
    "x²", "zipper (YKK) #3", "bottle-cap", "日本語の部品", "naïve 🙂", "İstanbul",
    "straße", "a\u200bb")


@pytest.mark.parametrize("text,cleaned", [
    ("nut &amp;amp; bolt", "nut & bolt"), ("ﬁsh", "fish"), ("cafÃ©", "café"),
    ("  Metal\tNUT\n", "metal nut"), ("ΟΔΟΣ", "οδος"), ("it’s", "it's"),
    ("Ｐｉｌｌ", "pill"), ("screw 12", "screw 12")])
def test_clean_text_examples(text, cleaned):
  assert clip_tokenizer.clean_text(text) == cleaned


def test_awkward_names_tokenised_as_openai(tok_dirs):
  tok = clip_tokenizer.load_tokenizer(tok_dirs["max"])
  merges = clip_tokenizer.read_merges(tok_dirs["max"] / "merges.txt")
  texts = list(AWKWARD_NAMES) + [
      s for name in AWKWARD_NAMES[:6] for g in prompts.prompt_sentences(name) for s in g[:3]]
  ids = clip_tokenizer.tokenize(tok, texts, 77)
  for text, row in zip(texts, ids):
    ref = _reference_encode(text, merges)
    np.testing.assert_array_equal(row[: len(ref)], ref, err_msg=repr(text))
    assert not row[len(ref):].any()
  # transformers' default normaliser alone would not have matched OpenAI's.
  default = transformers.CLIPTokenizer(
      vocab=json.loads((tok_dirs["max"] / "vocab.json").read_text()), merges=merges)
  differs = [t for t in AWKWARD_NAMES
             if default(t)["input_ids"] != _reference_encode(t, merges)]
  assert {"nut &amp; bolt", "ﬁsh ﬂake", "ΟΔΟΣ"} <= set(differs)


def test_text_cleaning_is_part_of_the_cache_key(monkeypatch):
  key = prompts.cache_key("m", "gelu", jnp.float32, "nut")
  monkeypatch.setattr(clip_text, "TEXT_CLEANING", "another cleaning")
  assert prompts.cache_key("m", "gelu", jnp.float32, "nut") != key


def test_tokenize_refuses_text_longer_than_context(tok_dirs):
  tok = clip_tokenizer.load_tokenizer(tok_dirs["max"])
  with pytest.raises(ValueError, match="context length 8"):
    clip_tokenizer.tokenize(tok, ["a photo of a bottle with damage"], 8)


def _write_bpe_gz(path, merges, header="\"bpe_simple_vocab_16e6.txt#version: 0.2"):
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write(header + "\n" + "".join(f"{a} {b}\n" for a, b in merges))


def test_tokenizer_from_openai_bpe_file(tmp_path):
  merges = clip_tokenizer.learn_merges(_corpus(), 80)
  _write_bpe_gz(tmp_path / "bpe.txt.gz", merges)
  size = clip_tokenizer.write_tokenizer_from_openai_bpe(tmp_path / "bpe.txt.gz", tmp_path / "tok")
  assert size == 512 + 80 + 2
  vocab = json.loads((tmp_path / "tok" / "vocab.json").read_text())
  table = list(_gpt2_bytes().values())
  expected = table + [t + "</w>" for t in table] + ["".join(m) for m in merges]
  assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][:-2] == expected
  assert vocab["<|startoftext|>"] == size - 2 and vocab["<|endoftext|>"] == size - 1
  tok = clip_tokenizer.load_tokenizer(tmp_path / "tok")
  sentences = prompts.prompt_sentences("metal_nut")[1][:40]
  for s, row in zip(sentences, clip_tokenizer.tokenize(tok, sentences, 77)):
    ref = _reference_encode(s, merges)
    np.testing.assert_array_equal(row[: len(ref)], ref)


def test_one_merges_reader_for_both_file_forms(tmp_path):
  """merges.txt (optional #version line) and OpenAI's .gz (header always, count
  limit, must hold merges) are read by one function; errors give the file's line."""
  merges = [("a", "b"), ("ab", "c</w>"), ("d", "e")]
  clip_tokenizer.write_tokenizer_files(tmp_path, merges)
  assert clip_tokenizer.read_merges(tmp_path / "merges.txt") == merges
  (tmp_path / "plain.txt").write_text("a b\n\nab c</w>\nd e\n")
  assert clip_tokenizer.read_merges(tmp_path / "plain.txt") == merges
  _write_bpe_gz(tmp_path / "bpe.txt.gz", merges)
  assert clip_tokenizer.read_merges(tmp_path / "bpe.txt.gz") == merges
  assert clip_tokenizer.read_merges(tmp_path / "bpe.txt.gz", 2) == merges[:2]
  (tmp_path / "bad.txt").write_text("#version: 0.2\na b\nabc\n")
  with pytest.raises(ValueError, match=r"bad.txt: line 3 is not a merge"):
    clip_tokenizer.read_merges(tmp_path / "bad.txt")
  _write_bpe_gz(tmp_path / "empty.txt.gz", [])
  with pytest.raises(ValueError, match="holds no merges"):
    clip_tokenizer.read_merges(tmp_path / "empty.txt.gz")
  (tmp_path / "not.gz").write_text("a b\n")
  with pytest.raises(ValueError, match="not a gzip-compressed BPE merges file"):
    clip_tokenizer.read_merges(tmp_path / "not.gz")


def _full_size_bpe(path):
  """A synthetic BPE file in OpenAI's format, longer than the 48894 merges kept."""
  sym = list(_gpt2_bytes().values())
  merges = [(a, b) for a in sym for b in sym][: clip_tokenizer.OPENAI_NUM_MERGES + 500]
  _write_bpe_gz(path, merges)


def test_openai_bpe_file_keeps_openai_merge_count(tmp_path):
  _full_size_bpe(tmp_path / "bpe.txt.gz")
  size = clip_tokenizer.write_tokenizer_from_openai_bpe(tmp_path / "bpe.txt.gz", tmp_path / "tok")
  assert size == 49408
  tok = clip_tokenizer.load_tokenizer(tmp_path / "tok")
  assert tok.convert_tokens_to_ids("<|endoftext|>") == 49407
  assert tok.convert_tokens_to_ids("<|startoftext|>") == 49406


# ------------------------------------------------------- parity (tiny, real)


def _hf_dir(path, model, tok_dir=None):
  model.save_pretrained(path)
  if tok_dir is not None:
    for f in ("vocab.json", "merges.txt"):
      (path / f).write_bytes((tok_dir / f).read_bytes())
  return path


@pytest.fixture(scope="module")
def tiny_cases(tmp_path_factory, tok_dirs):
  """(activation, eot placement) -> (HF model, converted dir)."""
  cases = {}
  v = tok_dirs["vocab_size"]
  for i, act in enumerate(("quick_gelu", "gelu")):
    for placement, eos in (("max", v - 1), ("mid", 300)):
      cfg = transformers.CLIPTextConfig(vocab_size=v, hidden_act=act, bos_token_id=v - 2,
                                        eos_token_id=eos, pad_token_id=eos, **TINY)
      torch.manual_seed(i)
      hf = _perturbed(transformers.CLIPTextModelWithProjection(cfg), seed=10 + i)
      root = tmp_path_factory.mktemp(f"{act}-{placement}")
      src = _hf_dir(root / "hf", hf, tok_dirs[placement])
      conv.convert(src, root / "converted")
      cases[(act, placement)] = (hf, root / "converted", eos)
  return cases


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("placement", ["max", "mid"])
def test_tiny_parity_with_transformers(tiny_cases, tok_dirs, act, placement):
  hf, path, eos = tiny_cases[(act, placement)]
  model = clip_text.load(path)
  cfg = model.config
  assert (cfg.activation, cfg.eos_token_id, cfg.layers, cfg.heads) == (act, eos, 2, 2)
  ids = _token_batch(tok_dirs["vocab_size"], eos, tok_dirs["vocab_size"] - 2, 16,
                     (1, 5, 9, 15), seed=3)
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids).long()).text_embeds.numpy()
  ours = np.asarray(model.encode_text(jnp.asarray(ids)))
  assert ours.shape == (4, 32)
  assert np.abs(ours - ref).max() <= 1e-4
  # Causal attention: columns after the last EOT do not matter.
  short = np.asarray(model.encode_text(jnp.asarray(ids[:3, :10])))
  assert np.abs(short - ref[:3]).max() <= 1e-4


def test_activation_override_at_load(tiny_cases):
  _, path, _ = tiny_cases[("quick_gelu", "max")]
  hf_gelu, _, _ = tiny_cases[("gelu", "max")]
  assert clip_text.load(path, activation="gelu").config.activation == "gelu"
  ids = jnp.asarray(_token_batch(100, 99, 98, 16, (4, 12), seed=1))
  a = clip_text.load(path).encode_text(ids)
  b = clip_text.load(path, activation="gelu").encode_text(ids)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  assert clip_text.load(path).model_id == prompts.model_id_of(path)


@pytest.mark.slow
def test_vit_l14_text_architecture_parity():
  cfg = transformers.CLIPTextConfig(
      vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
      num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
      hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
  torch.manual_seed(0)
  hf = _perturbed(transformers.CLIPTextModelWithProjection(cfg), seed=1)
  sd = _state_dict(hf)
  config = conv.model_config(sd, "hf", cfg, None, 49407, "vit-l-14")
  expected = dataclasses.replace(clip_text.VARIANTS["vit-l-14"], activation="gelu")
  assert config == expected
  model = nnx.eval_shape(lambda: clip_text.ClipText(config, rngs=nnx.Rngs(0)))
  weights.assign(model, conv.to_params(sd, "hf", config))
  ids = _token_batch(49408, 49407, 49406, 77, (9, 76), seed=5)
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids).long()).text_embeds.numpy()
  ours = np.asarray(model.encode_text(jnp.asarray(ids)))
  assert np.abs(ours - ref).max() <= 1e-4


# --------------------------------------------------------------- OpenAI layout


def _hf_to_openai(sd):
  """The inverse of the converter's mapping, written from the SPEC's layout table."""
  p = "text_model."
  out = {
      "token_embedding.weight": sd[p + "embeddings.token_embedding.weight"],
      "positional_embedding": sd[p + "embeddings.position_embedding.weight"],
      "ln_final.weight": sd[p + "final_layer_norm.weight"],
      "ln_final.bias": sd[p + "final_layer_norm.bias"],
      "text_projection": sd["text_projection.weight"].T.copy(),
  }
  i = 0
  while f"{p}encoder.layers.{i}.mlp.fc1.weight" in sd:
    s, t = f"{p}encoder.layers.{i}.", f"transformer.resblocks.{i}."
    for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj",
                 "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
      out[t + a + ".weight"], out[t + a + ".bias"] = sd[s + b + ".weight"], sd[s + b + ".bias"]
    for kind in ("weight", "bias"):
      out[t + "attn.in_proj_" + kind] = np.concatenate(
          [sd[s + f"self_attn.{n}_proj.{kind}"] for n in "qkv"], axis=0)
    i += 1
  rng = np.random.default_rng(0)
  out["logit_scale"] = np.float32(4.6)
  out["visual.conv1.weight"] = rng.normal(size=(8, 3, 4, 4)).astype(np.float32)
  out["visual.proj"] = rng.normal(size=(8, 32)).astype(np.float32)
  return out


class _Holder(torch.nn.Module):
  def forward(self) -> torch.Tensor:
    return self.positional_embedding


def _torchscript(sd, path):
  """A TorchScript archive whose state_dict() has exactly the keys of `sd`."""
  root = _Holder()
  for k, v in sd.items():
    *parents, leaf = k.split(".")
    mod = root
    for name in parents:
      if name not in mod._modules:
        mod.add_module(name, torch.nn.Module())
      mod = mod._modules[name]
    mod.register_parameter(leaf, torch.nn.Parameter(torch.as_tensor(v), requires_grad=False))
  for name in ("input_resolution", "context_length", "vocab_size"):
    root.register_buffer(name, torch.tensor(16))
  with warnings.catch_warnings():  # TorchScript is deprecated, but it is OpenAI's format
    warnings.simplefilter("ignore", DeprecationWarning)
    torch.jit.save(torch.jit.script(root), str(path))


@pytest.fixture(scope="module")
def openai_files(tiny_cases, tmp_path_factory):
  hf, _, _ = tiny_cases[("quick_gelu", "max")]
  sd = _hf_to_openai(_state_dict(hf))
  root = tmp_path_factory.mktemp("openai")
  torch.save({k: torch.as_tensor(v) for k, v in sd.items()}, root / "sd.pt")
  half = {k: torch.as_tensor(v).half() if k != "logit_scale" else torch.as_tensor(v)
          for k, v in sd.items()}
  torch.save({"state_dict": half}, root / "half.pt")
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in sd.items()},
            str(root / "sd.safetensors"))
  _torchscript(sd, root / "jit.pt")
  return root, sd


# TorchScript is deprecated in torch, but it is the OpenAI release's format.
@pytest.mark.filterwarnings("ignore:.*torch.jit:DeprecationWarning",
                            "ignore:.*TorchScript archive:UserWarning")
@pytest.mark.parametrize("name", ["sd.pt", "sd.safetensors", "jit.pt"])
def test_openai_layouts_give_identical_features(openai_files, tiny_cases, tok_dirs, tmp_path, name):
  root, _ = openai_files
  _, hf_path, _ = tiny_cases[("quick_gelu", "max")]
  conv.convert(root / name, tmp_path / "out", tokenizer=tok_dirs["max"])
  model, ref_model = clip_text.load(tmp_path / "out"), clip_text.load(hf_path)
  same = lambda c: dataclasses.replace(c, name="")
  assert same(model.config) == same(ref_model.config)
  ids = jnp.asarray(_token_batch(tok_dirs["vocab_size"], model.config.eos_token_id,
                                 model.config.eos_token_id - 1, 16, (2, 8, 15), seed=9))
  np.testing.assert_array_equal(np.asarray(model.encode_text(ids)),
                                np.asarray(ref_model.encode_text(ids)))
  assert (tmp_path / "out" / "vocab.json").read_bytes() == (tok_dirs["max"] / "vocab.json").read_bytes()


def test_half_precision_is_upcast(openai_files, tok_dirs, tmp_path):
  root, sd = openai_files
  conv.convert(root / "half.pt", tmp_path / "out", tokenizer=tok_dirs["max"],
               activation="gelu")
  params, cfg = weights.load(tmp_path / "out", "clip_text")
  assert cfg["activation"] == "gelu" and cfg["source_layout"] == "openai"
  assert params["text_projection"].dtype == np.float32
  np.testing.assert_array_equal(params["text_projection"],
                                sd["text_projection"].astype(np.float16).astype(np.float32))
  w = sd["transformer.resblocks.1.attn.in_proj_weight"].astype(np.float16).astype(np.float32)
  np.testing.assert_array_equal(params["blocks/1/attn/k/kernel"], w[128:256].T)


def test_openai_bpe_gz_as_tokenizer(openai_files, tmp_path):
  root, sd = openai_files
  # A tokenizer of the wrong size is refused; one of the right size is accepted.
  merges = clip_tokenizer.learn_merges(_corpus(), sd["token_embedding.weight"].shape[0] - 514)
  _write_bpe_gz(tmp_path / "bpe_simple_vocab_16e6.txt.gz", merges)
  conv.convert(root / "sd.pt", tmp_path / "out", tokenizer=tmp_path / "bpe_simple_vocab_16e6.txt.gz")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["tokenizer"].startswith("built")
  _write_bpe_gz(tmp_path / "small.txt.gz", merges[:10])
  with pytest.raises(ConversionError, match="do not belong together"):
    conv.convert(root / "sd.pt", tmp_path / "bad", tokenizer=tmp_path / "small.txt.gz")
  assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------- errors


def _save(sd, path):
  torch.save({k: torch.as_tensor(v) for k, v in sd.items()}, path)
  return path


def test_refuses_missing_tokenizer(openai_files, tmp_path, capsys):
  root, _ = openai_files
  assert conv.main(["--src", str(root / "sd.pt"), "--dst", str(tmp_path / "out")]) == 2
  assert "--tokenizer" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_refuses_dinov3_checkpoint(tmp_path, tok_dirs):
  sd = {"cls_token": np.zeros((1, 1, 8)), "storage_tokens": np.zeros((1, 4, 8)),
        "patch_embed.proj.weight": np.zeros((8, 3, 16, 16)),
        "blocks.0.attn.qkv.weight": np.zeros((24, 8))}
  with pytest.raises(ConversionError, match="DINOv3"):
    conv.convert(_save(sd, tmp_path / "dino.pth"), tmp_path / "out", tokenizer=tok_dirs["max"])
  assert not (tmp_path / "out").exists()


def test_refuses_vision_only_clip(openai_files, tmp_path, tok_dirs):
  _, sd = openai_files
  vision = {k: v for k, v in sd.items() if k.startswith("visual.") or k == "logit_scale"}
  with pytest.raises(ConversionError, match="only a CLIP vision tower"):
    conv.convert(_save(vision, tmp_path / "v.pt"), tmp_path / "out", tokenizer=tok_dirs["max"])
  assert not (tmp_path / "out").exists()


def test_refuses_text_model_without_projection(tiny_cases, tmp_path):
  hf, _, _ = tiny_cases[("gelu", "max")]
  bare = transformers.CLIPTextModel(hf.config)
  bare.save_pretrained(tmp_path / "bare")
  with pytest.raises(ConversionError, match="text_projection"):
    conv.convert(tmp_path / "bare", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_strict_accounting_names_unknown_keys(openai_files, tmp_path, tok_dirs):
  _, sd = openai_files
  extra = dict(sd, **{"transformer.resblocks.0.attn.extra_scale": np.ones(4, np.float32)})
  with pytest.raises(ConversionError, match="transformer.resblocks.0.attn.extra_scale"):
    conv.convert(_save(extra, tmp_path / "x.pt"), tmp_path / "out", tokenizer=tok_dirs["max"])
  broken = {k: v for k, v in sd.items() if k != "ln_final.bias"}
  with pytest.raises(ConversionError, match="ln_final.bias"):
    conv.convert(_save(broken, tmp_path / "y.pt"), tmp_path / "out", tokenizer=tok_dirs["max"])
  assert not (tmp_path / "out").exists()


def test_existing_destination_needs_overwrite(openai_files, tmp_path, tok_dirs):
  root, _ = openai_files
  (tmp_path / "out").mkdir()
  with pytest.raises(ConversionError, match="--overwrite"):
    conv.convert(root / "sd.pt", tmp_path / "out", tokenizer=tok_dirs["max"])
  conv.convert(root / "sd.pt", tmp_path / "out", tokenizer=tok_dirs["max"], overwrite=True)
  assert clip_text.load(tmp_path / "out").config.layers == 2


def test_variants_and_random_init():
  for name, cfg in clip_text.VARIANTS.items():
    shapes = weights.param_shapes(nnx.eval_shape(lambda c=cfg: clip_text.ClipText(c, rngs=nnx.Rngs(0))))
    assert shapes["text_projection"] == (cfg.width, cfg.embed_dim), name
  assert clip_text.VARIANTS["vit-b-16"].width == 512
  cfg = clip_text.ClipTextConfig(vocab_size=50, context_length=8, width=16, layers=1, heads=2,
                                 mlp_dim=32, embed_dim=8, eos_token_id=49, name="t")
  a, b = clip_text.init_random(cfg, seed=0), clip_text.init_random(cfg, seed=1)
  ids = jnp.asarray([[48, 3, 49, 0, 0, 0, 0, 0]], jnp.int32)
  assert not np.allclose(a.encode_text(ids), b.encode_text(ids))
  assert a.model_id != b.model_id
  # bfloat16 compute stays close to float32 (direction).
  c = nnx.merge(*nnx.split(a))
  c16 = clip_text.init_random(cfg, seed=0, dtype=jnp.bfloat16)
  x, y = np.asarray(c.encode_text(ids)), np.asarray(c16.encode_text(ids), np.float32)
  assert np.dot(x[0], y[0]) / np.linalg.norm(x) / np.linalg.norm(y) > 0.99


def test_full_clip_model_directory(tok_dirs, tmp_path):
  """A CLIPModel directory: the vision tower is dropped, the text tower matches."""
  v = tok_dirs["vocab_size"]
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=v, bos_token_id=v - 2, eos_token_id=v - 1, **{
          k: val for k, val in TINY.items() if k != "projection_dim"}),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, image_size=32, patch_size=16),
      projection_dim=24)
  torch.manual_seed(3)
  hf = _perturbed(transformers.CLIPModel(cfg), seed=4)
  conv.convert(_hf_dir(tmp_path / "hf", hf, tok_dirs["max"]), tmp_path / "out")
  model = clip_text.load(tmp_path / "out")
  ids = _token_batch(v, v - 1, v - 2, 16, (3, 15), seed=2)
  with torch.no_grad():
    ref = hf.text_projection(hf.text_model(input_ids=torch.from_numpy(ids).long()).pooler_output)
  assert np.abs(np.asarray(model.encode_text(jnp.asarray(ids))) - ref.numpy()).max() <= 1e-4
