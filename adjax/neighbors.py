"""Scoring patches against neighbours: MuSc's mutual scoring, a few-shot memory
bank and MuSc's image-score refinement (SPEC section 11), in pure JAX.

Inputs are the tapped blocks' patch tokens as the backbone returns them
(prefix tokens removed, *not* the head's standardisation):

- `tokens`: an array `[L, N, h, w, D]`, or a sequence of `L` per-layer
  arrays `[N, h, w, D]` (numpy arrays, `np.memmap`s, or any object with
  `len()` and `[l]`, e.g. one that reads layer `l` from disk when indexed).
  Only one layer's features are held at a time, and the raw tokens of a
  layer are read in blocks of images, so a disk cache never has to be in
  memory whole.

Per layer and neighbourhood size r (LNAMD): LayerNorm over each image's
whole `[D, h, w]` map (eps 1e-5, no affine), the r x r neighbourhood mean
per channel with zero padding r // 2 (padding counted in the mean), each
patch L2-normalised. Then (MSM) each patch's Euclidean distance to the
nearest patch of every other image, computed as matmuls
(`|a|^2 + |b|^2 - 2 a.b`, clamped at 0 before the square root; the few-shot
bank's nearest patch is then measured exactly, `exact_distance`), blocked over
query and key images so that the largest temporary is
`[query_block, P, key_block, P]`. Maps are averaged over layers, then over r.

Memory (float32, one layer at a time): the layer's LNAMD features
`N * P * D * 4` bytes (N = 500, ViT-L/16 at 512: 2.1 GB), plus one
block of raw tokens, plus the distance block. With a `mesh`, query blocks
are split over its "data" axis (`jax.shard_map`), the key features are
replicated on every device.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from adjax import coreset as coreset_lib

LN_EPS = 1e-5
DATA = "data"


# ---- the pieces -----------------------------------------------------------
def lnamd(x: jax.Array, r: int) -> jax.Array:
  """MuSc's LNAMD for one layer: x [B, h, w, D] -> [B, h, w, D], unit patch vectors."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 3), keepdims=True)
  x = (x - mean) * lax.rsqrt(var + LN_EPS)
  if r > 1:
    pad = r // 2
    x = lax.reduce_window(x, 0.0, lax.add, (1, r, r, 1), (1, 1, 1, 1),
                          ((0, 0), (pad, pad), (pad, pad), (0, 0))) / (r * r)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _block_min_sq(zq, zk, precision, with_index: bool = False):
  """zq [bq, P, D], zk [bk, Q, D] -> [bq, P, bk]: squared distance of each query
  patch to the nearest patch of each key image (and, `with_index`, that
  patch's index in its image [bq, P, bk])."""
  (bq, p, d), (bk, q, _) = zq.shape, zk.shape
  ab = jnp.dot(zq.reshape(bq * p, d), zk.reshape(bk * q, d).T, precision=precision)
  # The barrier keeps the matmul a plain dot (XLA:CPU's fast path) instead of
  # a fusion with the reduction below (measured 20-30% faster at ViT-L sizes).
  ab = lax.optimization_barrier(ab)
  b2 = jnp.sum(jnp.square(zk), axis=-1).reshape(bk * q)       # [bk * Q]
  a2 = jnp.sum(jnp.square(zq), axis=-1)                      # [bq, P]
  d = (b2[None] - 2.0 * ab).reshape(bq, p, bk, q)
  near = jnp.min(d, axis=-1) + a2[:, :, None]
  return (near, jnp.argmin(d, axis=-1).astype(jnp.int32)) if with_index else near


def exact_distance(z, nearest):
  """|z - nearest| per patch, from the difference (not `|a|^2 + |b|^2 - 2 a.b`,
  whose float32 rounding leaves ~1e-7 at a distance of 0, i.e. ~3e-4 after
  the square root): a patch equal to a bank patch scores 0 on every path."""
  return jnp.sqrt(jnp.sum(jnp.square(z - nearest), axis=-1))


def _query_block(zq, qid, zkeys, kid, *, kind, lo, hi, precision):
  """Scores of one block of query images against every key image.

  zq [bq, P, D], qid [bq]; zkeys [nb, bk, Q, D], kid [nb, bk] (global image
  indices; -1 marks padding). kind "mutual": the mean of the distances at
  ranks [lo, hi) over the other images; "reference": the nearest distance.
  """
  reference = kind == "reference"

  def body(_, xs):
    return None, _block_min_sq(zq, xs, precision, with_index=reference)
  _, d = lax.scan(body, None, zkeys)                         # [nb, bq, P, bk]
  bq, p = zq.shape[:2]
  if reference:
    d, at = d
    at = jnp.moveaxis(at, 0, 2).reshape(bq, p, -1)           # [bq, P, nb*bk]
  d = jnp.moveaxis(d, 0, 2).reshape(bq, p, -1)               # [bq, P, nb*bk]
  kid = kid.reshape(-1)
  skip = (kid[None, :] < 0) | (kid[None, :] == qid[:, None])  # [bq, K]
  d = jnp.where(skip[:, None, :], jnp.inf, d)
  if reference:
    # The nearest bank patch, found on the squared distances, then measured
    # exactly (as `reference_maps_dense` measures it).
    image = jnp.argmin(d, axis=-1)                             # [bq, P]
    patch = jnp.take_along_axis(at, image[..., None], axis=-1)[..., 0]
    flat = zkeys.reshape((-1,) + zkeys.shape[2:])              # [nb*bk, Q, D]
    return exact_distance(zq, flat[image, patch])
  smallest = -lax.top_k(-d, hi)[0]                           # ascending
  return jnp.mean(jnp.sqrt(jnp.maximum(smallest[..., lo:hi], 0.0)), axis=-1)


@functools.lru_cache(maxsize=None)
def _scorer(kind, lo, hi, precision, mesh):
  fn = functools.partial(_query_block, kind=kind, lo=lo, hi=hi, precision=precision)
  if mesh is None or mesh.shape[DATA] == 1:
    return jax.jit(fn)
  fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(DATA), P(DATA), P(), P()),
                     out_specs=P(DATA), check_vma=False)
  return jax.jit(fn)


_lnamd_jit = jax.jit(lnamd, static_argnums=1)


# ---- inputs ---------------------------------------------------------------
def _layers(tokens) -> Sequence:
  if hasattr(tokens, "ndim") and tokens.ndim == 5:
    return [tokens[l] for l in range(tokens.shape[0])]
  if not hasattr(tokens, "__len__") or not hasattr(tokens, "__getitem__"):
    raise TypeError("tokens: expected an array [L, N, h, w, D] or a sequence of "
                    "per-layer arrays [N, h, w, D]")
  return tokens


def _shape(layers, name) -> tuple[int, int, int, int]:
  if not len(layers):
    raise ValueError(f"{name}: no layers")
  shapes = {tuple(layers[l].shape) for l in range(len(layers))}
  if len(shapes) != 1 or len(next(iter(shapes))) != 4:
    raise ValueError(f"{name}: expected per-layer arrays [N, h, w, D] of one shape, "
                     f"got {sorted(shapes)}")
  return next(iter(shapes))


def block_sizes(patches: int, query_block: int | None = None,
                key_block: int | None = None) -> tuple[int, int]:
  """Images per query and key block: by default about 8192 query patches and
  1024 key patches per distance block. Measured on a 2-core AVX-512 CPU at
  ViT-L/16 512 (1024 patches): 8 x 8 images ran at 30% of the matmul ceiling,
  8 x 2 at 90%, 16 x 1 at 100% (the block's result then stays in cache)."""
  q = query_block or max(1, 8192 // patches)
  k = key_block or max(1, 1024 // patches)
  return int(q), int(k)


def _check_r(r_list) -> tuple[int, ...]:
  r_list = tuple(int(r) for r in r_list)
  if not r_list or any(r < 1 or r % 2 == 0 for r in r_list):
    raise ValueError(f"r_list={r_list}: expected odd neighbourhood sizes >= 1 (MuSc's "
                     "zero padding of (r - 1) / 2 keeps the grid only for odd r)")
  return r_list


def rank_window(n: int, interval: tuple[float, float]) -> tuple[int, int]:
  """MuSc's ranks [int((n-1)*lo), int((n-1)*hi)) among the n-1 other images."""
  lo, hi = float(interval[0]), float(interval[1])
  if not 0.0 <= lo < hi < 1.0:
    raise ValueError(f"interval={interval}: expected fractions 0 <= lo < hi < 1")
  k_lo, k_hi = int((n - 1) * lo), int((n - 1) * hi)
  if k_hi <= k_lo:
    raise ValueError(f"mutual scoring of {n} images: the interval {interval} of the "
                     f"{n - 1} other images holds no rank (MuSc would return NaN); "
                     f"score at least {_min_images(interval)} images together")
  return k_lo, k_hi


def _min_images(interval) -> int:
  n = 2
  while int((n - 1) * interval[1]) <= int((n - 1) * interval[0]):
    n += 1
  return n


# MuSc's interval: each patch's distances to the other images, the mean of
# the lowest 30%; and the fewest images scored together that it holds a rank
# for (5), which evaluation and the Detector check before any work.
INTERVAL = (0.0, 0.3)
MIN_BATCH = _min_images(INTERVAL)


def _features(layer, r, block, sharding, multiple: int = 1):
  """LNAMD features of one layer, [N', P, D] float32 on device (read block-wise);
  N' is N rounded up to `multiple` (zero rows), so that no padded copy is needed."""
  n, h, w, d = layer.shape
  out = np.zeros((-(-n // multiple) * multiple, h * w, d), np.float32)
  for s in range(0, n, block):
    x = np.asarray(layer[s:s + block], np.float32)
    out[s:s + len(x)] = np.asarray(_lnamd_jit(jnp.asarray(x), r)).reshape(len(x), h * w, d)
  return jax.device_put(out, sharding) if sharding is not None else jnp.asarray(out)


def _key_blocks(z: jax.Array, n: int, block: int):
  """[N', P, D] (N' a multiple of block) -> ([nb, block, P, D], ids [nb, block]),
  ids -1 past the n real images."""
  nb = z.shape[0] // block
  ids = np.arange(nb * block, dtype=np.int32)
  ids[n:] = -1
  return z.reshape((nb, block) + z.shape[1:]), jnp.asarray(ids.reshape(nb, block))


def _score_layer(zq, nq, zk, nk, kind, lo, hi, query_block, key_block, precision, mesh,
                 same: bool, max_blocks: int | None = None) -> np.ndarray:
  """[nq, P] scores of the (padded) query features against the key features.
  `max_blocks` stops after that many query steps (benchmarks time a few)."""
  devices = 1 if mesh is None else mesh.shape[DATA]
  step = query_block * devices
  keys, kid = _key_blocks(zk, nk, key_block)
  fn = _scorer(kind, lo, hi, precision, mesh if devices > 1 else None)
  out = np.zeros((nq,) + zq.shape[1:2], np.float32)
  for b, s in enumerate(range(0, nq, step)):
    if max_blocks is not None and b >= max_blocks:
      break
    q = zq[s:s + step]
    m = min(step, nq - s)
    qid = np.arange(s, s + step, dtype=np.int32) if same else np.full(step, -2, np.int32)
    if q.shape[0] < step:
      q = jnp.concatenate([q, jnp.zeros((step - q.shape[0],) + q.shape[1:], q.dtype)])
    if devices > 1:
      spec = NamedSharding(mesh, P(DATA))
      q, qid = jax.device_put(q, spec), jax.device_put(qid, spec)
    out[s:s + m] = np.asarray(fn(q, jnp.asarray(qid), keys, kid))[:m]
  return out


# ---- the scoring functions ------------------------------------------------
def _mean_over_layers_then_r(layer_scores, num_layers: int, r_list, shape) -> np.ndarray:
  """MuSc's aggregation: `layer_scores(l, r)` -> [N, P] averaged over the layers,
  then over r (in float64), as float32 maps of `shape` [N, h, w]. One layer's
  features are alive at a time."""
  n, h, w = shape
  total = np.zeros((n, h * w), np.float64)
  for r in r_list:
    per_r = np.zeros((n, h * w), np.float64)
    for l in range(num_layers):
      per_r += layer_scores(l, r)
    total += per_r / num_layers
  return (total / len(r_list)).reshape(n, h, w).astype(np.float32)


def mutual_maps(tokens, r_list=(1, 3, 5), interval=INTERVAL, *, mesh=None,
                query_block: int | None = None, key_block: int | None = None,
                token_block: int = 32,
                precision=lax.Precision.HIGHEST) -> np.ndarray:
  """MuSc's mutual scoring of a batch of images -> maps [N, h, w] (patch grid).

  Args:
    tokens: [L, N, h, w, D] or a sequence of L per-layer arrays [N, h, w, D].
    r_list: LNAMD neighbourhood sizes (odd); maps are averaged over them.
    interval: (lo, hi) fractions: each patch's distances to the other N-1
      images are sorted ascending and ranks [int((N-1)lo), int((N-1)hi))
      averaged. N too small to leave a rank is refused (ValueError).
    mesh: optional device mesh; query blocks are split over its "data" axis.
    query_block, key_block: images per distance block (per device; default
      `block_sizes`); the largest temporary is query_block * P * key_block * P
      floats.
    token_block: images per LNAMD call when reading raw tokens.
  """
  layers = _layers(tokens)
  n, h, w, _ = _shape(layers, "mutual_maps: tokens")
  r_list = _check_r(r_list)
  lo, hi = rank_window(n, interval)
  query_block, key_block = block_sizes(h * w, query_block, key_block)
  query_block = min(query_block, n)
  rep = None if mesh is None else NamedSharding(mesh, P())

  def layer_scores(l, r):
    z = _features(layers[l], r, token_block, rep, key_block)
    return _score_layer(z, n, z, n, "mutual", lo, hi, query_block, key_block,
                        precision, mesh, same=True)
  return _mean_over_layers_then_r(layer_scores, len(layers), r_list, (n, h, w))


def subsets(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
  """MuSc's split of a large batch: the n images in a seeded random order, cut
  into n // size subsets of near-equal size: each holds at least `size` and
  fewer than 2 * size images (all n when n < 2 * size); indices sorted."""
  if n < 2 * size:
    return [np.arange(n)]
  order = np.random.default_rng(int(seed)).permutation(n)
  return [np.sort(part) for part in np.array_split(order, n // size)]


def mutual_maps_subsets(tokens, subset: int, r_list=(1, 3, 5), interval=INTERVAL, *,
                        seed: int = 0, mesh=None, progress=None, **kwargs) -> np.ndarray:
  """`mutual_maps` with each image scored only against the other images of its
  random subset of `subset` to 2 * `subset` - 1 images (`subsets`), MuSc's answer to large
  test sets: time O(N * subset) instead of O(N^2), memory (the LNAMD
  features and distance blocks) that of `subset` images whatever N. Only the
  subset's raw tokens are read at a time (a memory-mapped `tokens` stays on
  disk). `progress(k)` is called with each subset's image count once scored.
  With N < 2 * subset it is `mutual_maps` exactly."""
  layers = _layers(tokens)
  n, h, w, _ = _shape(layers, "mutual_maps_subsets: tokens")
  parts = subsets(n, int(subset), seed)
  rank_window(min(len(p) for p in parts), interval)   # every subset leaves a rank
  out = np.zeros((n, h, w), np.float32)
  for idx in parts:
    out[idx] = mutual_maps([layer[idx] for layer in layers], r_list, interval, mesh=mesh,
                           **kwargs)
    if progress is not None:
      progress(len(idx))
  return out


def reference_maps(tokens, reference_tokens, r_list=(1, 3, 5), *, mesh=None,
                   query_block: int | None = None, key_block: int | None = None,
                   token_block: int = 32,
                   precision=lax.Precision.HIGHEST, coreset: float = 0,
                   coreset_seed: int = 0) -> np.ndarray:
  """Few-shot scoring -> maps [N, h, w]: each patch's distance to its nearest
  patch among the reference images' patches (the memory bank), with the same
  LNAMD features, averaged over layers and then over r.

  `reference_tokens`: [L, M, h', w', D] or a sequence of per-layer arrays
  (the references' grid may differ from the queries'); layers pair by position.
  `coreset`: 0 (off) keeps every reference patch; a fraction in (0, 1] or a
  count > 1 keeps that many per layer and r, chosen by greedy k-center
  (`adjax.coreset.select`, seed `coreset_seed`) among the bank's LNAMD features.
  It is `bank_maps` over `bank_arrays`: a caller scoring many batches against
  one bank builds it once (`adjax.workdir.banks.Bank`).
  """
  layers, refs = _layers(tokens), _layers(reference_tokens)
  _, _, _, d = _shape(layers, "reference_maps: tokens")
  _, _, _, d_ref = _shape(refs, "reference_maps: reference_tokens")
  if len(refs) != len(layers) or d_ref != d:
    raise ValueError(f"reference_maps: {len(refs)} reference layers of width {d_ref} for "
                     f"{len(layers)} query layers of width {d}")
  bank, _ = bank_arrays(refs, r_list, coreset=coreset, coreset_seed=coreset_seed,
                        mesh=mesh, token_block=token_block)
  return bank_maps(layers, bank, r_list, mesh=mesh, query_block=query_block,
                   key_block=key_block, token_block=token_block, precision=precision)


def bank_maps(tokens, bank, r_list=(1, 3, 5), *, mesh=None, query_block: int | None = None,
              key_block: int | None = None, token_block: int = 32,
              precision=lax.Precision.HIGHEST) -> np.ndarray:
  """Few-shot scoring against a built bank -> maps [N, h, w]: `bank` [L,
  len(r_list), K, D] (`bank_arrays`: LNAMD features per layer and r, after any
  coreset), blocked (and sharded over `mesh`) as `mutual_maps` is. The bank's
  patches are laid out as pseudo-images of the queries' P patches (the last
  filled up with copies of the bank's first patch: a duplicate cannot change
  a nearest distance); rows past them are padding, masked."""
  layers = _layers(tokens)
  n, h, w, d = _shape(layers, "bank_maps: tokens")
  r_list = _check_r(r_list)
  bank = np.asarray(bank, np.float32) if not isinstance(bank, np.ndarray) else bank
  if bank.ndim != 4 or bank.shape[:2] != (len(layers), len(r_list)) or bank.shape[-1] != d:
    raise ValueError(f"bank_maps: bank {tuple(bank.shape)} for {len(layers)} layers of "
                     f"width {d} and r_list={r_list}")
  if bank.shape[2] < 1:
    raise ValueError("bank_maps: an empty bank")
  p = h * w
  query_block, key_block = block_sizes(p, query_block, key_block)
  query_block = min(query_block, n)
  rep = None if mesh is None else NamedSharding(mesh, P())
  at = {r: k for k, r in reversed(list(enumerate(r_list)))}

  def layer_scores(l, r):
    z = _features(layers[l], r, token_block, rep)
    keys, count = _pseudo_images(bank[l, at[r]], p, key_block, rep)
    return _score_layer(z, n, keys, count, "reference", 0, 1, query_block, key_block,
                        precision, mesh, same=False)
  return _mean_over_layers_then_r(layer_scores, len(layers), r_list, (n, h, w))


def _pseudo_images(flat: np.ndarray, p: int, key_block: int, rep):
  """Bank patches [K, D] -> (`count` pseudo-images of p patches [K'', p, D] on
  device, count): the last pseudo-image filled up with copies of the first
  patch, rows past `count` zeros (masked as padding by `_key_blocks`)."""
  k, d = flat.shape
  count = -(-k // p)
  rows = -(-count // key_block) * key_block
  out = np.zeros((rows * p, d), np.float32)
  out[:k] = flat
  out[k:count * p] = flat[0]
  out = out.reshape(rows, p, d)
  return (jax.device_put(out, rep) if rep is not None else jnp.asarray(out)), count


def bank_arrays(reference_tokens, r_list=(1, 3, 5), *, coreset: float = 0,
                coreset_seed: int = 0, mesh=None, token_block: int = 32
                ) -> tuple[np.ndarray, np.ndarray]:
  """The few-shot memory bank: (features [L, len(r_list), K, D] float32, the
  LNAMD features of the reference patches of layer l and size r_list[k];
  origin [L, len(r_list), K] int32, the reference image each patch comes
  from). `coreset` as in `reference_maps`: K = M * P without one, else the
  greedy k-center selection of each layer and r (on `mesh`'s devices when
  given); the kept patches in selection order."""
  refs = _layers(reference_tokens)
  m, h, w, d = _shape(refs, "bank_arrays: reference_tokens")
  if m < 1:
    raise ValueError("bank_arrays: no reference images")
  r_list = _check_r(r_list)
  size = coreset_lib.coreset_size(m * h * w, coreset)
  sel_mesh = mesh if mesh is not None and mesh.shape[DATA] > 1 else None
  out = np.zeros((len(refs), len(r_list), size, d), np.float32)
  origin = np.zeros((len(refs), len(r_list), size), np.int32)
  image = np.repeat(np.arange(m, dtype=np.int32), h * w)
  for l in range(len(refs)):
    for k, r in enumerate(r_list):
      z = np.asarray(_features(refs[l], r, token_block, None)).reshape(m * h * w, d)
      keep = (coreset_lib.select(z, size, seed=coreset_seed, mesh=sel_mesh) if coreset
              else np.arange(m * h * w))
      out[l, k], origin[l, k] = z[keep], image[keep]
  return out, origin


def bank_features(reference_tokens, r_list=(1, 3, 5), *, coreset: float = 0,
                  coreset_seed: int = 0) -> np.ndarray:
  """`bank_arrays`' features alone: [L, len(r_list), K, D] float32."""
  return bank_arrays(reference_tokens, r_list, coreset=coreset, coreset_seed=coreset_seed)[0]


def refine_scores(scores, global_tokens, k_list=(1, 2, 3)) -> np.ndarray:
  """MuSc's RsCIN: image scores [N] refined over the batch's global tokens [N, C].

  Scores are min-max normalised over the batch; W = G G^T; for each k the
  k largest entries of each row of W are kept (others 0), the row divided by
  its sum, S_k = W_k s; the result is the mean of the S_k. A k of 0 in
  `k_list` returns the scores unchanged (MuSc's switch).
  """
  scores = np.asarray(scores, np.float64)
  g = np.asarray(global_tokens, np.float32)
  k_list = tuple(int(k) for k in k_list)
  if not k_list or 0 in k_list:
    return scores.astype(np.float32)
  n = scores.shape[0]
  if g.shape[0] != n or any(k < 0 or k > n for k in k_list):
    raise ValueError(f"refine_scores: {n} scores, {g.shape[0]} global tokens, "
                     f"k_list={k_list} (each k in [1, {n}])")
  return np.asarray(_rscin(jnp.asarray(scores, jnp.float32), jnp.asarray(g), k_list))


@functools.partial(jax.jit, static_argnums=2)
def _rscin(s, g, k_list):
  span = jnp.max(s) - jnp.min(s)
  # MuSc divides by the span; a constant batch has nothing to rank (all 0).
  s = jnp.where(span > 0, (s - jnp.min(s)) / jnp.where(span > 0, span, 1.0), 0.0)
  w = jnp.matmul(g, g.T, precision=lax.Precision.HIGHEST)
  out = []
  for k in k_list:
    _, idx = lax.top_k(w, k)
    keep = jnp.zeros_like(w, bool).at[jnp.arange(w.shape[0])[:, None], idx].set(True)
    wk = jnp.where(keep, w, 0.0)
    out.append((wk / jnp.sum(wk, axis=1, keepdims=True)) @ s)
  return jnp.mean(jnp.stack(out, -1), axis=-1)


# ---- one traceable function (exports) -------------------------------------
def lnamd_dense(x: jax.Array, r: int) -> jax.Array:
  """`lnamd` with the r x r mean as zero padding plus r * r shifted slices (ops
  every exporter knows, unlike reduce_window): x [B, h, w, D] -> [B, h, w, D]."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 3), keepdims=True)
  x = (x - mean) * lax.rsqrt(var + LN_EPS)
  if r > 1:
    pad, (h, w) = r // 2, x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    acc = jnp.zeros_like(x)
    for i in range(r):
      for j in range(r):
        acc = acc + xp[:, i:i + h, j:j + w]
    x = acc / (r * r)
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


def reference_maps_dense(tokens: jax.Array, bank: jax.Array, r_list=(1, 3, 5),
                         precision=lax.Precision.HIGHEST) -> jax.Array:
  """`reference_maps` as one traceable function (no data-dependent loops, no
  host round trips): tokens [L, B, h, w, D], bank [L, len(r_list), K, D] from
  `bank_features` -> maps [B, h, w]. The largest temporary is [B, h*w, K]."""
  r_list = _check_r(r_list)
  n_layers, b, h, w, d = tokens.shape
  if bank.shape[:2] != (n_layers, len(r_list)) or bank.shape[-1] != d:
    raise ValueError(f"reference_maps_dense: bank {tuple(bank.shape)} for {n_layers} "
                     f"layers of width {d} and r_list={r_list}")
  bank = jnp.asarray(bank, jnp.float32)
  b2 = jnp.sum(jnp.square(bank), axis=-1)                    # [L, R, K]
  total = jnp.zeros((b, h * w), jnp.float32)
  for k, r in enumerate(r_list):
    per_r = jnp.zeros((b, h * w), jnp.float32)
    for l in range(n_layers):
      z = lnamd_dense(tokens[l], r).reshape(b, h * w, d)
      ab = jnp.einsum("bpd,kd->bpk", z, bank[l, k], precision=precision)
      # The nearest bank patch on the squared distances, measured exactly
      # (`exact_distance`), as `reference_maps` measures it.
      at = jnp.argmin(b2[l, k][None, None] - 2.0 * ab, axis=-1)    # [B, h*w]
      per_r = per_r + exact_distance(z, jnp.take(bank[l, k], at, axis=0))
    total = total + per_r / n_layers
  return (total / len(r_list)).reshape(b, h, w)
