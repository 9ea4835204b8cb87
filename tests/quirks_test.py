"""The release's quirks (SPEC section 9) reach the code that reads them.

`reference_quirks` switches four named behaviours of `ADModel.behaviour`
together. Each test builds its objects from the demo config through the
entry point a run uses, with the switch on and off, and checks that the two
settings differ and that "on" equals the release's formula, computed here
independently (numpy / torch / PIL).
"""

import csv
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

from adjax.config import schema
from adjax import towers, train
from adjax.data import targets as datasets
from adjax.models import prompts
from adjax.common import sharding
from adjax.ad_model import ADModel, Behaviour, Features
from adjax.models import backbones, clip_text, dinov3
from converters import clip_text as convert_clip
from demo_run import apply_overrides, demo_config

# A tiny backbone description: ADModel needs the contract's facts, not weights.
TINY = dinov3.DinoV3Config(dim=32, depth=4, num_heads=2, ffn="mlp", ffn_hidden=64,
                           name="tiny")
INFO = backbones.describe("dinov3", TINY)
TEXT_DIM = 16


def _cfg(quirks: bool, **overrides):
  c = demo_config()
  c.reference_quirks = quirks
  c.backbone.layers = (0, 1, 2, 3)
  c.image_size = 48
  return apply_overrides(c, overrides)


def _model(quirks: bool, **overrides) -> ADModel:
  return ADModel.create(schema.from_configdict(_cfg(quirks, **overrides)).model, INFO, TEXT_DIM)


def test_switch_sets_all_four_behaviours():
  """Fails if `Behaviour.of` stops following `reference_quirks` for one of them."""
  assert _model(True).behaviour == Behaviour(True, True, True, True)
  assert _model(False).behaviour == Behaviour(False, False, False, False)


# ------------------------------------------------------ 1. mix_text_columns


def _leaky(x):
  return np.where(x > 0, x, 0.01 * x)


def test_mix_text_columns_reaches_model_outputs():
  """Fails if `ADModel.outputs` ignores `behaviour.mix_text_columns` (e.g. passes
  False, or True, to `head.text_features` whatever the config says)."""
  rng = np.random.default_rng(0)
  on, off = _model(True), _model(False)
  params = nnx.split(on.new_head(0))[1]
  head = nnx.merge(on.head_def(), params)
  num_layers, batch, n = len(on.layers), 3, on.grid[0] * on.grid[1]
  feats = Features(jnp.asarray(rng.normal(size=(num_layers, batch, n, TINY.dim)), jnp.float32),
                   jnp.asarray(rng.normal(size=(num_layers, batch, TINY.dim)), jnp.float32))
  table = rng.normal(size=(4, 2, TEXT_DIM))
  table /= np.linalg.norm(table, axis=-1, keepdims=True)
  category = np.array([2, 0, 3], np.int32)
  out_on = on.outputs(params, feats, jnp.asarray(table, jnp.float32), jnp.asarray(category))
  out_off = off.outputs(params, feats, jnp.asarray(table, jnp.float32), jnp.asarray(category))

  # The release: adapted normal / abnormal features, then
  # torch.cat([T0, T1], 1).reshape(B, E, 2) (per image, from its category).
  k0 = np.asarray(head.text_adapters[0].kernel[...], np.float64)
  k1 = np.asarray(head.text_adapters[1].kernel[...], np.float64)
  text = table[category]
  t0 = torch.from_numpy(_leaky(text[:, 0] @ k0))
  t1 = torch.from_numpy(_leaky(text[:, 1] @ k1))
  release = torch.cat([t0, t1], 1).reshape(batch, TEXT_DIM, 2).numpy()
  clean = np.stack([t0.numpy(), t1.numpy()], axis=-1)
  assert not np.allclose(release, clean, atol=1e-3)

  def head_on(tmat):
    return head(feats.patches, feats.cls, jnp.asarray(tmat, jnp.float32), on.grid, on.out_hw)

  ref_on, ref_off = head_on(release), head_on(clean)
  # Measured float32 error: 2.7e-7 (maps in [0, 1]), 1.9e-6 (logits up to 22).
  for key, atol in (("cross", 1e-6), ("aacm", 1e-6), ("logits", 1e-5)):
    np.testing.assert_allclose(out_on[key], ref_on[key], rtol=0, atol=atol, err_msg=key)
    np.testing.assert_allclose(out_off[key], ref_off[key], rtol=0, atol=atol, err_msg=key)
  # The switch changes what the model computes (measured: 0.66 on the map, 11.5
  # on the logits; the aacm map does not read the text).
  assert np.abs(np.asarray(out_on["cross"]) - np.asarray(out_off["cross"])).max() > 1e-2
  assert np.abs(np.asarray(out_on["logits"]) - np.asarray(out_off["logits"])).max() > 1e-1


# -------------------------------------------------------- 2. text_exact_gelu


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
  """A tiny random quick_gelu CLIP text tower (transformers), converted; with
  weights large enough that GELU and QuickGELU give visibly different features."""
  root = tmp_path_factory.mktemp("clip")
  vocab = clip_text.write_byte_level_tokenizer(root / "hf")
  config = transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
      hidden_act="quick_gelu", bos_token_id=vocab - 2, eos_token_id=vocab - 1,
      pad_token_id=vocab - 1)
  torch.manual_seed(0)
  hf = transformers.CLIPTextModelWithProjection(config).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      # Larger MLP inputs: the two activations differ by ~0.03 x^2 near 0.
      p.add_((0.2 if "fc1" in name else 0.05) * torch.randn(p.shape, generator=gen))
  hf.save_pretrained(root / "hf")
  convert_clip.convert(root / "hf", root / "converted")
  return root / "converted", hf


def _torch_table(hf, activation, tokenizer, name):
  """The release's prompt-ensemble embedding of one object, in torch: each
  sentence's normalised projected EOT feature, averaged per state group,
  normalised again."""
  config = transformers.CLIPTextConfig.from_dict(dict(hf.config.to_dict(), hidden_act=activation))
  model = transformers.CLIPTextModelWithProjection(config).eval()
  model.load_state_dict(hf.state_dict())
  rows = []
  for group in prompts.prompt_sentences(name):
    ids = clip_text.tokenize(tokenizer, group, hf.config.max_position_embeddings)
    with torch.no_grad():
      feats = model(input_ids=torch.from_numpy(np.asarray(ids)).long()).text_embeds.double()
    feats = feats / feats.norm(dim=-1, keepdim=True)
    mean = feats.mean(0)
    rows.append((mean / mean.norm()).numpy())
  return np.stack(rows)


def test_text_exact_gelu_reaches_text_tower(clip_checkpoint, tmp_path):
  """Fails if `towers.build_text` ignores `behaviour.text_exact_gelu` (loads the
  checkpoint's quick_gelu under the quirks), or if the text cache returns one
  setting's embeddings for the other (both settings share one cache dir)."""
  path, hf = clip_checkpoint
  prompts.clear_memory_cache()
  tables, embedders = {}, {}
  for quirks in (True, False):
    cfg = _cfg(quirks, **{"text.random_init": False, "text.checkpoint": str(path),
                          "text.cache_dir": str(tmp_path / "text_cache")})
    embedders[quirks] = towers.build_text(cfg, tmp_path / "work")
    tables[quirks] = embedders[quirks](["bottle"])[0]
  tok = embedders[True].tokenizer
  ref_gelu = _torch_table(hf, "gelu", tok, "bottle")         # exact erf GELU
  ref_quick = _torch_table(hf, "quick_gelu", tok, "bottle")
  # Measured error against torch: 3.3e-8 (on), 2.8e-8 (off); tolerance 2e-7.
  np.testing.assert_allclose(tables[True], ref_gelu, rtol=0, atol=2e-7)
  np.testing.assert_allclose(tables[False], ref_quick, rtol=0, atol=2e-7)
  # The two activations give different embeddings (measured max difference 2.2e-3).
  assert np.abs(ref_gelu - ref_quick).max() > 1e-3
  assert np.abs(tables[True] - tables[False]).max() > 1e-3
  assert embedders[True].model.config.activation == "gelu"
  assert embedders[False].model.config.activation == "quick_gelu"
  # One cache file per setting; read back from disk, each keeps its own values.
  assert len(list((tmp_path / "text_cache").glob("*.npy"))) == 2
  prompts.clear_memory_cache()
  for quirks in (True, False):
    np.testing.assert_array_equal(embedders[quirks](["bottle"])[0], tables[quirks])


# -------------------------------------------------- 3. visa_mask_strict_zero

VISA_SIZE = 32
# 64 px masks resized to 32: a region edge at an odd row / column falls between
# output pixels. (With VisA's label value 1, PIL's two passes round to uint8
# in between, so at other ratios the two thresholds rarely differ.)
RAW_HW = (64, 64)


def _png(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def visa_root(tmp_path_factory):
  """A tiny folder in VisA's layout (split_csv/1cls.csv), masks holding label 1."""
  root = tmp_path_factory.mktemp("visa") / "VisA_20220922"
  rng = np.random.default_rng(0)
  rows, masks = [], {}
  h, w = RAW_HW
  for i in range(2):
    rel = f"candle/Data/Images/Normal/{i:04d}.JPG"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / rel, "JPEG")
    rows.append(["candle", "test", "normal", rel, ""])
    masks[rel] = np.zeros((h, w), np.uint8)
  for i, (y, x, dy, dx) in enumerate([(5, 7, 9, 11), (20, 3, 17, 6), (0, 41, 4, 7)]):
    rel = f"candle/Data/Images/Anomaly/{i:03d}.JPG"
    mrel = f"candle/Data/Masks/Anomaly/{i:03d}.png"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / mrel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / rel, "JPEG")
    raw = np.zeros((h, w), np.uint8)
    raw[y:y + dy, x:x + dx] = 1     # VisA stores small label values
    (root / mrel).write_bytes(_png(raw))
    rows.append(["candle", "test", "anomaly", rel, mrel])
    masks[rel] = raw
  (root / "split_csv").mkdir()
  with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
    csv.writer(f).writerows([["object", "split", "label", "image", "mask"], *rows])
  return root, masks


def _pil_bilinear(a: np.ndarray) -> np.ndarray:
  return np.asarray(Image.fromarray(a, "L").resize((VISA_SIZE, VISA_SIZE), Image.BILINEAR),
                    np.float64)


def _loaded_masks(quirks, root, data_dir):
  cfg = _cfg(quirks, **{"image_size": VISA_SIZE, "data.data_dir": str(data_dir)})
  cfg.data.manual_dirs.visa = str(root)
  cfg = schema.from_configdict(cfg)
  handle = datasets.prepare(cfg, "visa")
  model = ADModel.create(cfg.model, INFO, TEXT_DIM)
  out = {}
  for batch in datasets.loader(cfg, handle, model, batch_size=2, train=False):
    for path, mask, valid in zip(batch["path"], batch["mask"], batch["valid"]):
      if valid:
        out[str(path)] = mask
  return out


def test_visa_mask_strict_zero_reaches_loader(visa_root, tmp_path):
  """Fails if `datasets.loader` ignores `behaviour.visa_mask_strict_zero` for VisA
  (masks binarised to 0/255 and thresholded at 0.5 under the quirks)."""
  root, raw = visa_root
  on = _loaded_masks(True, root, tmp_path / "dd")
  off = _loaded_masks(False, root, tmp_path / "dd")
  assert len(on) == len(off) == len(raw)
  grown = 0
  for rel, mask in raw.items():
    key = next(k for k in on if k.endswith(rel))
    # The release: PIL bilinear resize of the raw mask (values 0 / 1), then > 0.
    release = (_pil_bilinear(mask) > 0).astype(np.float32)
    clean = (_pil_bilinear((mask != 0).astype(np.uint8) * 255) / 255 > 0.5).astype(np.float32)
    np.testing.assert_array_equal(on[key], release, err_msg=rel)
    np.testing.assert_array_equal(off[key], clean, err_msg=rel)
    # > 0 grows each region by pixels the 0.5 threshold leaves out.
    assert np.all(on[key] >= off[key]), rel
    grown += int(on[key].sum() > off[key].sum())
  assert grown == 3   # every anomaly's mask (measured: 3, 4 and 1 more pixels)


# --------------------------------------------------- 4. first_update_lr_zero


def test_first_update_lr_zero_reaches_training_optimizer():
  """Fails if `train._new_state_and_optimizer` ignores `behaviour.first_update_lr_zero`
  (the run's optimiser taking a non-zero first step under the quirks, or a zero
  one without them)."""
  total = 200
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  results = {}
  for quirks in (True, False):
    cfg = schema.from_configdict(_cfg(quirks))
    model = ADModel.create(cfg.model, INFO, TEXT_DIM)
    state, tx, schedule = train._new_state_and_optimizer(cfg, model, mesh, total)
    params = state["params"]
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    grads = jax.tree.unflatten(
        treedef, [jnp.asarray(rng.normal(size=l.shape), jnp.float32) for l in leaves])
    updates, opt = tx.update(grads, state["opt_state"], params)
    first = optax.apply_updates(params, updates)
    updates, _ = tx.update(grads, opt, first)
    second = optax.apply_updates(first, updates)
    results[quirks] = (cfg, params, grads, first, second, schedule)

  def np_tree(t):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]

  cfg = results[True][0]
  base = cfg.optimizer.learning_rate
  warmup = int(cfg.optimizer.warmup_fraction * total)
  assert warmup == 6 and cfg.optimizer.weight_decay > 0

  def adamw_step(p, g, lr):
    # torch AdamW / optax adamw with the same gradient every step: the bias-
    # corrected moments are g and g^2; decay is decoupled and scaled by lr.
    return p - lr * (g / (np.abs(g) + 1e-8) + cfg.optimizer.weight_decay * p)

  # On: the release's warm-up starts at step 0, so the first update is lr 0 and
  # leaves the parameters bit-identical (weight decay is scaled by lr too); the
  # second uses base / warmup.
  _, params, grads, first, second, schedule = results[True]
  for p, f in zip(np_tree(params), np_tree(first)):
    np.testing.assert_array_equal(f, p)
  assert float(schedule(0)) == 0.0
  assert float(schedule(1)) == pytest.approx(base / warmup, rel=1e-6)
  for p, g, s in zip(np_tree(params), np_tree(grads), np_tree(second)):
    assert np.all(s != p)
    np.testing.assert_allclose(s, adamw_step(p, g, base / warmup), rtol=0, atol=3e-8)

  # Off: the first update already has lr base / warmup. (Measured float32 error
  # of both updates: 9e-9, at parameters up to 0.25; tolerance 3e-8.)
  _, params, grads, first, _, schedule = results[False]
  assert float(schedule(0)) == pytest.approx(base / warmup, rel=1e-6)
  for p, g, f in zip(np_tree(params), np_tree(grads), np_tree(first)):
    assert np.all(f != p)
    np.testing.assert_allclose(f, adamw_step(p, g, base / warmup), rtol=0, atol=3e-8)
