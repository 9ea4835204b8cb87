"""DINOv2 model: the variant table, bicubic resizing, position embeddings, token
order (the shared layers and checks: vit_test.py)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adjax.models import dinov2, dinov3, weights

TINY = dinov2.DinoV2Config(64, 4, 4, "mlp", 128, num_registers=4, native_grid=4,
                           interpolate_offset=0.0, interpolate_antialias=True, name="tiny")


def test_config_contract():
  assert dinov2.KIND == "dinov2"
  assert dinov2.default_layers(24) == [5, 11, 17, 23]
  assert dinov2.default_layers(40) == [9, 19, 29, 39]
  assert dinov2.PIXEL_MEAN == dinov3.PIXEL_MEAN == (0.485, 0.456, 0.406)
  assert dinov2.PIXEL_STD == dinov3.PIXEL_STD == (0.229, 0.224, 0.225)
  for name, prefix in (("vitl14", 1), ("vitl14_reg", 5), ("vits14_reg", 5)):
    config = dinov2.VARIANTS[name]
    assert (config.num_prefix_tokens, config.cls_index) == (prefix, 0)
  assert (dinov3.VARIANTS["vitl16"].num_prefix_tokens, dinov3.VARIANTS["vitl16"].cls_index) == (5, 0)
  hub = dinov2.VARIANTS["vitb14"], dinov2.VARIANTS["vitb14_reg"]
  assert [(c.interpolate_offset, c.interpolate_antialias) for c in hub] == [(0.1, False),
                                                                          (0.0, True)]
  assert all(c.native_grid == 37 and c.patch_size == 14 for c in dinov2.VARIANTS.values())
  assert dinov2.DinoV2Config(**TINY.to_dict()) == TINY
  with pytest.raises(ValueError, match="ffn"):
    dinov2.DinoV2Config(64, 1, 4, "gelu", 128)


@pytest.mark.parametrize("name", sorted(dinov2.VARIANTS))
def test_every_variant_matches_transformers_parameter_count(name):
  """Same parameters as transformers' model (which also has a mask token)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = dinov2.VARIANTS[name]
  model = nnx.eval_shape(lambda: dinov2.DinoV2(config, rngs=nnx.Rngs(0)))
  shapes = weights.param_shapes(model)
  assert shapes["pos_embed"] == (1 + 37 * 37, config.dim)
  assert ("register_tokens" in shapes) == (config.num_registers > 0)
  kw = dict(hidden_size=config.dim, num_hidden_layers=config.depth,
            num_attention_heads=config.num_heads, image_size=518, patch_size=14,
            use_swiglu_ffn=config.ffn == "swiglu")
  with torch.device("meta"):
    if config.num_registers:
      ref = transformers.Dinov2WithRegistersModel(
          transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **kw))
    else:
      ref = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
  ref_count = sum(p.numel() for p in ref.parameters())
  assert sum(int(np.prod(s)) for s in shapes.values()) + config.dim == ref_count


@pytest.mark.parametrize("n_in", [4, 7, 37])
def test_bicubic_matrix_is_torch_interpolate(n_in):
  """Every mode the references use: by size or scale factor, with or without
  antialias, shrinking, growing and keeping the size; to float32 rounding.

  (Not an output width of 1 with antialias: torch 2.x then repeats the first
  row down the column, a torch quirk no DINOv2 input reaches: 14 px wide.)"""
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(n_in).standard_normal((1, 3, n_in, n_in)).astype(np.float32)
  for gh, gw in [(16, 23), (3, 5), (n_in, n_in), (40, 2), (1, 9), (n_in, 2 * n_in + 1)]:
    for antialias in (False, True):
      for offset in (0.0, 0.1):
        if offset:
          kw = dict(scale_factor=((gh + offset) / n_in, (gw + offset) / n_in))
          sh, sw = kw["scale_factor"]
        else:
          kw, sh, sw = dict(size=(gh, gw)), None, None
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), mode="bicubic",
                                              align_corners=False, antialias=antialias, **kw)
        rh = dinov2.bicubic_matrix(n_in, gh, sh, antialias).astype(np.float64)
        rw = dinov2.bicubic_matrix(n_in, gw, sw, antialias).astype(np.float64)
        ours = np.einsum("Hh,bchw,Ww->bcHW", rh, x, rw)
        np.testing.assert_allclose(ours, ref.numpy(), atol=1e-6,
                                   err_msg=f"{gh}x{gw} aa={antialias} offset={offset}")


@pytest.fixture(scope="module")
def tiny():
  return dinov2.init_random(TINY, seed=3)


def test_position_embeddings(tiny):
  """The native grid uses the table as is; other grids resize the patch rows."""
  table = np.asarray(tiny.pos_embed[...])
  np.testing.assert_array_equal(tiny.position_embeddings(4, 4), table)
  pos = np.asarray(tiny.position_embeddings(3, 6))
  assert pos.shape == (1 + 18, 64)
  np.testing.assert_array_equal(pos[0], table[0])
  grid = table[1:].reshape(4, 4, 64)
  expect = np.einsum("Hh,hwd,Ww->HWd", dinov2.bicubic_matrix(4, 3, None, True), grid,
                     dinov2.bicubic_matrix(4, 6, None, True))
  np.testing.assert_allclose(pos[1:], expect.reshape(18, 64), atol=1e-6)
  # Meta's offset: the scale factor (g + 0.1) / native sets the sampling.
  meta = dinov2.init_random(dataclasses.replace(TINY, interpolate_offset=0.1,
                                                interpolate_antialias=False), seed=3)
  got = np.asarray(meta.position_embeddings(3, 6))[1:]
  expect = np.einsum("Hh,hwd,Ww->HWd", dinov2.bicubic_matrix(4, 3, 3.1 / 4), grid,
                     dinov2.bicubic_matrix(4, 6, 6.1 / 4))
  np.testing.assert_allclose(got, expect.reshape(18, 64), atol=1e-6)


def test_token_order(tiny):
  config = dataclasses.replace(TINY, num_registers=0, depth=1)
  model = dinov2.init_random(config, seed=1)
  assert model.register_tokens is None
  tokens = model.embed(jnp.zeros((1, 56, 56, 3)))
  assert tokens.shape == (1, 1 + 16, 64)
  # Zero images: patch tokens are the patch bias plus the position table.
  pos = np.asarray(model.pos_embed[...])
  np.testing.assert_allclose(tokens[0, 0], np.asarray(model.cls_token[...]) + pos[0], atol=1e-6)
  np.testing.assert_allclose(tokens[0, 1:], np.asarray(model.patch_embed.bias[...]) + pos[1:],
                             atol=1e-6)
  tokens = tiny.embed(jnp.zeros((1, 56, 56, 3)))
  assert tokens.shape == (1, 1 + 4 + 16, 64)
  np.testing.assert_array_equal(tokens[0, 1:5], tiny.register_tokens[...])  # no pos embed


def test_random_init_is_realistic(tiny):
  ls = np.asarray(tiny.blocks.ls1[...])
  assert ls.min() >= 1e-5 and ls.max() <= 1e-1 and ls.std() > 0
  assert np.abs(np.asarray(tiny.blocks.attn.qkv.bias[...])).min() > 0
  assert np.abs(np.asarray(tiny.norm.scale[...]) - 1).max() > 0


