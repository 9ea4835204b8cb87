"""DINOv3 model: the variant table, random init, RoPE tables, bench counts (the
shared layers and checks: vit_test.py)."""

import copy
import dataclasses

import numpy as np
import pytest
from flax import nnx

from adjax.models import dinov3, weights

TINY = dinov3.DinoV3Config(64, 4, 4, "mlp", 128, name="tiny")


# Parameter counts published with the DINOv3 release (millions, rounded).
PUBLISHED_MILLIONS = {"vits16": 21, "vits16plus": 29, "vitb16": 86, "vitl16": 300,
                      "vith16plus": 840, "vit7b16": 6716}


@pytest.mark.parametrize("name", sorted(dinov3.VARIANTS))
def test_every_variant_builds_abstractly(name):
  config = dinov3.VARIANTS[name]
  model = nnx.eval_shape(lambda: dinov3.DinoV3(config, rngs=nnx.Rngs(0)))
  shapes = weights.param_shapes(model)
  assert ("blocks/attn/q_bias" in shapes) == config.qkv_bias
  assert shapes["blocks/attn/qkv/kernel"] == (config.depth, config.dim, 3 * config.dim)
  count = sum(int(np.prod(s)) for s in shapes.values())
  if name in PUBLISHED_MILLIONS:
    assert abs(count / 1e6 - PUBLISHED_MILLIONS[name]) / PUBLISHED_MILLIONS[name] < 0.03


@pytest.fixture(scope="module")
def tiny():
  return dinov3.init_random(TINY, seed=3)


def test_random_init_is_realistic(tiny):
  ls = np.asarray(tiny.blocks.ls1[...])
  assert ls.min() >= 1e-5 and ls.max() <= 1e-1 and ls.std() > 0
  assert "rope_periods" not in {p[0] for p, _ in nnx.to_flat_state(nnx.state(tiny, nnx.Param))}


def test_rope_tables():
  """Prefix rows are the identity rotation; patch rows follow SPEC section 2."""
  cfg = dataclasses.replace(TINY, depth=1)
  model = dinov3.init_random(cfg, seed=1)
  cos, sin = model._rope_tables(2, 3)
  np.testing.assert_array_equal(cos[:5], 1.0)
  np.testing.assert_array_equal(sin[:5], 0.0)
  assert cos.shape == (5 + 6, cfg.head_dim)
  # Row angles then column angles, tiled twice (SPEC section 2).
  periods = dinov3.rope_periods(cfg)
  coords_h = 2 * (np.arange(2) + 0.5) / 2 - 1
  coords_w = 2 * (np.arange(3) + 0.5) / 3 - 1
  expect = np.concatenate([2 * np.pi * coords_h[1] / periods,
                           2 * np.pi * coords_w[2] / periods] * 2)
  np.testing.assert_allclose(cos[5 + 1 * 3 + 2], np.cos(expect), atol=1e-6)


def test_bench_flop_count_and_dispatch():
  from adjax.bench import __main__ as bench
  from adjax.bench import backbone
  # ViT-L/16 at 224 is 61.6 G multiply-adds with 197 tokens (the ViT paper's
  # count); DINOv3 has 201 tokens, and attention grows with their square.
  cfg = dinov3.VARIANTS["vitl16"]
  macs = backbone.forward_flops(cfg, 224, 224) / 2
  assert abs(macs / 61.6e9 - 201 / 197) < 0.02
  assert backbone.forward_flops(cfg, 224, 224, 12) < backbone.forward_flops(cfg, 224, 224)
  assert bench.main(["no-such-benchmark"]) == 2


def test_bench_cached_step_flops():
  """The adapters' forward and kernel-gradient matmuls dominate the count."""
  from adjax.bench import train as train_bench
  cfg = dinov3.VARIANTS["vitl16"]
  flops = train_bench.cached_step_flops(cfg, 512, 2)
  adapters = 4 * 2 * 2 * (2 * 1024) * 1024 * 768
  assert adapters < flops < 1.05 * adapters
  assert train_bench.cached_step_flops(cfg, 512, 4) > 1.9 * flops


def test_bench_torch_reference_taps_blocks(tmp_path):
  """The --versus torch side returns the same blocks as ours: block k's normed
  output equals the final output of the same weights cut after block k + 1,
  and our converted model's `get_intermediate_layers` (max abs error measured
  1.9e-6; limit 1e-5).

  Fails if the PyTorch side taps the wrong block (hidden_states is offset by
  the embeddings) or leaves out the final norm, so that the benchmark would
  time another computation than ours.
  """
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import torch
  from adjax.bench import backbone
  from converters import dinov3 as convert_dinov3
  forward = backbone.torch_backbone(TINY, [3, 1], threads=1)
  images = np.random.default_rng(0).standard_normal((2, 32, 48, 3)).astype(np.float32)
  outs = [o.numpy() for o in forward(images)]
  assert [o.shape for o in outs] == [(2, 5 + 6, 64)] * 2
  model = forward.model
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  for out, depth in zip(outs, (4, 2)):
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = depth
    cut = transformers.DINOv3ViTModel(config).eval()
    missing, _ = cut.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    with torch.no_grad():
      want = cut(x).last_hidden_state.numpy()
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)
  model.save_pretrained(tmp_path / "hf")
  assert convert_dinov3.main(["--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "ours")]) == 0
  ours = dinov3.load(tmp_path / "ours").get_intermediate_layers(images, [3, 1])
  for a, b in zip(ours, outs):
    assert np.max(np.abs(np.asarray(a) - b)) <= 1e-5