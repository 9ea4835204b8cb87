"""DINOv3 conversion and parity with transformers' DINOv3ViTModel.

Random-weight PyTorch references are saved to disk and converted through the
converter's command-line entry point; the converted adjax model must give the
reference's normed block outputs (float32: max abs error <= 1e-4; bfloat16
compute: per-token cosine similarity >= 0.999).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from adjax.models import dinov3, weights  # noqa: E402
from converters import dinov3 as convert_dinov3  # noqa: E402

F32_ATOL = 1e-4
BF16_MIN_COS = 0.999

# name -> (HF config kwargs, blocks compared, image sizes)
REFERENCES = {
    "tiny_mlp": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4), [2, 0, 1], [(32, 48), (64, 32)]),
    "tiny_swiglu": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, use_gated_mlp=True, hidden_act="silu",
                         rope_theta=50.0), [0, 1], [(48, 48), (32, 64)]),
    "vits16": (dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                    num_attention_heads=6), [11, 0, 2, 5, 8], [(224, 224), (224, 320)]),
    "vits16plus": (dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                        num_attention_heads=6, use_gated_mlp=True, hidden_act="silu"),
                   [2, 5, 8, 11], [(224, 320)]),
}


def _randomize(model: "torch.nn.Module", seed: int) -> None:
  """Every parameter random and away from its trivial init (layer scale != 1,
  norms != 1/0, biases != 0), at scales that keep activations O(1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=gen)
      if "lambda1" in name:
        p.copy_(0.1 + 0.8 * torch.rand(p.shape, generator=gen))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * r)
      elif name.endswith("bias"):
        p.copy_(0.1 * r)
      elif name.endswith(("cls_token", "register_tokens", "mask_token")):
        p.copy_(r)
      else:  # Linear and conv weights, 1 / sqrt(fan in)
        p.copy_(r / np.sqrt(np.prod(p.shape[1:])))


class _References(dict):
  """name -> (torch model, converted adjax directory), each built on first use."""

  def __init__(self, root):
    super().__init__()
    self.root = root

  def __missing__(self, name):
    kwargs, _, _ = REFERENCES[name]
    config = transformers.DINOv3ViTConfig(num_register_tokens=4, layerscale_value=0.5,
                                          **kwargs)
    model = transformers.DINOv3ViTModel(config).eval()
    _randomize(model, seed=list(REFERENCES).index(name))
    src = self.root / name / "hf"
    model.save_pretrained(src)
    dst = src.parent / "converted"
    assert convert_dinov3.main(["--src", str(src), "--dst", str(dst)]) == 0
    self[name] = (model, dst)
    return self[name]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
  return _References(tmp_path_factory.mktemp("references"))


def _reference_features(model, images: np.ndarray, layers) -> list[np.ndarray]:
  with torch.no_grad():
    res = model(torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
    # hidden_states[0] is the embedding output, [i + 1] the raw output of block i.
    assert len(res.hidden_states) == model.config.num_hidden_layers + 1
    return [model.norm(res.hidden_states[i + 1]).numpy() for i in layers]


def _features(model, images, layers):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).get_intermediate_layers(x, layers))
  return [np.asarray(o) for o in fn(state, jnp.asarray(images))]


def _min_token_cosine(a, b):
  a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
  return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())


@pytest.mark.parametrize("name", [
    "tiny_mlp", "tiny_swiglu",
    # The real ViT-S/16 and ViT-S+/16 sizes (the full suite).
    pytest.param("vits16", marks=pytest.mark.slow),
    pytest.param("vits16plus", marks=pytest.mark.slow)])
def test_parity_float32_and_bfloat16(references, name):
  torch_model, converted = references[name]
  _, layers, sizes = REFERENCES[name]
  f32 = dinov3.load(converted)
  bf16 = dinov3.load(converted, dtype=jnp.bfloat16)
  rng = np.random.default_rng(0)
  for k, (h, w) in enumerate(sizes):
    images = rng.standard_normal((2, h, w, 3)).astype(np.float32)
    ref = _reference_features(torch_model, images, layers)
    ours = _features(f32, images, layers)
    for layer, r, o in zip(layers, ref, ours):
      assert o.shape == (2, 5 + (h // 16) * (w // 16), torch_model.config.hidden_size)
      err = np.abs(r - o).max()
      assert err <= F32_ATOL, f"{name} {h}x{w} block {layer}: max abs err {err}"
    if k == len(sizes) - 1:  # one bfloat16 compile per model keeps the suite fast
      for layer, r, o in zip(layers, ref, _features(bf16, images, layers)):
        cos = _min_token_cosine(r, o)
        assert cos >= BF16_MIN_COS, f"{name} {h}x{w} block {layer}: bf16 cosine {cos}"


def test_converted_config(references):
  _, converted = references["vits16"]
  cfg = json.loads((converted / "config.json").read_text())
  assert cfg["kind"] == "dinov3" and cfg["variant"] == "vits16"
  assert cfg["source"] == "model.safetensors" and cfg["source_format"] == "hf"
  from converters.common import sha256_file
  assert cfg["source_sha256"] == sha256_file(converted.parent / "hf" / "model.safetensors")
  assert dinov3.load(converted).config == dinov3.VARIANTS["vits16"]
  tiny = json.loads((references["tiny_swiglu"][1] / "config.json").read_text())
  assert (tiny["variant"], tiny["ffn"], tiny["rope_base"]) == ("custom", "swiglu", 50.0)


# ------------------------------------------------------------ Meta layout

def _meta_state_dict(model) -> dict:
  """The official layout, derived from a HF model by the inverse name map."""
  cfg = model.config
  d, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
  sd = {k: v.clone() for k, v in model.state_dict().items()}
  gen = torch.Generator().manual_seed(7)
  out = {
      "cls_token": sd["embeddings.cls_token"],
      "storage_tokens": sd["embeddings.register_tokens"],
      "mask_token": torch.zeros(1, d),
      "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
      "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
      "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"],
      "rope_embed.periods": cfg.rope_theta ** (
          2 * torch.arange(hd // 4, dtype=torch.float32) / (hd // 2)),
      "local_cls_norm.weight": torch.ones(d), "local_cls_norm.bias": torch.zeros(d),
  }
  names = {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj",
           "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
  names.update({"mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w2", "mlp.down_proj": "mlp.w3"}
               if cfg.use_gated_mlp else {"mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"})
  for i in range(cfg.num_hidden_layers):
    hf, meta = f"model.layer.{i}.", f"blocks.{i}."
    for key, value in sd.items():
      if key.startswith(hf):
        rest = key[len(hf):]
        for a, b in names.items():
          if rest.startswith(a + "."):
            out[meta + b + rest[len(a):]] = value
          elif rest == a:
            out[meta + b] = value
    att = hf + "attention."
    out[meta + "attn.qkv.weight"] = torch.cat(
        [sd[att + "q_proj.weight"], sd[att + "k_proj.weight"], sd[att + "v_proj.weight"]])
    # A non-zero key bias that the mask must remove.
    out[meta + "attn.qkv.bias"] = torch.cat(
        [sd[att + "q_proj.bias"], torch.randn(d, generator=gen), sd[att + "v_proj.bias"]])
    out[meta + "attn.qkv.bias_mask"] = torch.cat(
        [torch.ones(d), torch.zeros(d), torch.ones(d)])
  return out


@pytest.fixture(scope="module")
def meta_files(references, tmp_path_factory):
  root = tmp_path_factory.mktemp("meta")
  files = {}
  for name in ("tiny_mlp", "tiny_swiglu"):
    files[name] = root / f"dinov3_{name}.pth"
    torch.save(_meta_state_dict(references[name][0]), files[name])
  return files


@pytest.mark.parametrize("name", ["tiny_mlp", "tiny_swiglu"])
def test_meta_pth_gives_identical_features(references, meta_files, tmp_path, name):
  dst = tmp_path / "meta_converted"
  assert convert_dinov3.main(["--src", str(meta_files[name]), "--dst", str(dst)]) == 0
  hf_params, _ = weights.load(references[name][1], "dinov3")
  meta_params, meta_cfg = weights.load(dst, "dinov3")
  assert meta_cfg["source_format"] == "meta"
  hf_flat, meta_flat = hf_params, meta_params
  assert sorted(hf_flat) == sorted(meta_flat)
  for key in hf_flat:  # periods: stored by Meta vs recomputed for HF
    np.testing.assert_array_equal(meta_flat[key], hf_flat[key], err_msg=key)
  _, layers, sizes = REFERENCES[name]
  images = np.random.default_rng(1).standard_normal((1,) + sizes[0] + (3,)).astype(np.float32)
  for a, b in zip(_features(dinov3.load(dst), images, layers),
                  _features(dinov3.load(references[name][1]), images, layers)):
    np.testing.assert_array_equal(a, b)


def test_meta_stored_periods_are_used(references, tmp_path):
  sd = _meta_state_dict(references["tiny_mlp"][0])
  sd["rope_embed.periods"] = sd["rope_embed.periods"] * 1.5
  src = tmp_path / "odd_periods.pth"
  torch.save(sd, src)
  convert_dinov3.convert(str(src), str(tmp_path / "out"))
  model = dinov3.load(tmp_path / "out")
  np.testing.assert_array_equal(model.rope_periods[...], sd["rope_embed.periods"].numpy())


# -------------------------------------------------------------- bad input

def _assert_fails(tmp_path, src, match, variant=None):
  dst = tmp_path / "dst"
  argv = ["--src", str(src), "--dst", str(dst)] + (["--variant", variant] if variant else [])
  with pytest.raises(convert_dinov3.ConversionError, match=match):
    convert_dinov3.convert(str(src), str(dst), variant)
  assert convert_dinov3.main(argv) == 2
  assert not dst.exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]


def _save_variant(tmp_path, name, sd, edit):
  sd = dict(sd)
  edit(sd)
  path = tmp_path / f"{name}.pth"
  torch.save(sd, path)
  return path


@pytest.fixture(scope="module")
def tiny_meta(references):
  return _meta_state_dict(references["tiny_mlp"][0])


def test_error_missing_unexpected_and_misshaped(tmp_path, tiny_meta, capsys):
  src = _save_variant(tmp_path, "missing", tiny_meta,
                      lambda sd: sd.pop("blocks.1.ls2.gamma"))
  _assert_fails(tmp_path, src, r"missing source keys: \['blocks.1.ls2.gamma'\]")
  assert "blocks.1.ls2.gamma" in capsys.readouterr().err
  src = _save_variant(tmp_path, "extra", tiny_meta,
                      lambda sd: sd.update({"blocks.0.attn.extra": torch.zeros(3)}))
  _assert_fails(tmp_path, src, r"unexpected source keys: \['blocks.0.attn.extra'\]")
  src = _save_variant(tmp_path, "shape", tiny_meta,
                      lambda sd: sd.update({"norm.bias": torch.zeros(65)}))
  _assert_fails(tmp_path, src, r"mis-shaped parameters: norm/bias")
  _assert_fails(tmp_path, tmp_path / "shape.pth", r"missing source keys: \['blocks.10.attn",
                variant="vits16")


def test_error_key_bias(tmp_path, tiny_meta):
  src = _save_variant(tmp_path, "nomask", tiny_meta, lambda sd: [
      sd.pop(k) for k in list(sd) if k.endswith("bias_mask")])
  _assert_fails(tmp_path, src, "key bias is not zero")
  src = _save_variant(tmp_path, "nanmask", tiny_meta, lambda sd: sd.update(
      {"blocks.0.attn.qkv.bias_mask": torch.full((192,), float("nan"))}))
  _assert_fails(tmp_path, src, "non-finite")


def test_error_untied_cls_norm(tmp_path, tiny_meta):
  src = _save_variant(tmp_path, "clsnorm", tiny_meta, lambda sd: sd.update(
      {"cls_norm.weight": torch.ones(64), "cls_norm.bias": torch.zeros(64)}))
  _assert_fails(tmp_path, src, "untied cls/patch norms")


def test_error_clip_checkpoint(tmp_path):
  config = transformers.CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       max_position_embeddings=16)
  model = transformers.CLIPTextModel(config)
  model.save_pretrained(tmp_path / "clip_dir")
  _assert_fails(tmp_path, tmp_path / "clip_dir", "model_type 'clip_text_model'")
  torch.save(model.state_dict(), tmp_path / "clip.pth")
  _assert_fails(tmp_path, tmp_path / "clip.pth", "looks like a CLIP checkpoint")


def test_error_truncated_and_empty(tmp_path, meta_files, references):
  data = meta_files["tiny_mlp"].read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
  _assert_fails(tmp_path, tmp_path / "cut.pth", "truncated or corrupt")
  cut = tmp_path / "cut_hf"
  cut.mkdir()
  hf = references["tiny_mlp"][1].parent / "hf"
  (cut / "config.json").write_bytes((hf / "config.json").read_bytes())
  data = (hf / "model.safetensors").read_bytes()
  (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
  _assert_fails(tmp_path, cut, "truncated or corrupt")
  (cut / "model.safetensors").unlink()
  _assert_fails(tmp_path, cut, "no weights found")


def test_error_paths_and_hub_offline(tmp_path, monkeypatch, meta_files):
  _assert_fails(tmp_path, tmp_path / "nope.pth", "no such file or directory")
  import huggingface_hub.constants
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  _assert_fails(tmp_path, "facebook/dinov3-vits16-pretrain-lvd1689m",
                "Hugging Face hub failed")
  # An existing destination is kept unless --overwrite is given.
  dst = tmp_path / "existing"
  dst.mkdir()
  with pytest.raises(convert_dinov3.ConversionError, match="--overwrite"):
    convert_dinov3.convert(str(meta_files["tiny_mlp"]), str(dst))
  assert convert_dinov3.main(["--src", str(meta_files["tiny_mlp"]), "--dst", str(dst),
                              "--overwrite"]) == 0
  assert dinov3.load(dst).config.depth == 3
