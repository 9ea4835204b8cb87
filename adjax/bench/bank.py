"""Benchmark parts of `python -m adjax.bench neighbors --parts coreset,subsets,scoring`:
coreset selection against a PyTorch restatement of anomalib's `KCenterGreedy`,
batch scoring in subsets (`eval.batch_subset`) at large N, and few-shot
scoring time against the bank's size.

Scoring (`--bank-cases vits16@224:1960,...`, `--bank-queries 8`, `--bank-r 1`,
`--layers 4`): `neighbors.bank_maps` of the queries' random raw tokens
against a bank of K random unit features per layer and r (K = references x
patches, or a coreset's count); each case in its own process.

Coreset (`--coreset 100000:384,100000:1024`, `--fraction 0.1`): random
float32 features [N, D]; the time to choose fraction * N patches
(projection included, compile excluded and printed apart):

- adjax: `adjax.coreset.select` (a 128-dimensional Gaussian projection, as
  PatchCore's sampler), and the same JAX selection on a projection of
  anomalib's width (the Johnson-Lindenstrauss width of its
  `SparseRandomProjection(eps=0.9)`: 284 at N = 10^5), so that both do the
  same work per step;
- anomalib's algorithm, restated here in PyTorch (anomalib is not installed):
  `KCenterGreedy.select_coreset_idxs` projects with a sparse random matrix
  (density 1/sqrt(D), entries +-sqrt(1/density)/sqrt(width)), then per step
  `F.pairwise_distance(features, centre)`, `torch.minimum` with the running
  minimum, `argmax`, and sets the chosen patch's distance to 0.

Every step of greedy k-center costs the same (one pass over all N projected
patches), so when a whole selection is estimated above `--budget` seconds,
`--steps` steps are timed and scaled to the whole count (said per row).

Subsets (`--subset-n 1000,5000`, `--subset 50`): the tokens of N demo-size
images (ViT-S/16 at 224: 14 x 14 patches, D 384, 4 layers, r = 1 as in
configs/demo.py) in per-layer float16 files read by rows (`RowFile`);
`neighbors.mutual_maps_subsets` reads one subset at a time. `--subsets-timed`
subsets are timed and scaled to all (every subset is the same work); the
peak memory is the process's (each (N) runs in its own process).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
import resource
import tempfile
import time

import numpy as np

from adjax.models import backbones


def case_shape(spec: str) -> tuple[str, int, int, int]:
  """"vitl16@512" -> (variant, size, patches per side, width)."""
  variant, size = spec.split("@")
  family, _ = backbones.find_variant(variant)
  info = backbones.describe(family, backbones.variant_config(family, variant))
  side = int(size) // info.patch_size
  return variant, int(size), side, info.dim


def _peak_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def jl_width(n: int, eps: float = 0.9) -> int:
  """sklearn's `johnson_lindenstrauss_min_dim`, which anomalib's projection uses."""
  return int(4 * math.log(n) / (eps ** 2 / 2 - eps ** 3 / 3))


class TorchKCenterGreedy:
  """anomalib's `KCenterGreedy` (components/sampling/k_center_greedy.py),
  restated in PyTorch: sparse random projection, then greedy k-center."""

  def __init__(self, embedding, sampling_ratio: float, seed: int = 0):
    import torch  # deferred: the PyTorch peer, optional
    self.embedding = embedding
    self.coreset_size = int(embedding.shape[0] * sampling_ratio)
    n, d = embedding.shape
    width = jl_width(n)
    g = torch.Generator().manual_seed(seed)
    density = 1 / math.sqrt(d)
    mask = torch.rand((width, d), generator=g) < density
    signs = torch.where(torch.rand((width, d), generator=g) < 0.5, -1.0, 1.0)
    self.components = (mask * signs * math.sqrt(1 / density) / math.sqrt(width)).to_sparse()
    self.features = None
    self.min_distances = None
    self.generator = g

  def project(self):
    import torch  # deferred: the PyTorch peer, optional
    self.features = torch.sparse.mm(self.components, self.embedding.T).T.contiguous()

  def update_distances(self, idx: int) -> None:
    import torch  # deferred: the PyTorch peer, optional
    import torch.nn.functional as F  # deferred: the PyTorch peer, optional
    distance = F.pairwise_distance(self.features, self.features[idx:idx + 1], p=2).reshape(-1, 1)
    self.min_distances = (distance if self.min_distances is None
                          else torch.minimum(self.min_distances, distance))

  def select(self, steps: int | None = None) -> list[int]:
    import torch  # deferred: the PyTorch peer, optional
    self.project()
    self.min_distances = None
    idx = int(torch.randint(high=self.features.shape[0], size=(1,),
                            generator=self.generator).item())
    chosen = []
    for _ in range(self.coreset_size if steps is None else steps):
      self.update_distances(idx)
      idx = int(torch.argmax(self.min_distances).item())
      self.min_distances[idx] = 0
      chosen.append(idx)
    return chosen


def _time(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def run_coreset(n: int, d: int, fraction: float, steps: int, budget: float) -> dict:
  """One (N, D) -> times of each selection (seconds, whole or scaled)."""
  import jax  # deferred: the measured worker loads it
  import jax.numpy as jnp  # deferred: the measured worker loads it
  import torch  # deferred: the PyTorch peer, optional

  from adjax import coreset  # deferred: the measured worker loads it
  x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
  count = coreset.coreset_size(n, fraction)
  row = dict(n=n, d=d, count=count, steps_timed=steps, torch_threads=torch.get_num_threads())

  def ours(proj, key):
    z = coreset._projected(x, proj, n, None, coreset.ROW_BLOCK)
    jax.block_until_ready(z)
    start = jnp.int32(coreset.start_index(n))
    t0 = time.perf_counter()
    probe = coreset._selector(steps, None).lower(z, jnp.int32(n), start).compile()
    row[f"{key}_compile_s"] = time.perf_counter() - t0
    per_step = _time(lambda: jax.block_until_ready(probe(z, jnp.int32(n), start))) / steps
    project_s = _time(lambda: jax.block_until_ready(
        coreset._projected(x, proj, n, None, coreset.ROW_BLOCK)))
    if per_step * count <= budget:
      full = coreset._selector(count, None).lower(z, jnp.int32(n), start).compile()
      row[f"{key}_s"] = project_s + _time(lambda: jax.block_until_ready(
          full(z, jnp.int32(n), start)))
      row[f"{key}_measured"] = True
    else:
      row[f"{key}_s"] = project_s + per_step * count
      row[f"{key}_measured"] = False

  ours(coreset.projection(d, 0), "adjax")
  width = jl_width(n)
  wide = (np.random.default_rng(1).standard_normal((d, width)) / math.sqrt(width)
          ).astype(np.float32)
  ours(wide if d > width else None, "adjax_jl")
  row["jl_width"] = width
  emb = torch.from_numpy(x)
  sampler = TorchKCenterGreedy(emb, fraction)
  project_s = _time(sampler.project)
  per_step = (_time(lambda: sampler.select(steps)) - project_s) / steps
  if per_step * count <= budget:
    row["torch_s"], row["torch_measured"] = _time(TorchKCenterGreedy(emb, fraction).select), True
  else:
    row["torch_s"], row["torch_measured"] = project_s + per_step * count, False
  row["peak_rss_gb"] = _peak_gb()
  return row


class RowFile:
  """A per-layer token array [N, h, w, D] on disk, read by rows with `pread`
  (`arr[indices]`): only what is read is in the process's memory (a memmap's
  touched pages would count in its resident size until the system reclaims
  them)."""

  def __init__(self, path, shape, dtype):
    self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
    self.row = int(np.prod(self.shape[1:])) * self.dtype.itemsize

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, idx) -> np.ndarray:
    idx = np.arange(self.shape[0])[idx] if isinstance(idx, slice) else np.asarray(idx)
    out = np.empty((len(idx),) + self.shape[1:], self.dtype)
    fd = os.open(self.path, os.O_RDONLY)
    try:
      for k, i in enumerate(idx):
        out[k] = np.frombuffer(os.pread(fd, self.row, int(i) * self.row),
                               self.dtype).reshape(self.shape[1:])
    finally:
      os.close(fd)
    return out


def run_subsets(n: int, subset: int, timed: int, layers: int = 4) -> dict:
  """Batch scoring of N demo-size images in subsets -> time and peak memory."""
  import jax  # deferred: the measured worker loads it

  from adjax import neighbors  # deferred: the measured worker loads it
  side, dim = 14, 384
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory(prefix="adjax_bench_subsets_") as tmp:
    tokens = []
    for l in range(layers):
      path = Path(tmp) / f"layer{l}.bin"
      with open(path, "wb") as f:       # written through the file: no pages of ours
        for s in range(0, n, 64):
          f.write(rng.standard_normal((min(64, n - s), side, side, dim), np.float32)
                  .astype(np.float16).tobytes())
      tokens.append(RowFile(path, (n, side, side, dim), np.float16))
    base_rss = _peak_gb()
    parts = neighbors.subsets(n, subset, 0)
    # Compile on the first subset's shape (subsets differ by at most one image).
    jax.block_until_ready(neighbors.mutual_maps([t[parts[0]] for t in tokens], (1,)))
    timed = min(timed, len(parts))
    start = time.perf_counter()
    for idx in parts[:timed]:
      neighbors.mutual_maps([t[idx] for t in tokens], (1,))
    per_image = (time.perf_counter() - start) / sum(len(p) for p in parts[:timed])
  return dict(n=n, subset=subset, subsets=len(parts), subsets_timed=timed,
              total_s=per_image * n, images_per_s=1 / per_image,
              whole_batch_ratio=(n - 1) / (sum(len(p) for p in parts) / len(parts) - 1),
              peak_rss_gb=_peak_gb(), tokens_gb=layers * n * side * side * dim * 2 / 2**30,
              rss_before_scoring_gb=base_rss, device=str(jax.devices()[0].device_kind))


def print_coreset(rows: list[dict], fraction: float) -> None:
  print(f"\ncoreset selection, {fraction:g} of N patches (greedy k-center; seconds, "
        "projection included, compile excluded)")
  print(f"{'N':>8s} {'D':>5s} {'kept':>6s} {'adjax 128':>10s} {'adjax JL':>9s} "
        f"{'torch JL':>9s} {'torch/adjax 128':>16s} {'torch/adjax JL':>15s}  how")
  for r in rows:
    how = ", ".join(f"{k} {'measured' if r[k + '_measured'] else 'scaled from ' + str(r['steps_timed']) + ' steps'}"
                    for k in ("adjax", "adjax_jl", "torch"))
    print(f"{r['n']:8d} {r['d']:5d} {r['count']:6d} {r['adjax_s']:10.2f} {r['adjax_jl_s']:9.2f} "
          f"{r['torch_s']:9.2f} {r['torch_s'] / r['adjax_s']:16.1f} "
          f"{r['torch_s'] / r['adjax_jl_s']:15.1f}  {how}; JL width {r['jl_width']}, "
          f"torch threads {r['torch_threads']}, peak {r['peak_rss_gb']:.2f} GB")


def print_subsets(rows: list[dict]) -> None:
  print("\nbatch scoring in subsets (demo size: ViT-S/16 224, 4 layers, r = 1; "
        "float16 token files read by rows)")
  print(f"{'N':>6s} {'S':>4s} {'subsets':>7s} {'images/s':>9s} {'total s':>8s} "
        f"{'peak GB':>8s} {'before GB':>9s} {'tokens GB':>9s} {'x work saved':>12s}  how")
  for r in rows:
    print(f"{r['n']:6d} {r['subset']:4d} {r['subsets']:7d} {r['images_per_s']:9.2f} "
          f"{r['total_s']:8.1f} {r['peak_rss_gb']:8.2f} {r['rss_before_scoring_gb']:9.2f} "
          f"{r['tokens_gb']:9.2f} "
          f"{r['whole_batch_ratio']:12.1f}  "
          + ("measured" if r["subsets_timed"] == r["subsets"] else
             f"scaled from {r['subsets_timed']} of {r['subsets']} subsets"))


def run_scoring(spec: str, bank_patches: int, queries: int, layers: int,
                r_list: tuple[int, ...], blocks: int = 2) -> dict:
  """Few-shot scoring (`neighbors.bank_maps`) of `queries` images of case
  `spec` ("vits16@224") against a bank of `bank_patches` patches per layer
  and r: random unit features [L, R, K, D] and random raw query tokens. The
  first call compiles; the next `blocks` calls are timed (their mean)."""
  import jax  # deferred: the measured worker loads it

  from adjax import neighbors  # deferred: the measured worker loads it
  variant, size, side, dim = case_shape(spec)
  rng = np.random.default_rng(0)
  bank = rng.standard_normal((layers, len(r_list), bank_patches, dim), np.float32)
  bank /= np.linalg.norm(bank, axis=-1, keepdims=True)
  tokens = rng.standard_normal((layers, queries, side, side, dim), np.float32)
  neighbors.bank_maps(tokens, bank, r_list)           # compile
  start = time.perf_counter()
  for _ in range(blocks):
    neighbors.bank_maps(tokens, bank, r_list)
  seconds = (time.perf_counter() - start) / blocks
  p = side * side
  flops = 2.0 * queries * p * bank_patches * dim * layers * len(r_list)
  return dict(case=spec, bank_patches=bank_patches, queries=queries, layers=layers,
              r=list(r_list), seconds=seconds, ms_per_image=1e3 * seconds / queries,
              gflops=flops / seconds / 1e9, bank_mib=bank.nbytes / 2**20,
              peak_rss_gb=_peak_gb(), device=str(jax.devices()[0].device_kind))


def print_scoring(rows: list[dict]) -> None:
  print("\nfew-shot scoring against the bank (neighbors.bank_maps; random features, "
        "compile excluded)")
  print(f"{'case':12s} {'K per l,r':>10s} {'L':>2s} {'r':>6s} {'bank MiB':>9s} "
        f"{'ms/image':>9s} {'images/s':>9s} {'GFLOP/s':>8s} {'peak GB':>8s}")
  for r in rows:
    print(f"{r['case']:12s} {r['bank_patches']:10d} {r['layers']:2d} "
          f"{','.join(map(str, r['r'])):>6s} {r['bank_mib']:9.1f} {r['ms_per_image']:9.1f} "
          f"{1e3 / r['ms_per_image']:9.2f} {r['gflops']:8.1f} {r['peak_rss_gb']:8.2f}")
