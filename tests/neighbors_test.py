"""adjax.neighbors against a PyTorch re-statement of MuSc's code and brute force.

The torch functions below re-state, step by step, MuSc's (github xrli-U/MuSc)
`models/modules/_LNAMD.py` (LNAMD._embed with PatchMaker / MeanMapper),
`models/modules/_MSM.py` (compute_scores_fast / MSM), the per-r / per-layer
averaging of `models/musc.py` (MuSc.make_category_data) and
`models/modules/_RsCIN.py` (RsCIN / MMO), on square grids as that code
assumes. Non-square grids and the memory bank are checked against a direct
numpy computation.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax
from adjax import neighbors
from adjax.common import sharding

RTOL = 1e-4


# ---- PyTorch re-statement of MuSc ----------------------------------------
def musc_lnamd(layer_tokens: list[torch.Tensor], r: int) -> torch.Tensor:
  """Mirrors _LNAMD.py LNAMD._embed + musc.py's L2 normalisation.
  layer_tokens: per layer [B, 1 + P, D] (a cls token first, as MuSc's input).
  Returns [B, P, L, D]."""
  b = layer_tokens[0].shape[0]
  layers = []
  for feature in layer_tokens:
    feature = feature[:, 1:, :]
    side = int(math.sqrt(feature.shape[1]))
    feature = feature.reshape(feature.shape[0], side, side, feature.shape[2])
    feature = feature.permute(0, 3, 1, 2)
    feature = torch.nn.LayerNorm(list(feature.shape[1:]))(feature)
    layers.append(feature)
  if r != 1:
    padding = int((r - 1) / 2)
    unfolder = torch.nn.Unfold(kernel_size=r, stride=1, padding=padding, dilation=1)
    out = []
    for x in layers:
      u = unfolder(x)
      u = u.reshape(*x.shape[:2], r, r, -1).permute(0, 4, 1, 2, 3)
      out.append(u)
    layers = out
  else:
    layers = [f.reshape(f.shape[0], f.shape[1], -1, 1, 1).permute(0, 2, 1, 3, 4)
              for f in layers]
  layers = [x.reshape(-1, *x.shape[-3:]) for x in layers]
  dim = layer_tokens[0].shape[-1]
  pooled = [F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), dim).squeeze(1) for x in layers]
  feats = torch.stack(pooled, dim=1).reshape(b, -1, len(layer_tokens), dim).detach()
  feats = feats / feats.norm(dim=-1, keepdim=True)
  return feats


def musc_msm(z: torch.Tensor, lo=0.0, hi=0.3) -> torch.Tensor:
  """Mirrors _MSM.py MSM with compute_scores_fast. z [N, P, C] -> [N, P]."""
  n, p, c = z.shape
  rows = []
  for i in range(n):
    ref = torch.cat((z[:i], z[i + 1:]), dim=0)
    d = torch.cdist(z[i:i + 1], ref.reshape(-1, c)).reshape(p, n - 1, p)
    d = torch.min(d, -1)[0]
    k_max, k_min = int(d.shape[1] * hi), int(d.shape[1] * lo)
    vals, _ = torch.topk(d.float(), k_max, largest=False, sorted=True)
    vals, _ = torch.topk(vals.float(), k_max - k_min, largest=True, sorted=True)
    rows.append(torch.mean(vals, dim=1).double())
  return torch.stack(rows)


def musc_maps(tokens: np.ndarray, r_list, lo=0.0, hi=0.3) -> np.ndarray:
  """Mirrors musc.py make_category_data: per r, per layer MSM, mean over layers,
  then over r. tokens [L, N, P, D] (no cls) -> [N, P]."""
  layer_tokens = [torch.cat([torch.zeros_like(t[:, :1]), t], dim=1)
                  for t in torch.from_numpy(tokens)]
  per_r = []
  for r in r_list:
    feats = musc_lnamd(layer_tokens, r)
    per_l = [musc_msm(feats[:, :, l, :], lo, hi) for l in range(len(layer_tokens))]
    per_r.append(torch.stack(per_l).mean(0))
  return torch.stack(per_r).mean(0).numpy()


def musc_rscin(scores: np.ndarray, cls_tokens: np.ndarray, k_list) -> np.ndarray:
  """Mirrors _RsCIN.py RsCIN and MMO."""
  s = (scores - scores.min()) / (scores.max() - scores.min())
  w = torch.tensor(cls_tokens @ cls_tokens.T).float()
  s = torch.tensor(s).float()
  out = []
  for k in k_list:
    _, small = torch.topk(w, w.shape[0] - k, largest=False, sorted=True)
    wm = w.clone()
    for i in range(w.shape[0]):
      wm[i, small[i]] = 0
    d = torch.zeros_like(w)
    for i in range(w.shape[0]):
      d[i, i] = 1 / wm[i, :].sum()
    out.append((d @ wm) @ s.unsqueeze(-1))
  return torch.concat(out, -1).mean(-1).numpy()


# ---- direct numpy versions (any grid) ------------------------------------
def np_features(x: np.ndarray, r: int) -> np.ndarray:
  """x [N, h, w, D] -> [N, h*w, D]: LayerNorm, zero-padded r x r mean, L2."""
  x = x.astype(np.float64)
  mu = x.mean(axis=(1, 2, 3), keepdims=True)
  x = (x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=(1, 2, 3), keepdims=True) + 1e-5)
  n, h, w, d = x.shape
  p = r // 2
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  y = sum(xp[:, i:i + h, j:j + w] for i in range(r) for j in range(r)) / (r * r)
  y = y / np.linalg.norm(y, axis=-1, keepdims=True)
  return y.reshape(n, h * w, d)


def np_nearest(za: np.ndarray, zb: np.ndarray) -> np.ndarray:
  """[P, D], [Q, D] -> [P]: each row's distance to the nearest row of zb."""
  return np.sqrt(((za[:, None] - zb[None]) ** 2).sum(-1)).min(-1)


def np_mutual(tokens, r_list, lo=0.0, hi=0.3):
  _, n, h, w, _ = tokens.shape
  k_lo, k_hi = int((n - 1) * lo), int((n - 1) * hi)
  out = []
  for r in r_list:
    layers = []
    for t in tokens:
      z = np_features(t, r)
      maps = []
      for i in range(n):
        d = np.stack([np_nearest(z[i], z[j]) for j in range(n) if j != i], -1)
        maps.append(np.sort(d, -1)[:, k_lo:k_hi].mean(-1))
      layers.append(np.stack(maps))
    out.append(np.mean(layers, 0))
  return np.mean(out, 0).reshape(n, h, w)


def np_reference(tokens, refs, r_list):
  _, n, h, w, _ = tokens.shape
  out = []
  for r in r_list:
    layers = []
    for t, rt in zip(tokens, refs):
      z, bank = np_features(t, r), np_features(rt, r)
      bank = bank.reshape(-1, bank.shape[-1])
      layers.append(np.stack([np_nearest(z[i], bank) for i in range(n)]))
    out.append(np.mean(layers, 0))
  return np.mean(out, 0).reshape(n, h, w)


def _tokens(seed, l, n, h, w, d):
  rng = np.random.default_rng(seed)
  # A shared pattern plus noise, so nearest neighbours are not all alike.
  base = rng.normal(size=(l, 1, h, w, d))
  return (base + rng.normal(size=(l, n, h, w, d)) * rng.uniform(0.3, 1.5, (1, n, 1, 1, 1))
          ).astype(np.float32)


def _close(got, want, rtol=RTOL):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=0)


# ---- tests ---------------------------------------------------------------
@pytest.mark.parametrize("n,r_list,side", [(5, (1,), 4), (7, (1, 3), 5), (12, (1, 3, 5), 6)])
def test_mutual_maps_match_musc(n, r_list, side):
  tokens = _tokens(n, 3, n, side, side, 16)
  got = neighbors.mutual_maps(tokens, r_list, query_block=3, key_block=4)
  want = musc_maps(tokens.reshape(3, n, side * side, 16), r_list)
  _close(got.reshape(n, -1), want)


def test_mutual_maps_interval_matches_musc():
  tokens = _tokens(1, 2, 11, 4, 4, 8)
  got = neighbors.mutual_maps(tokens, (3,), interval=(0.2, 0.7), query_block=4, key_block=3)
  _close(got.reshape(11, -1), musc_maps(tokens.reshape(2, 11, 16, 8), (3,), 0.2, 0.7))


def test_mutual_maps_non_square_brute_force():
  tokens = _tokens(2, 2, 6, 3, 5, 12)
  got = neighbors.mutual_maps(tokens, (1, 3), query_block=4, key_block=5)
  _close(got, np_mutual(tokens, (1, 3)))


def test_mutual_maps_per_layer_sequence_equals_array(tmp_path):
  tokens = _tokens(3, 2, 6, 4, 4, 8)
  paths = []
  for l in range(2):
    path = tmp_path / f"layer{l}.npy"
    np.save(path, tokens[l])
    paths.append(path)
  lazy = [np.load(p, mmap_mode="r") for p in paths]
  a = neighbors.mutual_maps(tokens, (1, 3))
  b = neighbors.mutual_maps(lazy, (1, 3), token_block=4, query_block=5, key_block=2)
  _close(b, a, rtol=1e-6)


def test_mutual_maps_refuse_too_few_images():
  with pytest.raises(ValueError, match="at least 5 images"):
    neighbors.mutual_maps(_tokens(0, 1, 4, 3, 3, 4))
  with pytest.raises(ValueError, match="odd"):
    neighbors.mutual_maps(_tokens(0, 1, 6, 3, 3, 4), r_list=(2,))


def test_mutual_maps_sharded_equal_single_device():
  assert jax.device_count() >= 4
  tokens = _tokens(4, 2, 9, 4, 4, 8)
  mesh = sharding.make_mesh(4, 1, jax.devices()[:4])
  one = neighbors.mutual_maps(tokens, (1, 3), query_block=2, key_block=3)
  many = neighbors.mutual_maps(tokens, (1, 3), mesh=mesh, query_block=2, key_block=3)
  _close(many, one, rtol=1e-6)
  refs = _tokens(5, 2, 3, 4, 4, 8)
  _close(neighbors.reference_maps(tokens, refs, (1, 3), mesh=mesh, query_block=1),
         neighbors.reference_maps(tokens, refs, (1, 3)), rtol=1e-6)


@pytest.mark.parametrize("h,w", [(4, 4), (3, 5)])
def test_reference_maps_brute_force(h, w):
  tokens, refs = _tokens(6, 3, 5, h, w, 12), _tokens(7, 3, 4, h, w, 12)
  got = neighbors.reference_maps(tokens, refs, (1, 3, 5), query_block=2, key_block=3)
  _close(got, np_reference(tokens, refs, (1, 3, 5)))


def test_reference_maps_of_a_reference_are_zero():
  """The nearest bank patch is measured exactly (0.0 measured; the expanded
  |a|^2+|b|^2-2ab left up to 2e-3 after the square root).
  Fails if the square root of the expanded distance is returned."""
  refs = _tokens(8, 2, 3, 4, 4, 8)
  got = neighbors.reference_maps(refs[:, :1], refs, (1, 3))
  np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_mutual_maps_of_a_duplicated_image_are_finite():
  """A batch holding one image twice: the duplicate's squared distances are
  ~0 and may round below 0; the clamp keeps the square root finite (2e-4
  measured) where an unclamped one gives NaN patches.
  Fails if the clamp at 0 before the square root is removed."""
  tokens = _tokens(3, 2, 6, 4, 4, 8).copy()
  tokens[:, 5] = tokens[:, 0]
  got = neighbors.mutual_maps(tokens, (1, 3))
  assert np.isfinite(got).all()
  assert float(np.abs(got[[0, 5]]).max()) <= 1e-3 < float(got[1:5].min())


@pytest.mark.parametrize("n,k_list", [(9, (1, 2, 3)), (20, (1, 8, 9))])
def test_refine_scores_match_musc(n, k_list):
  rng = np.random.default_rng(n)
  scores = rng.uniform(0.2, 0.9, n)
  cls = rng.normal(size=(n, 32)).astype(np.float32) + 1.0  # positive similarities mostly
  _close(neighbors.refine_scores(scores, cls, k_list), musc_rscin(scores, cls, k_list))
  np.testing.assert_array_equal(neighbors.refine_scores(scores, cls, (0,)),
                                scores.astype(np.float32))


@pytest.mark.parametrize("r_list", [(1,), (1, 3, 5), (3, 7)])
def test_reference_maps_dense_equal_reference_maps(r_list):
  """The exportable few-shot function (one bank array, one traced graph) gives
  `reference_maps`' maps; the references' grid may differ from the queries'."""
  rng = np.random.default_rng(5)
  tokens = rng.normal(size=(3, 4, 6, 5, 16)).astype(np.float32) * 3 + 1
  refs = rng.normal(size=(3, 3, 4, 7, 16)).astype(np.float32)
  want = neighbors.reference_maps(tokens, refs, r_list)
  bank = neighbors.bank_features(refs, r_list)
  assert bank.shape == (3, len(r_list), 3 * 4 * 7, 16)
  got = np.asarray(jax.jit(lambda t, b: neighbors.reference_maps_dense(t, b, r_list))(
      tokens, bank))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


# ---- a coreset bank -------------------------------------------------------
def np_reference_coreset(tokens, refs, r_list, fraction, seed):
  """`np_reference` against a bank cut to a greedy k-center coreset per layer
  and r (the brute-force selection of tests/coreset_test.py, on the bank's
  float32 features and the seeded projection)."""
  from adjax import coreset
  from coreset_test import brute_force
  _, n, h, w, _ = tokens.shape
  out = []
  for r in r_list:
    layers = []
    for t, rt in zip(tokens, refs):
      z = np_features(t, r)
      bank = np_features(rt, r).reshape(-1, rt.shape[-1]).astype(np.float32)
      size = coreset.coreset_size(len(bank), fraction)
      keep = brute_force(bank, size, coreset.start_index(len(bank), seed),
                         coreset.projection(bank.shape[-1], seed))
      layers.append(np.stack([np_nearest(z[i], bank[keep]) for i in range(n)]))
    out.append(np.mean(layers, 0))
  return np.mean(out, 0).reshape(n, h, w)


@pytest.mark.parametrize("fraction,d", [(0.25, 12), (17, 12), (0.3, 160)])
def test_reference_maps_coreset_brute_force(fraction, d):
  """Each layer and r keeps its own k-center coreset of the bank; a count
  that does not fill the last key block is padded without changing a distance.
  Fails if the coreset is chosen once for all layers / r, if the padding
  duplicates are zeros, or if the padded pseudo-images are not masked."""
  tokens, refs = _tokens(6, 2, 4, 4, 5, d), _tokens(7, 2, 3, 4, 5, d)
  got = neighbors.reference_maps(tokens, refs, (1, 3), coreset=fraction, coreset_seed=4,
                                 query_block=2, key_block=2)
  _close(got, np_reference_coreset(tokens, refs, (1, 3), fraction, 4))
  # Fewer patches, farther neighbours: strictly above the whole bank somewhere.
  full = neighbors.reference_maps(tokens, refs, (1, 3))
  assert np.all(got >= full - 1e-6) and float((got - full).max()) > 1e-3


def test_reference_maps_coreset_sharded_and_dense_agree():
  """The same coreset on a mesh, and in the exportable bank (`bank_features`)."""
  tokens, refs = _tokens(9, 2, 5, 4, 4, 8), _tokens(10, 2, 4, 4, 4, 8)
  mesh = sharding.make_mesh(4, 1, jax.devices()[:4])
  one = neighbors.reference_maps(tokens, refs, (1, 3), coreset=0.2)
  _close(neighbors.reference_maps(tokens, refs, (1, 3), coreset=0.2, mesh=mesh), one,
         rtol=1e-6)
  bank = neighbors.bank_features(refs, (1, 3), coreset=0.2)
  assert bank.shape == (2, 2, round(0.2 * 4 * 16), 8)
  dense = np.asarray(jax.jit(lambda t, b: neighbors.reference_maps_dense(t, b, (1, 3)))(
      tokens, bank))
  np.testing.assert_allclose(dense, one, rtol=1e-5, atol=0)


def test_reference_maps_whole_coreset_equals_the_bank():
  tokens, refs = _tokens(11, 2, 4, 4, 4, 8), _tokens(12, 2, 3, 4, 4, 8)
  np.testing.assert_array_equal(neighbors.reference_maps(tokens, refs, (1, 3), coreset=1.0),
                                neighbors.reference_maps(tokens, refs, (1, 3)))


# ---- batch scoring in subsets ---------------------------------------------
def test_subsets_cover_every_image_once_in_near_equal_parts():
  parts = neighbors.subsets(23, 5, seed=3)
  assert [len(p) for p in parts] == [6, 6, 6, 5]
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(23))
  assert all(np.all(np.diff(p) > 0) for p in parts)
  assert [p.tolist() for p in neighbors.subsets(23, 5, seed=3)] == [p.tolist() for p in parts]
  assert [p.tolist() for p in neighbors.subsets(23, 5, seed=4)] != [p.tolist() for p in parts]
  assert [p.tolist() for p in neighbors.subsets(9, 5)] == [list(range(9))]


def test_mutual_maps_subsets_score_each_image_within_its_subset():
  """Each image's map is MuSc's mutual score among its subset only (brute
  force per subset); progress reports every image once.
  Fails if a subset is scored against the whole batch, or maps land on the
  wrong rows."""
  tokens = _tokens(13, 2, 13, 4, 4, 8)
  seen = []
  got = neighbors.mutual_maps_subsets(tokens, 5, (1, 3), seed=1, progress=seen.append)
  parts = neighbors.subsets(13, 5, seed=1)
  assert sorted(seen) == sorted(len(p) for p in parts) and sum(seen) == 13
  for idx in parts:
    _close(got[idx], np_mutual(tokens[:, idx], (1, 3)))
  whole = neighbors.mutual_maps(tokens, (1, 3))
  assert float(np.abs(got - whole).max()) > 1e-3
  np.testing.assert_array_equal(neighbors.mutual_maps_subsets(tokens, 7, (1, 3)), whole)


def test_mutual_maps_subsets_refuse_a_subset_without_a_rank():
  with pytest.raises(ValueError, match="at least 5"):
    neighbors.mutual_maps_subsets(_tokens(0, 1, 12, 3, 3, 4), 4)
