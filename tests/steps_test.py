"""The model module and the jitted steps: loss, learning, sharding equivalence,
cached features, schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adjax import steps
from adjax.common import sharding
from adjax.config import defaults as config_defaults
from adjax.ad_model import ADModel, Behaviour, Features
from adjax.models import backbones, dinov3
from adjax.workdir import feature_cache

TINY = dinov3.DinoV3Config(dim=32, depth=4, num_heads=2, ffn="mlp", ffn_hidden=64,
                           name="tiny")
LAYERS = (0, 1, 2, 3)
SIZE = 48
GRID = (SIZE // TINY.patch_size, SIZE // TINY.patch_size)
TEXT_DIM = 16
NUM_CATEGORIES = 3


def _cfg(lr=1e-3, warmup=0.0, quirks=False):
  c = config_defaults.base_config()
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_fraction = warmup
  c.reference_quirks = quirks
  return c


def _batch(seed=0, b=8):
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, SIZE, SIZE), np.float32)
  for i in range(b // 2, b):
    y, x = rng.integers(0, SIZE - 12, 2)
    mask[i, y:y + 12, x:x + 12] = 1
  images = rng.integers(0, 200, size=(b, SIZE, SIZE, 3)).astype(np.uint8)
  images[mask > 0] += 50
  return {"image": images, "mask": mask, "label": (mask.sum((1, 2)) > 0).astype(np.int32),
          "category_index": rng.integers(0, NUM_CATEGORIES, b).astype(np.int32),
          "has_mask": np.ones(b, bool)}


@pytest.fixture(scope="module")
def parts():
  backbone = dinov3.init_random(TINY, seed=0)
  backbone_def, backbone_state = nnx.split(backbone)
  text = np.random.default_rng(1).normal(size=(NUM_CATEGORIES, 2, TEXT_DIM))
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  return dict(backbone=backbone, backbone_def=backbone_def, backbone_state=backbone_state,
              params=nnx.split(_model(False).new_head(0))[1],
              text=jnp.asarray(text, jnp.float32))


def _model(quirks: bool) -> ADModel:
  return ADModel(backbones.describe("dinov3", TINY), LAYERS, SIZE, TEXT_DIM,
                 Behaviour(quirks, quirks, quirks, quirks))


def _steps(parts, cfg, total=10, mesh=None, state_sharding=None, backbone_sharding=None,
           **kw):
  tx, schedule = steps.make_optimizer(cfg.optimizer, total, bool(cfg.reference_quirks))
  builder = steps.StepBuilder(_model(cfg.reference_quirks), parts["backbone_def"], tx=tx,
                              schedule=schedule, mesh=mesh, state_sharding=state_sharding,
                              backbone_sharding=backbone_sharding)
  return tx, builder.train_step(**kw)


@pytest.fixture(scope="module")
def default_steps(parts):
  """(optimiser, step from images, step from features) of the default test
  config, compiled once for the tests that share them."""
  cfg = _cfg()
  tx, from_images = _steps(parts, cfg, from_features=False)
  _, from_features = _steps(parts, cfg, from_features=True)
  return tx, from_images, from_features


def _fresh_state(parts, tx):
  return steps.init_state(jax.tree.map(jnp.copy, parts["params"]), tx)


def test_normalize_uses_the_backbones_statistics():
  rgb = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
  ref = (rgb.astype(np.float32) / 255 - np.array([0.485, 0.456, 0.406])) / np.array(
      [0.229, 0.224, 0.225])
  np.testing.assert_allclose(_model(False).normalize(jnp.asarray(rgb)), ref, atol=1e-6)
  floats = jnp.asarray(ref, jnp.float32)   # floating input: taken as normalised
  np.testing.assert_array_equal(_model(False).normalize(floats), floats)


def test_public_loss_is_differentiable_and_matches_the_step(parts):
  """`ADModel.loss` from images equals the loss from features, and has a
  finite, non-zero gradient for every adapter."""
  model = _model(True)
  batch = {k: jnp.asarray(v) for k, v in _batch(5).items()}
  backbone = parts["backbone"]
  feats = jax.jit(lambda x: model.features(backbone, x))(batch["image"])
  loss_img, parts_img = jax.jit(
      lambda p, x: model.loss(p, x, parts["text"], batch, backbone=backbone))(
          parts["params"], batch["image"])
  loss_feat, _ = jax.jit(lambda p, f: model.loss(p, f, parts["text"], batch))(
      parts["params"], feats)
  np.testing.assert_allclose(float(loss_img), float(loss_feat), rtol=1e-6)
  assert set(parts_img) == {"focal_aacm", "dice_aacm", "focal_cross", "dice_cross",
                            "ce_global"}
  grads = jax.jit(jax.grad(lambda p: model.loss(p, feats, parts["text"], batch)[0]))(
      parts["params"])
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert len(norms) == 10 and all(n > 0 and np.isfinite(n) for n in norms)
  with pytest.raises(ValueError, match="backbone"):
    model.loss(parts["params"], batch["image"], parts["text"], batch)


def test_image_scores(parts):
  """`anomaly` gives the cross-modal map and the configured image score:
  `global` (the global head's "abnormal" probability), `max` (the map's peak)
  or `mean` of the two."""
  import dataclasses
  kinds = ("global", "max", "mean")
  models = {k: dataclasses.replace(_model(False), image_score=k) for k in kinds}
  batch = _batch(2, b=4)
  backbone, text = parts["backbone"], parts["text"]
  images, cats = jnp.asarray(batch["image"]), jnp.asarray(batch["category_index"])
  got = jax.jit(lambda p: {k: m.anomaly(p, backbone, text, images, cats)
                           for k, m in models.items()})(parts["params"])
  model = models["global"]
  out = jax.jit(lambda p: model.outputs(p, model.features(backbone, images), text, cats))(
      parts["params"])
  prob = np.asarray(jax.nn.softmax(out["logits"], -1))[:, 1]
  peak = np.asarray(out["cross"]).max(axis=(1, 2))
  want = {"global": prob, "max": peak, "mean": (prob + peak) / 2}
  assert not np.allclose(prob, peak)
  for kind, (amap, score) in got.items():
    np.testing.assert_allclose(np.asarray(score), want[kind], rtol=1e-5, atol=1e-6,
                               err_msg=kind)
    np.testing.assert_allclose(np.asarray(amap), np.asarray(out["cross"]), atol=1e-6)


def test_model_rejects_what_does_not_fit():
  info = backbones.describe("dinov3", TINY)
  with pytest.raises(backbones.BackboneError, match="image_size=50"):
    ADModel(info, LAYERS, 50, TEXT_DIM)
  with pytest.raises(backbones.BackboneError, match=r"backbone.layers=\(0, 9\)"):
    ADModel(info, (0, 9), SIZE, TEXT_DIM)
  with pytest.raises(backbones.BackboneError, match="eval.image_score='peak'"):
    ADModel(info, LAYERS, SIZE, TEXT_DIM, image_score="peak")


def test_one_step_lowers_the_loss(parts, default_steps):
  tx, step, _ = default_steps
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  state = _fresh_state(parts, tx)
  state, m0 = step(state, parts["backbone_state"], parts["text"], batch)
  state, m1 = step(state, parts["backbone_state"], parts["text"], batch)
  assert float(m1["loss"]) < float(m0["loss"])
  for k in ("focal_cross", "dice_cross", "focal_aacm", "dice_aacm", "ce_global",
            "grad_norm", "param_norm", "lr"):
    assert np.isfinite(float(m0[k])), k
  assert float(m0["grad_norm"]) > 0


def _separable(seed: int, b: int):
  """Features where anomalous cells and images lie along fixed directions:
  half the images anomalous, one anomalous patch cell each; the pixel mask is
  that cell as the head's align-corners upsampling spreads it."""
  from adjax.models import head as head_lib
  rng = np.random.default_rng(seed)
  n, d = GRID[0] * GRID[1], TINY.dim
  label = (np.arange(b) % 2).astype(np.int32)
  cells = np.zeros((b, *GRID), np.float32)
  for i in np.flatnonzero(label):
    cells[i, rng.integers(0, GRID[0]), rng.integers(0, GRID[1])] = 1
  dirs = np.random.default_rng(99).normal(size=(2, d))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  patches = rng.normal(size=(len(LAYERS), b, n, d)) + 3 * cells.reshape(1, b, n, 1) * dirs[0]
  cls = rng.normal(size=(len(LAYERS), b, d)) + 3 * label[None, :, None] * dirs[1]
  spread = head_lib.upsample_align_corners(jnp.asarray(cells[..., None]), (SIZE, SIZE))
  return {"patches": jnp.asarray(patches, jnp.float32), "cls": jnp.asarray(cls, jnp.float32),
          "mask": (spread[..., 0] > 0.5).astype(jnp.float32), "label": jnp.asarray(label),
          "category_index": jnp.asarray(rng.integers(0, NUM_CATEGORIES, b), jnp.int32),
          "has_mask": jnp.ones(b, bool)}


def test_training_teaches_the_maps_and_the_image_score(parts):
  """60 steps on features with a learnable anomaly: on held-out images the
  image score ranks anomalous images first (AUROC 0.49 untrained, 1.00 after;
  limit 0.98) and the map finds the anomalous pixels (0.41 -> 0.90; limit
  0.85). The end-to-end demo cannot show the image level: its random towers'
  cls tokens carry no defect signal (image AUROC about 0.53 trained or not).

  Fails if the image score or the map reads the normal channel, if a loss
  or the update has its sign flipped, or if labels or masks are inverted.
  """
  from sklearn.metrics import roc_auc_score
  model = _model(False)
  tx, step = _steps(parts, _cfg(lr=1e-2), total=60, from_features=True)
  held_out = _separable(100, 64)
  feats = Features(held_out["patches"], held_out["cls"])

  def aurocs(params):
    out = model.outputs(params, feats, parts["text"], held_out["category_index"])
    return (roc_auc_score(np.asarray(held_out["label"]), np.asarray(model.image_scores(out))),
            roc_auc_score(np.asarray(held_out["mask"]).ravel() > 0,
                          np.asarray(out["cross"]).ravel()))

  state = _fresh_state(parts, tx)
  before = aurocs(state["params"])
  for seed in range(60):
    state, _ = step(state, parts["backbone_state"], parts["text"], _separable(seed, 16))
  image, pixel = aurocs(state["params"])
  assert image >= 0.98 and pixel >= 0.85, (before, (image, pixel))


def test_only_the_head_is_optimised(parts):
  cfg = _cfg()
  tx, _ = _steps(parts, cfg, from_features=False)
  state = _fresh_state(parts, tx)
  n_params = len(jax.tree.leaves(parts["params"]))
  assert n_params == 4 + 4 + 2
  # AdamW keeps two moments per trainable leaf (plus scalar counts), nothing else.
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
  assert len(moments) == 2 * n_params


def test_sharded_step_equals_single_device(parts):
  assert jax.device_count() == 8
  cfg = _cfg()
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(-1, 1, devices)
    tx, _ = _steps(parts, cfg, from_features=False)
    state = jax.device_put(_fresh_state(parts, tx), sharding.replicated(mesh))
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    bstate = jax.device_put(parts["backbone_state"], sharding.replicated(mesh))
    _, step = _steps(parts, cfg, from_features=False, mesh=mesh,
                     state_sharding=state_sharding,
                     backbone_sharding=jax.tree.map(lambda x: x.sharding, bstate))
    text = jax.device_put(parts["text"], sharding.replicated(mesh))
    losses = []
    for seed in (0, 1):
      batch = sharding.global_batch(_batch(seed), mesh)
      state, m = step(state, bstate, text, batch)
      losses.append(float(m["loss"]))
    results.append((jax.device_get(state["params"]), losses))
  (p1, l1), (p8, l8) = results
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


# The loss after one step from images and one from stored features, against
# images twice. Measured relative differences: float32 storage 7.6e-8,
# bfloat16 storage 2.5e-4; the limits are 13x and 4x those.
@pytest.mark.parametrize("cache_dtype,rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-3)])
def test_cached_features_follow_the_uncached_run(parts, default_steps, cache_dtype, rtol):
  """Step from images (storing features) then from the stored features, vs images twice.

  float32 storage reproduces the uncached run to float rounding; bfloat16
  storage (the default) to bfloat16's rounding of the features (measured
  2.5e-4 relative in the loss). The step that fills the cache trains on the
  stored precision too: its loss and gradient norm equal a step from the
  stored features.

  Fails if the filling step trains on the unrounded features (then a resumed
  run, whose cache starts empty, no longer retraces an uninterrupted one), or
  if the cache stores or returns features in another precision than asked.
  """
  tx, from_images, from_cache = default_steps
  _, filling = _steps(parts, _cfg(), from_features=False, return_features=True,
                      cache_dtype=cache_dtype)
  batch = {k: jnp.asarray(v) for k, v in _batch(3).items()}
  ref = _fresh_state(parts, tx)
  ref, _ = from_images(ref, parts["backbone_state"], parts["text"], batch)
  ref, ref_m = from_images(ref, parts["backbone_state"], parts["text"], batch)

  cache = feature_cache.FeatureCache("memory", 8, 4, GRID[0] * GRID[1], TINY.dim,
                                     "bfloat16" if cache_dtype == jnp.bfloat16 else "float32")
  state = _fresh_state(parts, tx)
  state, fill_m, (patches, cls) = filling(state, parts["backbone_state"], parts["text"], batch)
  assert patches.dtype == cls.dtype == cache_dtype
  cache.put(np.arange(8), np.asarray(patches.astype(jnp.float32)),
            np.asarray(cls.astype(jnp.float32)))
  assert cache.has(np.arange(8))
  p, c = cache.get(np.arange(8))
  np.testing.assert_array_equal(p, np.asarray(patches.astype(jnp.float32)))
  cached_batch = dict(batch, patches=jnp.asarray(p), cls=jnp.asarray(c))
  del cached_batch["image"]
  # The filling step is a step on the stored features: same loss and gradient
  # norm (measured: loss identical, gradient norm 7.9e-8 relative in float32,
  # identical in bfloat16; 1e-6 allows float32 sums in another order).
  _, first_m = from_cache(_fresh_state(parts, tx), parts["backbone_state"], parts["text"],
                          cached_batch)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(float(fill_m[key]), float(first_m[key]), rtol=1e-6, err_msg=key)
  state, m = from_cache(state, parts["backbone_state"], parts["text"], cached_batch)
  np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=rtol)
  if cache_dtype == jnp.float32:
    for a, b in zip(jax.tree.leaves(ref["params"]), jax.tree.leaves(state["params"])):
      np.testing.assert_allclose(a, b, atol=1e-6)


def test_disk_cache_published_only_after_first_epoch(tmp_path):
  rng = np.random.default_rng(0)
  args = ("disk", 4, 2, 3, 5, "bfloat16", tmp_path, "k1")
  patches = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)
  cls = rng.normal(size=(2, 4, 5)).astype(np.float32)
  interrupted = feature_cache.FeatureCache(*args)
  interrupted.put(np.arange(4), patches, cls)
  del interrupted
  # Interrupted before the epoch ended: a new run must not trust it.
  cache = feature_cache.FeatureCache(*args)
  assert not cache.has(np.arange(4))
  cache.put(np.arange(4), patches, cls)
  cache.finish_epoch()
  again = feature_cache.FeatureCache(*args)
  assert again.complete and again.has(np.arange(4))
  p, c = again.get(np.array([2, 0]))
  ref = patches.astype(jnp.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(p, ref[:, [2, 0]])
  # A different key (other backbone, size, layers or data set) is a different cache.
  assert not feature_cache.FeatureCache("disk", 4, 2, 3, 5, "bfloat16", tmp_path, "k2").has(
      np.arange(4))


@pytest.mark.parametrize("quirk", [True, False])
def test_warmup_schedule(quirk):
  sched = steps.lr_schedule(1e-5, 1000, 0.03, first_step_zero=quirk)
  lrs = np.array([float(sched(s)) for s in (0, 1, 29, 30, 500)])
  if quirk:
    np.testing.assert_allclose(lrs, [0, 1e-5 / 30, 29e-5 / 30, 1e-5, 1e-5], rtol=1e-6)
  else:
    np.testing.assert_allclose(lrs, [1e-5 / 30, 2e-5 / 30, 1e-5, 1e-5, 1e-5], rtol=1e-6)


@pytest.mark.parametrize("damage", ["flip", "truncate", "filled"])
def test_damaged_disk_cache_is_reported_and_rebuilt(tmp_path, capsys, damage):
  rng = np.random.default_rng(0)
  args = ("disk", 4, 2, 3, 5, "bfloat16", tmp_path, "k1")
  cache = feature_cache.FeatureCache(*args)
  cache.put(np.arange(4), rng.normal(size=(2, 4, 3, 5)), rng.normal(size=(2, 4, 5)))
  cache.finish_epoch()
  del cache
  path = tmp_path / "k1" / "patches.npy"
  if damage == "flip":         # one stored value changed on disk
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x40
    path.write_bytes(bytes(raw))
  elif damage == "truncate":
    path.write_bytes(path.read_bytes()[:-10])
  else:                        # an index file from elsewhere
    np.save(tmp_path / "k1" / "filled.npy", np.ones(7, bool))
  again = feature_cache.FeatureCache(*args)
  assert not again.complete and not again.has(np.arange(4))
  out = capsys.readouterr().out
  assert f"feature cache {tmp_path / 'k1'} is damaged" in out
  # It is rebuilt in place and then trusted again.
  again.put(np.arange(4), np.ones((2, 4, 3, 5)), np.ones((2, 4, 5)))
  again.finish_epoch()
  assert feature_cache.FeatureCache(*args).complete
