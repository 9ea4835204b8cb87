"""AD-DINOv3 head and losses against independent numpy / torch computations."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from adjax.models import losses
from adjax.models import head as head_lib


def _np_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_leaky(x):
  return np.where(x > 0, x, 0.01 * x)


def _np_bilinear_align_corners(x, out_h, out_w):
  """Per-pixel loop over the align_corners=True definition. x: [h, w]."""
  h, w = x.shape
  out = np.zeros((out_h, out_w))
  for i in range(out_h):
    sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
    y0 = min(int(np.floor(sy)), h - 2) if h > 1 else 0
    fy = sy - y0
    for j in range(out_w):
      sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
      x0 = min(int(np.floor(sx)), w - 2) if w > 1 else 0
      fx = sx - x0
      y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
      out[i, j] = ((1 - fy) * (1 - fx) * x[y0, x0] + (1 - fy) * fx * x[y0, x1]
                   + fy * (1 - fx) * x[y1, x0] + fy * fx * x[y1, x1])
  return out


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_head(kern, patches, cls, text, grid, out_hw, quirk):
  """Independent float64 forward of SPEC section 5 for one batch."""
  num_layers, batch = patches.shape[:2]
  t0 = _np_leaky(text[:, 0] @ kern["text"][0])
  t1 = _np_leaky(text[:, 1] @ kern["text"][1])
  e = t0.shape[-1]
  if quirk:
    cat = np.concatenate([t0, t1], axis=1)
    tmat = np.zeros((batch, e, 2))
    for j in range(e):
      for c in range(2):
        tmat[:, j, c] = cat[:, 2 * j + c]
  else:
    tmat = np.stack([t0, t1], axis=-1)
  cross = np.zeros((batch, *out_hw, 2))
  aacm = np.zeros((batch, *out_hw, 2))
  logits = np.zeros((batch, 2))
  for l in range(num_layers):
    p = _np_normalize(_np_leaky(patches[l] @ kern["patch"][l]))
    g = _np_normalize(_np_leaky(cls[l] @ kern["cls"][l]))
    for b in range(batch):
      s = 100 * p[b] @ tmat[b]
      up = np.stack([_np_bilinear_align_corners(s[:, c].reshape(grid), *out_hw)
                     for c in range(2)], -1)
      cross[b] += _np_softmax(up)
      a = (10 * p[b] @ g[b]).reshape(grid)
      a = 1 / (1 + np.exp(-_np_bilinear_align_corners(a, *out_hw)))
      aacm[b] += np.stack([1 - a, a], -1)
      logits[b] += 100 * g[b] @ tmat[b]
  return cross / num_layers, aacm / num_layers, logits / num_layers


@pytest.mark.parametrize("quirk", [False, True])
def test_head_matches_numpy(quirk):
  rng = np.random.default_rng(0)
  num_layers, batch, grid, d, e, out_hw = 4, 2, (3, 4), 8, 6, (7, 9)
  n = grid[0] * grid[1]
  head = head_lib.ADHead(d, e, num_layers, rngs=nnx.Rngs(1))
  kern = {
      "patch": [np.asarray(a.kernel[...], np.float64) for a in head.patch_adapters],
      "cls": [np.asarray(a.kernel[...], np.float64) for a in head.cls_adapters],
      "text": [np.asarray(a.kernel[...], np.float64) for a in head.text_adapters],
  }
  patches = rng.normal(size=(num_layers, batch, n, d))
  cls = rng.normal(size=(num_layers, batch, d))
  text = _np_normalize(rng.normal(size=(batch, 2, e)))
  tmat = head.text_features(jnp.asarray(text, jnp.float32), quirk)
  out = head(jnp.asarray(patches, jnp.float32), jnp.asarray(cls, jnp.float32), tmat,
             grid, out_hw)
  cross, aacm, logits = _np_head(kern, patches, cls, text, grid, out_hw, quirk)
  # Channel 1 of each two-channel map (channel 0 is 1 minus it in both).
  np.testing.assert_allclose(cross[..., 0], 1 - cross[..., 1], atol=1e-12)
  # float32 against float64. Measured max abs error: maps 2.2e-7 (values in
  # [0, 1]), logits 1.0e-6 (values up to 15); limits about 5x and 10x that.
  np.testing.assert_allclose(out["cross"], cross[..., 1], rtol=0, atol=1e-6)
  np.testing.assert_allclose(out["aacm"], aacm[..., 1], rtol=0, atol=1e-6)
  np.testing.assert_allclose(out["logits"], logits, rtol=0, atol=1e-5)


def test_quirk_changes_text_columns():
  t0 = jnp.arange(4.0)[None]
  t1 = 10 + jnp.arange(4.0)[None]
  mixed = head_lib.mix_text_columns(t0, t1, True)[0]
  clean = head_lib.mix_text_columns(t0, t1, False)[0]
  np.testing.assert_array_equal(clean[:, 0], t0[0])
  np.testing.assert_array_equal(clean[:, 1], t1[0])
  # Column 0 holds the even elements of [t0; t1]: 0, 2, 10, 12.
  np.testing.assert_array_equal(mixed[:, 0], [0, 2, 10, 12])
  np.testing.assert_array_equal(mixed[:, 1], [1, 3, 11, 13])


@pytest.mark.parametrize("hw_in,hw_out", [((4, 4), (16, 16)), ((3, 5), (8, 13)),
                                          ((32, 32), (512, 512))])
def test_upsample_equals_torch_align_corners(hw_in, hw_out):
  x = np.random.default_rng(1).normal(size=(2, *hw_in, 3)).astype(np.float32)
  ours = head_lib.upsample_align_corners(jnp.asarray(x), hw_out)
  ref = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=hw_out, mode="bilinear",
      align_corners=True).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_standardize_uses_bessel():
  x = np.random.default_rng(2).normal(size=(2, 10, 3)) * 3 + 1
  ref = (x - x.mean(1, keepdims=True)) / (x.std(1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(head_lib.standardize_patches(jnp.asarray(x)), ref,
                             atol=1e-5)


def _np_focal(p, m):
  t = np.clip(np.stack([1 - m, m], -1), 1e-5, 1 - 1e-5)
  pt = (t * p).sum(-1) + 1e-5
  return np.mean(-(1 - pt) ** 2 * np.log(pt))


def _np_dice(p, m):
  ds = []
  for b in range(p.shape[0]):
    ds.append((2 * (p[b, ..., 1] * m[b]).sum() + 1) / (p[b, ..., 1].sum() + m[b].sum() + 1))
  return 1 - np.mean(ds)


def test_losses_match_numpy():
  rng = np.random.default_rng(3)
  b, h, w = 3, 5, 6
  cross = _np_softmax(rng.normal(size=(b, h, w, 2)) * 3)
  a = 1 / (1 + np.exp(-rng.normal(size=(b, h, w))))
  aacm = np.stack([1 - a, a], -1)
  mask = (rng.random((b, h, w)) > 0.7).astype(np.float64)
  mask[0] = 0  # a normal image
  logits = rng.normal(size=(b, 2)) * 5
  label = np.array([0, 1, 1])
  loss, terms = losses.total_loss(
      {"cross": jnp.asarray(cross[..., 1], jnp.float32),
       "aacm": jnp.asarray(aacm[..., 1], jnp.float32),
       "logits": jnp.asarray(logits, jnp.float32)},
      jnp.asarray(mask, jnp.float32), jnp.asarray(label))
  lse = np.log(np.exp(logits).sum(-1))
  ce = np.mean(lse - logits[np.arange(b), label])
  expected = {"focal_aacm": _np_focal(aacm, mask), "dice_aacm": _np_dice(aacm, mask),
              "focal_cross": _np_focal(cross, mask), "dice_cross": _np_dice(cross, mask),
              "ce_global": ce}
  for k, v in expected.items():
    np.testing.assert_allclose(terms[k], v, rtol=1e-5, err_msg=k)
  total = (0.25 * (expected["focal_aacm"] + expected["dice_aacm"])
           + 0.5 * (expected["focal_cross"] + expected["dice_cross"]) + 0.25 * ce)
  np.testing.assert_allclose(loss, total, rtol=1e-5)


def test_images_without_masks_are_left_out_of_map_losses():
  rng = np.random.default_rng(4)
  b, h, w = 4, 5, 6
  cross = jnp.asarray(_np_softmax(rng.normal(size=(b, h, w, 2)))[..., 1], jnp.float32)
  a = jnp.asarray(1 / (1 + np.exp(-rng.normal(size=(b, h, w)))), jnp.float32)
  outputs = {"cross": cross, "aacm": a,
             "logits": jnp.asarray(rng.normal(size=(b, 2)), jnp.float32)}
  mask = jnp.asarray(rng.random((b, h, w)) > 0.6, jnp.float32)
  label = jnp.array([1, 1, 0, 1])
  has_mask = jnp.array([True, False, True, True])
  _, terms = losses.total_loss(outputs, mask, label, has_mask)
  keep = np.flatnonzero(has_mask)
  sub = {k: v[keep] for k, v in outputs.items()}
  _, ref = losses.total_loss(sub, mask[keep], label[keep])
  _, full = losses.total_loss(outputs, mask, label)
  for k in ("focal_aacm", "dice_aacm", "focal_cross", "dice_cross"):
    np.testing.assert_allclose(terms[k], ref[k], rtol=1e-6, err_msg=k)
  np.testing.assert_allclose(terms["ce_global"], full["ce_global"], rtol=1e-6)
  _, ones = losses.total_loss(outputs, mask, label, jnp.ones(b, bool))
  for k in full:
    np.testing.assert_allclose(ones[k], full[k], rtol=1e-6, err_msg=k)
