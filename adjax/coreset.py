"""Coreset selection for a memory bank: PatchCore's greedy k-center, in JAX.

PatchCore (Roth et al., CVPR'22) keeps a subset of the bank's patches chosen
so that every patch left out is near one kept: greedy k-center on a fixed
random projection of the features (its `GreedyCoresetSampler`: a bias-free
random linear map to 128 dimensions, used only for the selection distances).
From a seeded random start, each step takes the patch farthest from the
selected set and lowers every patch's distance to the set with the distance
to it.

Here the projection is applied in blocks of rows (the features may be a
memory-mapped array; only one block of them is on the device at a time),
and the whole selection is one jitted `lax.fori_loop` on the device: per
step one pass over the projected features `[N, 128]` and the min-distance
vector `[N]` (N * 516 bytes in all: 52 MB at 10^5 patches). With a mesh,
both are split along the patches over its "data" axis (`jax.shard_map`):
each device updates its own rows, the farthest patch is agreed with one
all-gather of (distance, index) per device, and its projected features
reach every device with one psum. Ties go to the lowest index, as numpy's
`argmax` takes them, so the selection is the same on any number of devices
and deterministic for a seed.

Distances are `sum((x - c)^2)` from the difference (one fused pass, no
`|x|^2 + |c|^2 - 2 x.c` rounding), the same arithmetic as a brute-force
numpy greedy k-center on the same projection.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

DATA = "data"
PROJECTION_DIM = 128     # PatchCore's `dimension_to_project_features_to`
ROW_BLOCK = 65536        # rows projected per device call


def coreset_size(n: int, coreset: float) -> int:
  """Patches kept of n: a fraction in (0, 1] (at least 1 patch), or a count > 1
  (at most n). 0 means off: all n."""
  c = float(coreset)
  if c == 0:
    return n
  if not math.isfinite(c) or c < 0 or (c > 1 and c != int(c)):
    raise ValueError(f"coreset={coreset!r}: expected a fraction in (0, 1], a whole "
                     "count > 1, or 0 (off)")
  return max(1, int(round(n * c))) if c <= 1 else min(n, int(c))


def settings(coreset: float, seed: int = 0) -> dict | None:
  """What a coreset bank depends on besides its features (None when off):
  part of a bank's identity."""
  if not float(coreset):
    return None
  return {"coreset": float(coreset), "seed": int(seed), "method": "greedy_k_center",
          "projection_dim": PROJECTION_DIM}


def projection(dim: int, seed: int = 0, out_dim: int = PROJECTION_DIM) -> np.ndarray | None:
  """The fixed random projection [dim, out_dim] (N(0, 1/out_dim) entries, as a
  bias-free linear layer), or None when dim <= out_dim (features used as they are)."""
  if dim <= out_dim:
    return None
  rng = np.random.default_rng([int(seed), 0x636F7265])
  return (rng.standard_normal((dim, out_dim)) / math.sqrt(out_dim)).astype(np.float32)


def start_index(n: int, seed: int = 0) -> int:
  """The seeded random first patch."""
  return int(np.random.default_rng([int(seed), 0x73746172]).integers(n))


_project = jax.jit(lambda x, w: jnp.dot(x.astype(jnp.float32), w,
                                        precision=lax.Precision.HIGHEST))


def _projected(features, proj, rows: int, sharding, block: int) -> jax.Array:
  """[rows, d'] float32 on the device(s): the features projected block by block
  (rows >= N; rows past N are zeros)."""
  n, d = features.shape
  width = d if proj is None else proj.shape[1]
  out = np.zeros((rows, width), np.float32)
  w = None if proj is None else jnp.asarray(proj)
  for s in range(0, n, block):
    x = np.asarray(features[s:s + block], np.float32)
    out[s:s + len(x)] = x if w is None else np.asarray(_project(jnp.asarray(x), w))
  return jax.device_put(out, sharding) if sharding is not None else jnp.asarray(out)


def _greedy(z, n_valid, start, *, count: int):
  """Greedy k-center on one device: z [N', d'] (rows >= n_valid are padding)."""
  rows = z.shape[0]
  live = jnp.arange(rows) < n_valid
  # Padding rows carry -1: never the farthest (every real distance is >= 0).
  mind = jnp.where(live, jnp.inf, -1.0).astype(jnp.float32)

  def body(i, carry):
    mind, chosen, last = carry
    d = jnp.sum(jnp.square(z - z[last]), axis=-1)
    mind = jnp.minimum(mind, d)
    nxt = jnp.argmax(mind).astype(jnp.int32)
    return mind, chosen.at[i].set(nxt), nxt

  chosen = jnp.zeros((count,), jnp.int32).at[0].set(start)
  _, chosen, _ = lax.fori_loop(1, count, body, (mind, chosen, start))
  return chosen


def _greedy_sharded(z, n_valid, start, *, count: int):
  """`_greedy` inside `shard_map`: z is this device's rows [N'/devices, d']."""
  rows = z.shape[0]
  me = lax.axis_index(DATA)
  first = me * rows
  live = first + jnp.arange(rows) < n_valid
  mind = jnp.where(live, jnp.inf, -1.0).astype(jnp.float32)

  def centre(g):
    local = g - first
    mine = (local >= 0) & (local < rows)
    row = z[jnp.clip(local, 0, rows - 1)]
    return lax.psum(jnp.where(mine, row, 0.0), DATA)

  def body(i, carry):
    mind, chosen, last = carry
    d = jnp.sum(jnp.square(z - centre(last)), axis=-1)
    mind = jnp.minimum(mind, d)
    at = jnp.argmax(mind)
    best = lax.all_gather(mind[at], DATA)                    # [devices]
    where = lax.all_gather(first + at.astype(jnp.int32), DATA)
    # The largest distance; among equal ones the lowest index (devices hold
    # consecutive rows, so the first device holding the maximum).
    nxt = where[jnp.argmax(best)].astype(jnp.int32)
    return mind, chosen.at[i].set(nxt), nxt

  chosen = jnp.zeros((count,), jnp.int32).at[0].set(start)
  _, chosen, _ = lax.fori_loop(1, count, body, (mind, chosen, start))
  return chosen


@functools.lru_cache(maxsize=None)
def _selector(count: int, mesh):
  if mesh is None:
    return jax.jit(functools.partial(_greedy, count=count))
  fn = functools.partial(_greedy_sharded, count=count)
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(DATA), P(), P()),
                               out_specs=P(), check_vma=False))


def select(features, count: int, *, seed: int = 0, mesh=None, proj=None,
           block: int = ROW_BLOCK) -> np.ndarray:
  """Indices [count] (int64, in selection order) of a greedy k-center coreset of
  `features` [N, D] (a numpy array, memmap or anything sliceable by rows).

  `proj` [D, d'] overrides the seeded `projection(D, seed)` (False: none).
  With a `mesh` of more than one device on "data", the rows are split over it.
  """
  n, d = features.shape
  count = int(count)
  if not 1 <= count <= n:
    raise ValueError(f"coreset: {count} patches asked of {n}")
  if proj is None:
    proj = projection(d, seed)
  elif proj is False:
    proj = None
  devices = 1 if mesh is None else mesh.shape[DATA]
  rows = -(-n // devices) * devices
  spec = None if devices == 1 else NamedSharding(mesh, P(DATA))
  z = _projected(features, proj, rows, spec, block)
  fn = _selector(count, mesh if devices > 1 else None)
  out = fn(z, jnp.int32(n), jnp.int32(start_index(n, seed)))
  return np.asarray(out).astype(np.int64)

