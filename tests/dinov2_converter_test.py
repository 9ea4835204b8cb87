"""DINOv2 conversion and parity with transformers' Dinov2Model and
Dinov2WithRegistersModel.

Random-weight PyTorch references are saved with `save_pretrained` and
converted through the converter's command-line entry point; the converted
adjax model must give the reference's normed block outputs (float32: max abs
error <= 1e-4; bfloat16 compute: per-token cosine similarity >= 0.999), at
the native grid and at grids where the position embeddings are resized.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from adjax.models import dinov2, weights  # noqa: E402
from converters import dinov2 as convert_dinov2  # noqa: E402

F32_ATOL = 1e-4
BF16_MIN_COS = 0.999

# name -> (registers, HF config kwargs, blocks compared, image sizes (h, w)).
# Tiny: native grid 4 (56 px); ViT-S/14: native grid 37 (518 px), run at 224.
REFERENCES = {
    "tiny_mlp": (0, dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         image_size=56), [2, 0, 1], [(56, 56), (42, 70), (84, 84)]),
    "tiny_swiglu_reg": (4, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, use_swiglu_ffn=True),
                        [0, 1], [(56, 56), (98, 42)]),
    "vits14": (0, dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                       image_size=518), [11, 0, 2, 5, 8], [(224, 224), (224, 322)]),
    "vits14_reg": (4, dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                           image_size=518), [2, 5, 8, 11], [(224, 322)]),
}


def _reference_model(registers: int, kwargs: dict):
  kw = dict(kwargs, patch_size=14, layerscale_value=0.5)
  if registers:
    config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)
    return transformers.Dinov2WithRegistersModel(config).eval()
  return transformers.Dinov2Model(transformers.Dinov2Config(**kw)).eval()


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
      elif name.endswith(("cls_token", "register_tokens", "mask_token", "position_embeddings")):
        p.copy_(r)
      else:  # Linear and conv weights, 1 / sqrt(fan in)
        p.copy_(r / np.sqrt(np.prod(p.shape[1:])))


class _References(dict):
  """name -> (torch model, converted adjax directory), each built on first use."""

  def __init__(self, root):
    super().__init__()
    self.root = root

  def __missing__(self, name):
    registers, kwargs, _, _ = REFERENCES[name]
    model = _reference_model(registers, kwargs)
    _randomize(model, seed=list(REFERENCES).index(name))
    src = self.root / name / "hf"
    model.save_pretrained(src)
    dst = src.parent / "converted"
    assert convert_dinov2.main(["--src", str(src), "--dst", str(dst)]) == 0
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
    return [model.layernorm(res.hidden_states[i + 1]).numpy() for i in layers]


def _features(model, images, layers):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).get_intermediate_layers(x, layers))
  return [np.asarray(o) for o in fn(state, jnp.asarray(images))]


def _min_token_cosine(a, b):
  a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
  return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())


@pytest.mark.parametrize("name", [
    "tiny_mlp", "tiny_swiglu_reg",
    # The real ViT-S/14 size, at 224 px (position embeddings resized from 37).
    pytest.param("vits14", marks=pytest.mark.slow),
    pytest.param("vits14_reg", marks=pytest.mark.slow)])
def test_parity_float32_and_bfloat16(references, name):
  torch_model, converted = references[name]
  registers, _, layers, sizes = REFERENCES[name]
  f32 = dinov2.load(converted)
  bf16 = dinov2.load(converted, dtype=jnp.bfloat16)
  rng = np.random.default_rng(0)
  for k, (h, w) in enumerate(sizes):
    images = rng.standard_normal((2, h, w, 3)).astype(np.float32)
    ref = _reference_features(torch_model, images, layers)
    ours = _features(f32, images, layers)
    for layer, r, o in zip(layers, ref, ours):
      assert o.shape == (2, 1 + registers + (h // 14) * (w // 14),
                         torch_model.config.hidden_size)
      err = np.abs(r - o).max()
      assert err <= F32_ATOL, f"{name} {h}x{w} block {layer}: max abs err {err}"
    if k == len(sizes) - 1:  # one bfloat16 compile per model keeps the suite fast
      for layer, r, o in zip(layers, ref, _features(bf16, images, layers)):
        cos = _min_token_cosine(r, o)
        assert cos >= BF16_MIN_COS, f"{name} {h}x{w} block {layer}: bf16 cosine {cos}"


def test_converted_config(references):
  _, converted = references["tiny_mlp"]
  cfg = json.loads((converted / "config.json").read_text())
  assert cfg["kind"] == "dinov2" and cfg["variant"] == "custom"
  assert cfg["source"] == "model.safetensors" and cfg["source_format"] == "hf"
  from converters.common import sha256_file
  assert cfg["source_sha256"] == sha256_file(converted.parent / "hf" / "model.safetensors")
  # transformers resizes by size (no offset); with registers, antialiased.
  assert (cfg["interpolate_offset"], cfg["interpolate_antialias"]) == (0.0, False)
  tiny = json.loads((references["tiny_swiglu_reg"][1] / "config.json").read_text())
  assert (tiny["variant"], tiny["ffn"], tiny["ffn_hidden"], tiny["native_grid"],
          tiny["num_registers"], tiny["num_heads"]) == ("custom", "swiglu", 176, 4, 4, 2)
  assert (tiny["interpolate_offset"], tiny["interpolate_antialias"]) == (0.0, True)


@pytest.mark.slow
def test_converted_config_names_released_variants(references):
  assert dinov2.load(references["vits14"][1]).config == dinov2.DinoV2Config(
      384, 12, 6, "mlp", 1536, interpolate_offset=0.0, name="vits14")
  assert dinov2.load(references["vits14_reg"][1]).config == dinov2.VARIANTS["vits14_reg"]


# ------------------------------------------------------------ Meta layout

def _meta_state_dict(model) -> dict:
  """The hub layout, derived from a HF model by the inverse name map."""
  cfg = model.config
  sd = {k: v.clone() for k, v in model.state_dict().items()}
  out = {
      "cls_token": sd["embeddings.cls_token"],
      "pos_embed": sd["embeddings.position_embeddings"],
      "mask_token": sd["embeddings.mask_token"],
      "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
      "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
      "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
  }
  if "embeddings.register_tokens" in sd:
    out["register_tokens"] = sd["embeddings.register_tokens"]
  for i in range(cfg.num_hidden_layers):
    hf, meta = f"encoder.layer.{i}.", f"blocks.{i}."
    for part in ("weight", "bias"):
      for n in ("norm1", "norm2"):
        out[f"{meta}{n}.{part}"] = sd[f"{hf}{n}.{part}"]
      out[f"{meta}attn.qkv.{part}"] = torch.cat(
          [sd[f"{hf}attention.{p}_proj.{part}"] for p in "qkv"])
      out[f"{meta}attn.proj.{part}"] = sd[f"{hf}attention.o_proj.{part}"]
      if cfg.use_swiglu_ffn:
        out[f"{meta}mlp.w12.{part}"] = torch.cat(
            [sd[f"{hf}mlp.gate_proj.{part}"], sd[f"{hf}mlp.up_proj.{part}"]])
        out[f"{meta}mlp.w3.{part}"] = sd[f"{hf}mlp.down_proj.{part}"]
      else:
        for n in ("fc1", "fc2"):
          out[f"{meta}mlp.{n}.{part}"] = sd[f"{hf}mlp.{n}.{part}"]
    out[f"{meta}ls1.gamma"] = sd[f"{hf}layer_scale1.lambda1"]
    out[f"{meta}ls2.gamma"] = sd[f"{hf}layer_scale2.lambda1"]
  return out


@pytest.fixture(scope="module")
def meta_files(references, tmp_path_factory):
  root = tmp_path_factory.mktemp("meta")
  files = {}
  for name in ("tiny_mlp", "tiny_swiglu_reg"):
    files[name] = root / f"dinov2_{name}_pretrain.pth"
    torch.save(_meta_state_dict(references[name][0]), files[name])
  return files


def _assert_same_params(a, b):
  pa, _ = weights.load(a, "dinov2")
  pb, _ = weights.load(b, "dinov2")
  assert sorted(pa) == sorted(pb)
  for key in pa:
    np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)


@pytest.mark.parametrize("name", ["tiny_mlp", "tiny_swiglu_reg"])
def test_meta_pth_gives_identical_params(references, meta_files, tmp_path, name):
  hf_dir = references[name][1]
  dst = tmp_path / "meta"
  heads = str(references[name][0].config.num_attention_heads)
  assert convert_dinov2.main(["--src", str(meta_files[name]), "--dst", str(dst),
                              "--num-heads", heads]) == 0
  _assert_same_params(dst, hf_dir)
  meta_cfg, hf_cfg = dinov2.load(dst).config, dinov2.load(hf_dir).config
  assert json.loads((dst / "config.json").read_text())["source_format"] == "meta"
  if name == "tiny_mlp":  # Meta's hub offset without registers; HF resizes by size
    assert (meta_cfg.interpolate_offset, meta_cfg.interpolate_antialias) == (0.1, False)
    assert (hf_cfg.interpolate_offset, hf_cfg.interpolate_antialias) == (0.0, False)
  else:  # with registers both resize by size, antialiased
    assert meta_cfg == hf_cfg
  # At the native grid no resize happens: identical features.
  _, _, layers, sizes = REFERENCES[name]
  images = np.random.default_rng(1).standard_normal((1, 56, 56, 3)).astype(np.float32)
  for a, b in zip(_features(dinov2.load(dst), images, layers),
                  _features(dinov2.load(hf_dir), images, layers)):
    np.testing.assert_array_equal(a, b)
  # --pos-interpolation hf reproduces the HF config from the Meta file.
  again = tmp_path / "meta_as_hf"
  convert_dinov2.convert(str(meta_files[name]), str(again), num_heads=int(heads),
                         pos_interpolation="hf")
  assert (dinov2.load(again).config.interpolate_offset,
          dinov2.load(again).config.interpolate_antialias) == (
              hf_cfg.interpolate_offset, hf_cfg.interpolate_antialias)


def test_other_layouts_give_identical_params(references, meta_files, tmp_path):
  """transformers' module names (a torch-saved state_dict) and Meta's chunked
  blocks (block_chunks > 0: blocks.C.N.*) convert to the same parameters."""
  model, hf_dir = references["tiny_swiglu_reg"]
  torch.save(model.state_dict(), tmp_path / "modules.pth")
  convert_dinov2.convert(str(tmp_path / "modules.pth"), str(tmp_path / "modules"),
                         num_heads=2)
  _assert_same_params(tmp_path / "modules", hf_dir)
  sd = torch.load(meta_files["tiny_mlp"], weights_only=True)
  chunked = {(f"blocks.{int(k.split('.')[1]) // 2}.{k[len('blocks.'):]}"
              if k.startswith("blocks.") else k): v for k, v in sd.items()}
  assert "blocks.1.2.norm1.weight" in chunked
  torch.save(chunked, tmp_path / "chunked.pth")
  convert_dinov2.convert(str(tmp_path / "chunked.pth"), str(tmp_path / "chunked"),
                         num_heads=4)
  _assert_same_params(tmp_path / "chunked", references["tiny_mlp"][1])


def test_meta_released_shapes_infer_the_variant(tmp_path):
  """A hub-shaped file needs no head count; the hub's resize is recorded."""
  sd = {"cls_token": torch.zeros(1, 1, 384), "pos_embed": torch.zeros(1, 1370, 384),
        "register_tokens": torch.zeros(1, 4, 384), "mask_token": torch.zeros(1, 384),
        "patch_embed.proj.weight": torch.zeros(384, 3, 14, 14),
        "patch_embed.proj.bias": torch.zeros(384),
        "norm.weight": torch.ones(384), "norm.bias": torch.zeros(384)}
  for i in range(12):
    b = f"blocks.{i}."
    sd.update({b + "norm1.weight": torch.ones(384), b + "norm1.bias": torch.zeros(384),
               b + "norm2.weight": torch.ones(384), b + "norm2.bias": torch.zeros(384),
               b + "attn.qkv.weight": torch.zeros(1152, 384), b + "attn.qkv.bias": torch.zeros(1152),
               b + "attn.proj.weight": torch.zeros(384, 384), b + "attn.proj.bias": torch.zeros(384),
               b + "ls1.gamma": torch.ones(384), b + "ls2.gamma": torch.ones(384),
               b + "mlp.fc1.weight": torch.zeros(1536, 384), b + "mlp.fc1.bias": torch.zeros(1536),
               b + "mlp.fc2.weight": torch.zeros(384, 1536), b + "mlp.fc2.bias": torch.zeros(384)})
  torch.save(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
  convert_dinov2.convert(str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"), str(tmp_path / "o"))
  assert dinov2.load(tmp_path / "o").config == dinov2.VARIANTS["vits14_reg"]


# -------------------------------------------------------------- bad input

def _assert_fails(tmp_path, src, match, num_heads=None):
  dst = tmp_path / "dst"
  argv = ["--src", str(src), "--dst", str(dst)]
  argv += ["--num-heads", str(num_heads)] if num_heads else []
  with pytest.raises(convert_dinov2.ConversionError, match=match):
    convert_dinov2.convert(str(src), str(dst), num_heads=num_heads)
  assert convert_dinov2.main(argv) == 2
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
  src = _save_variant(tmp_path, "missing", tiny_meta, lambda sd: sd.pop("blocks.1.ls2.gamma"))
  _assert_fails(tmp_path, src, r"missing source keys: \['blocks.1.ls2.gamma'\]", num_heads=4)
  assert "blocks.1.ls2.gamma" in capsys.readouterr().err
  src = _save_variant(tmp_path, "extra", tiny_meta,
                      lambda sd: sd.update({"blocks.0.attn.extra": torch.zeros(3)}))
  _assert_fails(tmp_path, src, r"unexpected source keys: \['blocks.0.attn.extra'\]", num_heads=4)
  src = _save_variant(tmp_path, "shape", tiny_meta,
                      lambda sd: sd.update({"norm.bias": torch.zeros(65)}))
  _assert_fails(tmp_path, src, r"mis-shaped parameters: norm/bias", num_heads=4)
  src = _save_variant(tmp_path, "grid", tiny_meta,
                      lambda sd: sd.update({"pos_embed": torch.zeros(1, 16, 64)}))
  _assert_fails(tmp_path, src, "not a square grid", num_heads=4)
  _assert_fails(tmp_path, tmp_path / "extra.pth", "pass --num-heads")


def test_error_other_checkpoints(tmp_path):
  dinov3_sd = {"cls_token": torch.zeros(1, 1, 8), "storage_tokens": torch.zeros(1, 4, 8),
               "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}
  torch.save(dinov3_sd, tmp_path / "v3.pth")
  _assert_fails(tmp_path, tmp_path / "v3.pth", "a DINOv3 checkpoint")
  config = transformers.CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       max_position_embeddings=16)
  model = transformers.CLIPTextModel(config)
  model.save_pretrained(tmp_path / "clip_dir")
  _assert_fails(tmp_path, tmp_path / "clip_dir", "model_type 'clip_text_model'")
  torch.save(model.state_dict(), tmp_path / "clip.pth")
  _assert_fails(tmp_path, tmp_path / "clip.pth", "looks like a CLIP checkpoint")


def test_error_truncated_paths_and_existing(tmp_path, meta_files, references, monkeypatch):
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
  _assert_fails(tmp_path, tmp_path / "nope.pth", "no such file or directory")
  import huggingface_hub.constants
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  _assert_fails(tmp_path, "facebook/dinov2-small", "Hugging Face hub failed")
  dst = tmp_path / "existing"
  dst.mkdir()
  with pytest.raises(convert_dinov2.ConversionError, match="--overwrite"):
    convert_dinov2.convert(str(meta_files["tiny_mlp"]), str(dst), num_heads=4)
  assert convert_dinov2.main(["--src", str(meta_files["tiny_mlp"]), "--dst", str(dst),
                              "--num-heads", "4", "--overwrite"]) == 0
  assert dinov2.load(dst).config.depth == 3
