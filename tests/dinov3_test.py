"""DINOv3 model: the variant table, random init, RoPE tables, bench counts (the
shared layers and checks: vit_test.py)."""

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


def test_bench_torch_reference_taps_blocks():
  """The --versus torch side returns the same blocks and shapes as ours."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from adjax.bench import backbone
  forward = backbone.torch_backbone(TINY, [3, 1], threads=1)
  outs = forward(np.zeros((1, 32, 48, 3), np.float32))
  assert [tuple(o.shape) for o in outs] == [(1, 5 + 6, 64)] * 2
