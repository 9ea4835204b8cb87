"""The shared ViT layers: CPU attention paths, and the checks and jit pattern
every backbone family gets from them (run on a tiny model of each family)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adjax.models import dinov2, dinov3, vit

# family -> (module, model class, tiny config, image shapes for the tap test and
# the jit test, bad image shapes)
FAMILIES = {
    "dinov3": (dinov3, dinov3.DinoV3, dinov3.DinoV3Config(64, 4, 4, "mlp", 128, name="tiny"),
               ((2, 32, 64, 3), (2, 48, 32, 3)),
               [(1, 30, 32, 3), (1, 32, 40, 3), (1, 32, 32, 1)]),
    "dinov2": (dinov2, dinov2.DinoV2,
               dinov2.DinoV2Config(64, 4, 4, "mlp", 128, num_registers=4, native_grid=4,
                                   interpolate_offset=0.0, interpolate_antialias=True,
                                   name="tiny"),
               ((2, 28, 42, 3), (2, 42, 28, 3)),
               [(1, 30, 28, 3), (1, 28, 32, 3), (1, 28, 28, 1)]),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
  module, model_cls, config, shapes, bad = FAMILIES[request.param]
  return model_cls, config, module.init_random(config, seed=3), shapes, bad


def test_default_layers():
  assert vit.default_layers(24) == [5, 11, 17, 23]
  assert vit.default_layers(12) == [2, 5, 8, 11]
  assert vit.default_layers(40) == [9, 19, 29, 39]
  assert vit.default_layers(32) == [7, 15, 23, 31]
  assert dinov3.default_layers is dinov2.default_layers is vit.default_layers
  with pytest.raises(ValueError, match="depth 3 < 4"):
    vit.default_layers(3)


def test_shapes_order_and_dtype(family):
  """The scanned runner taps the requested blocks, in the order asked."""
  _, config, tiny, (shape, _), _ = family
  images = jax.random.normal(jax.random.key(0), shape)
  out = tiny.get_intermediate_layers(images, [3, 0, -1, 1])
  p = config.patch_size
  tokens = config.num_prefix_tokens + (shape[1] // p) * (shape[2] // p)
  assert [o.shape for o in out] == [(2, tokens, 64)] * 4
  assert all(o.dtype == jnp.float32 for o in out)
  np.testing.assert_array_equal(out[0], out[2])  # 3 and -1 are the same block
  assert not np.allclose(out[0], out[1])
  # Requesting a block alone gives the same features as requesting it with others.
  alone = tiny.get_intermediate_layers(images, [1])[0]
  np.testing.assert_allclose(alone, out[3], atol=1e-6)


def test_bad_image_shape(family):
  _, config, tiny, _, bad = family
  for shape in bad:
    with pytest.raises(ValueError, match=f"multiples of {config.patch_size}"):
      tiny.get_intermediate_layers(jnp.zeros(shape), [0])


@pytest.mark.parametrize("layers", [[4], [-5], []])
def test_bad_layers(family, layers):
  _, config, tiny, _, _ = family
  p = config.patch_size
  with pytest.raises(ValueError, match="block indices"):
    tiny.get_intermediate_layers(jnp.zeros((1, p, p, 3)), layers)


def test_jit_split_merge_and_bf16(family):
  """The frozen-backbone pattern of the train step, in float32 and bfloat16."""
  model_cls, config, tiny, (_, shape), _ = family
  images = jax.random.normal(jax.random.key(1), shape)
  graphdef, state = nnx.split(tiny)

  @jax.jit
  def features(state, images):
    return nnx.merge(graphdef, state).get_intermediate_layers(images, [1, 3])

  f32 = features(state, images)
  eager = tiny.get_intermediate_layers(images, [1, 3])
  for a, b in zip(f32, eager):
    np.testing.assert_allclose(a, b, atol=1e-5)

  bf16_model = model_cls(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  nnx.update(bf16_model, nnx.state(tiny))
  bf16 = bf16_model.get_intermediate_layers(images, [1, 3])
  for a, b in zip(bf16, f32):
    assert a.dtype == jnp.float32
    a, b = np.asarray(a).reshape(-1, 64), np.asarray(b).reshape(-1, 64)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() >= 0.999
    assert not np.array_equal(a, b)  # bfloat16 really was used


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_attention_matches_dot_product_attention(dtype):
  """The CPU attention path computes what jax.nn.dot_product_attention does."""
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 37, 4, 16)).astype(dtype)
  ours = vit.attention(q, k, v).astype(jnp.float32)
  ref = jax.nn.dot_product_attention(q, k, v).astype(jnp.float32)
  np.testing.assert_allclose(ours, ref, atol=1e-5 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize("budget", [37 * 37 * 4, 2 * 37 * 37 * 4])
def test_cpu_attention_loop_over_head_groups(monkeypatch, budget):
  """With a small logits budget the CPU path loops over groups of (image, head)
  pairs (one or two per step) and still computes the same attention."""
  monkeypatch.setattr(vit, "CPU_ATTENTION_LOGITS_BYTES", budget)
  q, k, v = jax.random.normal(jax.random.key(1), (3, 2, 37, 4, 16))
  ours = vit.attention(q, k, v)
  ref = jax.nn.dot_product_attention(q, k, v)
  np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("budget", [37 * 37 * 4, 1 << 30])
def test_cpu_attention_with_a_symbolic_batch(monkeypatch, budget):
  """jax.export with a dynamic batch (the exported model) takes the head-group
  path with the batch inside each step; it computes the same attention."""
  monkeypatch.setattr(vit, "CPU_ATTENTION_LOGITS_BYTES", budget)
  q, k, v = jax.random.normal(jax.random.key(2), (3, 3, 37, 4, 16))
  (b,) = jax.export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((b, 37, 4, 16), jnp.float32)
  exported = jax.export.export(jax.jit(vit.attention))(spec, spec, spec)
  ours = exported.call(q, k, v)
  np.testing.assert_allclose(ours, jax.nn.dot_product_attention(q, k, v), atol=1e-5)


def test_attention_path_chosen_per_platform_in_an_export(monkeypatch, request):
  """An export for cpu,cuda made here carries both paths, each lowered for its
  platform: the CPU path's loop over head groups (a while) for CPU only,
  dot_product_attention for CUDA; the exported function runs the CPU path
  here. Fails if the path is chosen by the tracing process's backend (the
  CUDA lowering would then hold the CPU loop)."""
  # The limit is read when attention is traced, and JAX caches traces (the
  # platform branches' too) across tests: trace afresh with the patched
  # limit, and leave no trace made with it to the tests that follow.
  monkeypatch.setattr(vit, "CPU_ATTENTION_LOGITS_BYTES", 37 * 37 * 4)
  jax.clear_caches()
  request.addfinalizer(jax.clear_caches)
  spec = jax.ShapeDtypeStruct((2, 37, 4, 16), jnp.float32)

  def lowered(platforms):
    return jax.export.export(jax.jit(vit.attention), platforms=platforms)(
        spec, spec, spec).mlir_module()

  assert "stablehlo.while" in lowered(("cpu",))
  assert "stablehlo.while" not in lowered(("cuda",))
  both = jax.export.export(jax.jit(vit.attention), platforms=("cpu", "cuda"))(
      spec, spec, spec)
  assert both.platforms == ("cpu", "cuda")
  text = both.mlir_module()
  assert "stablehlo.while" in text and "stablehlo.case" in text
  q, k, v = jax.random.normal(jax.random.key(3), (3, 2, 37, 4, 16))
  np.testing.assert_allclose(both.call(q, k, v), jax.nn.dot_product_attention(q, k, v),
                             atol=1e-5)
  # A converter without platforms (ONNX) gets one path, with no switch (traced
  # afresh, as the exporter's closure is: a cached trace keeps what it held).
  with vit.attention_for("cuda"):
    jaxpr = str(jax.make_jaxpr(lambda *a: vit.attention(*a))(q, k, v))
  assert "platform_index" not in jaxpr and "scan" not in jaxpr
  with vit.attention_for("cpu"):
    jaxpr = str(jax.make_jaxpr(lambda *a: vit.attention(*a))(q, k, v))
  assert "platform_index" not in jaxpr and "scan" in jaxpr     # lax.map's loop
